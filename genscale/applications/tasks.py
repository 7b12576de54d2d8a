"""``sample.py --task denoise|img2img|inpaint|anagram|hybrid``: ``run_task`` runs one task from
sample.py's parsed arguments (the flags themselves: task_args.py), drawing in batches of
--batch-size with one progress bar; every problem with the input is a UserError.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from genscale.applications.inputs import columns_grid, load_images, to_tensor, write_task_outputs
from genscale.applications.task_args import (ANAGRAM_LABELS, HYBRID_LABELS, check_task_numbers, default_or_given,
                                           labels_for, num_given, or_default, parse_floats, refuse_unused_flags,
                                           take_num)
from genscale.cli import output_files
from genscale.errors import UserError
from genscale.metrics.sharded import chunk_generator
from genscale.run_files import to_uint8


def run_task(args: argparse.Namespace) -> list[Path]:
    """Run ``args.task`` on ``args.run``; returns the files written."""
    from genscale.sample import load_family

    output_files(args.out)  # checked before the task, not after it
    take_num(args)
    for flag, value in (("--num", args.num), ("--batch-size", args.batch_size), ("--steps", args.steps)):
        if value is not None and value < 1:  # None: the task's default
            raise UserError(f"{flag} must be at least 1, got {value}")
    check_task_numbers(args)
    if args.sampler is not None or args.sampling_steps is not None:
        raise UserError("--sampler and --sampling-steps go with plain sampling; the tasks take --steps (and --eta)")
    if args.task == "inpaint":
        return _inpaint(args)
    if args.mask:
        raise UserError("--mask goes with --task inpaint")
    if args.input and num_given(args):  # every image of the file is used: a --num would be ignored
        raise UserError(f"--num cannot be used with --input (every image of {args.input} is used)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    family, info, _ = load_family(args.run, device)
    if getattr(family, "name", "") == "denoiser":
        return _denoiser_sweep(args, family, info)
    from genscale.applications.model import DiffusionModel, NonFiniteError

    dm = DiffusionModel(family, args.task)
    refuse_unused_flags(args, args.task, f"--task {args.task}")
    cfg = dm.default_cfg if args.cfg_scale is None else args.cfg_scale
    try:
        if args.task in ("anagram", "hybrid"):
            if args.input:
                raise UserError(f"--task {args.task} generates from noise and takes no --input")
            return _generate(args, dm, cfg)
        images = _task_images(args, info)
        if args.task == "denoise":
            return _denoise(args, dm, cfg, images)
        return _img2img(args, dm, cfg, images)
    except NonFiniteError:  # the same failure, named by the flags that caused it
        raise UserError(f"--task {args.task} gave NaN or infinite values at --cfg-scale {cfg:g} and --eta "
                        f"{args.eta:g}; use smaller values (nothing was written)") from None


def _inpaint(args: argparse.Namespace) -> list[Path]:
    """RePaint on a diffusion run, or the run's own network: sample.py's inpaint_task with the
    settings given (the defaults are filled in by genscale.inpainting.task_options)."""
    from genscale.sample import inpaint_task

    if not args.input or not args.mask:
        raise UserError("--task inpaint needs --input (IMAGES.npz or one image) and --mask (MASKS.npz or one "
                        "black-and-white image, white = known)")
    refuse_unused_flags(args, "inpaint", "--task inpaint (RePaint takes ancestral steps, eta 1)")
    if num_given(args):
        raise UserError(f"--num does not apply to --task inpaint, which fills every image of {args.input}")
    given = dict(steps=args.steps, jump_length=args.jump_length, jump_count=args.jump_count, labels=args.labels,
                 cfg_scale=args.cfg_scale)
    defaults = dict(steps=None, jump_length=10, jump_count=10, labels=None, cfg_scale=None)
    options = {key: value for key, value in given.items() if value != defaults[key]}
    return inpaint_task(args.run, args.input, args.mask, args.out, args.seed, args.batch_size,
                        options=dict(options, progress=True))


def _task_images(args: argparse.Namespace, info) -> np.ndarray:
    """The --input images, or the first --num of the held-out split (saying so when it holds fewer)."""
    images, _ = load_images(args.input, args.run, info.image_size, info.channels, args.num)
    if args.input is None and len(images) < args.num:
        print(f"warning: --num {args.num} asks for more images than the held-out split holds ({len(images)}); "
              f"using all {len(images)}", file=sys.stderr)
    return images


def _in_batches(n: int, batch_size: int, seed: int, desc: str, draw) -> None:
    """``draw(start, stop, generator, progress)`` for each batch k of ``batch_size`` images, drawing
    from the generator seeded by (seed, k) (genscale.metrics.sharded, as plain sampling): a seed
    gives one output at one batch size. Several batches show one bar over the images, a single
    batch its own bar over the steps (as sample.py does)."""
    several = n > batch_size
    with tqdm(total=n, desc=desc, disable=not several, leave=False, dynamic_ncols=True) as bar:
        for k, start in enumerate(range(0, n, batch_size)):
            stop = min(n, start + batch_size)
            draw(start, stop, chunk_generator(seed, k), not several)
            bar.update(stop - start)


def _finite(task: str, *tensors: torch.Tensor) -> None:
    """Refuse an output that is not finite: as uint8 it would silently turn black (run_task words
    the error, as for a non-finite prediction)."""
    from genscale.applications.model import NonFiniteError

    if not all(bool(torch.isfinite(x).all()) for x in tensors):
        raise NonFiniteError(f"--task {task} gave NaN or infinite values")


def _denoise(args: argparse.Namespace, dm, cfg: float, images: np.ndarray) -> list[Path]:
    from genscale.applications.denoise import denoise, psnr_from_sse, squared_error

    t = dm.timesteps // 2 if args.t is None else args.t  # t and --steps are checked by denoise()
    labels = labels_for(dm, args.labels, len(images))
    names = ("noisy", "blur", "one_step", "iterative")
    sse = dict.fromkeys(names, 0.0)
    columns: list[list[np.ndarray]] = []

    def draw(start, stop, gen, progress):
        x = to_tensor(images[start:stop], dm.device)
        r = denoise(dm, x, t, steps=args.steps, blur_sigma=args.blur_sigma, cfg_scale=cfg, eta=args.eta,
                    labels=None if labels is None else labels[start:stop].to(dm.device), generator=gen,
                    progress=progress)
        stages = [r.clean, r.noisy, r.blur, r.one_step, *r.trace, r.iterative]
        _finite(args.task, *stages)
        for name in names:
            sse[name] += squared_error(getattr(r, name), r.clean)
        columns.append([to_uint8(c) for c in stages])

    _in_batches(len(images), args.batch_size, args.seed, "denoise", draw)
    count = images.size  # values in all images (the PSNR is pooled over them)
    print("PSNR (dB) at t=%d: " % t + ", ".join(f"{k} {psnr_from_sse(v, count):.2f}" for k, v in sse.items()))
    stages = [np.concatenate(c) for c in zip(*columns)]  # batches -> one array per grid column
    noisy, blur, one_step = stages[1:4]
    return write_task_outputs(args.out, columns_grid(stages), stages[-1],
                              dict(noisy=noisy, blur=blur, one_step=one_step))


def _img2img(args: argparse.Namespace, dm, cfg: float, images: np.ndarray) -> list[Path]:
    from genscale.applications.denoise import squared_error
    from genscale.applications.sdedit import parse_levels, sdedit

    levels = parse_levels(args.levels)
    steps = or_default(args.steps, min(50, dm.timesteps))
    if not 1 <= steps <= dm.timesteps:
        raise UserError(f"--steps must be between 1 and {dm.timesteps}, got {steps}")
    labels = labels_for(dm, args.labels, len(images))
    sse = np.zeros(len(levels))
    edited: list[list[np.ndarray]] = []

    def draw(start, stop, gen, progress):
        x = to_tensor(images[start:stop], dm.device)
        edits = sdedit(dm, x, levels, labels=None if labels is None else labels[start:stop].to(dm.device),
                       cfg_scale=cfg, steps=steps, eta=args.eta, generator=gen, progress=progress)
        _finite(args.task, *edits)
        sse[:] += [squared_error(e, x) for e in edits]
        edited.append([to_uint8(e) for e in edits])

    _in_batches(len(images), args.batch_size, args.seed, "img2img", draw)
    rms = np.sqrt(sse / images.size)
    print("distance to the guide (RMS) by level: " + ", ".join(f"{lv:g}: {d:.4f}" for lv, d in zip(levels, rms)))
    per_level = [np.concatenate(c) for c in zip(*edited)]
    arr = np.stack(per_level, 1).reshape(-1, *images.shape[1:])  # image-major: image 0 at every level, then 1 ...
    return write_task_outputs(args.out, columns_grid([images, *per_level]), arr, dict(levels=np.array(levels)))


def _denoiser_sweep(args: argparse.Namespace, family, info) -> list[Path]:
    """--task denoise on a denoiser run: its sigma sweep (genscale.applications.denoiser_sweep)."""
    from genscale.applications.denoiser_sweep import sigma_sweep

    if args.task != "denoise":
        raise UserError(f"a denoiser run does --task denoise only, not {args.task}")
    what = "the denoiser sweep (--task denoise on a denoiser run)"
    refuse_unused_flags(args, "sweep", what)
    if args.labels or args.cfg_scale is not None:
        raise UserError(f"--labels and --cfg-scale do not apply to {what}: the denoiser takes no class")
    sigmas = parse_floats(args.sigmas, "--sigmas")
    images = torch.from_numpy(_task_images(args, info)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return sigma_sweep(family, images, sigmas, args.out, batch_size=args.batch_size, seed=args.seed,
                       progress=True)


def _generate(args: argparse.Namespace, dm, cfg: float) -> list[Path]:
    """anagram and hybrid: --num images drawn from noise in batches of --batch-size."""
    dm.require_pixels(args.task)
    if dm.num_classes == 0:
        raise UserError(f"--task {args.task} needs a class-conditional run (one class per view or band)")
    steps = or_default(args.steps, min(50, dm.timesteps))
    if not 1 <= steps <= dm.timesteps:
        raise UserError(f"--steps must be between 1 and {dm.timesteps}, got {steps}")
    if args.task == "anagram":
        from genscale.applications.anagram import anagram
        from genscale.applications.views import parse_views

        views = parse_views(args.views)
        classes = default_or_given(args.labels, ANAGRAM_LABELS, len(views), dm.num_classes, "anagram")

        def make(n, gen, progress):
            x = anagram(dm, n, views, classes, cfg_scale=cfg, steps=steps, eta=args.eta, generator=gen,
                        progress=progress)
            return [x, *(v.apply(x) for v in views)]  # arr_0, then the grid's columns: one per view
        grid_from, names = 1, [f"view_{v.name}" for v in views[1:]]
    else:
        from genscale.applications.filters import lowpass
        from genscale.applications.hybrid import hybrid

        low, high = default_or_given(args.labels, HYBRID_LABELS, 2, dm.num_classes, "hybrid")
        lowpass(torch.zeros(1, 1, 2, 2), args.view_sigma)  # a bad sigma is refused before any model call

        def make(n, gen, progress):
            x = hybrid(dm, n, low, high, sigma=args.sigma, cfg_scale=cfg, steps=steps, eta=args.eta, generator=gen,
                       progress=progress)
            return [x, lowpass(x, args.view_sigma).clamp(-1, 1)]  # arr_0 and the blurred view, both shown
        grid_from, names = 0, ["blurred"]
    parts: list[list[np.ndarray]] = []

    def draw(start, stop, gen, progress):
        shown = make(stop - start, gen, progress)
        _finite(args.task, *shown)
        parts.append([to_uint8(s) for s in shown])

    _in_batches(args.num, args.batch_size, args.seed, args.task, draw)
    arrays = [np.concatenate(c) for c in zip(*parts)]
    return write_task_outputs(args.out, columns_grid(arrays[grid_from:]), arrays[0],
                              dict(zip(names, arrays[len(arrays) - len(names):])))
