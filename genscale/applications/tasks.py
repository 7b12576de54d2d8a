"""The command-line side of ``sample.py --task denoise|img2img|inpaint|anagram|hybrid``.

``add_task_arguments`` adds the applications' flags to sample.py's parser and ``run_task``
runs one task from the parsed arguments; every problem with the input is a UserError.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from genscale.applications.inputs import columns_grid, load_images, to_tensor, write_task_outputs
from genscale.cli import output_files
from genscale.errors import UserError
from genscale.metrics.sharded import chunk_generator
from genscale.run_files import to_uint8

TASKS = ("denoise", "img2img", "inpaint", "anagram", "hybrid")
# Defaults checked on the default ddpm preset's run (docs/applications.md has the numbers).
ANAGRAM_LABELS, HYBRID_LABELS = "6,9", "3,9"


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    if parser.get_default("num") is not None:  # sample.py's: tells a --num given from the default
        parser.set_defaults(num_default=parser.get_default("num"))
    g = parser.add_argument_group("applications (diffusion runs; see docs/applications.md)")
    g.add_argument("--t", type=int, default=None, help="denoise: the timestep to noise to (default T/2)")
    g.add_argument("--steps", type=int, default=None,
                   help="reverse steps: denoise's iterative steps from t (20, at most t + 1), or the strided "
                        "steps over all T of img2img/anagram/hybrid (50) and inpaint (RePaint, 100), at most T")
    g.add_argument("--blur-sigma", type=float, default=1.0, help="denoise: sigma of the Gaussian-blur baseline")
    g.add_argument("--levels", default="0.2,0.4,0.6,0.8", help="img2img: noise levels as fractions of T")
    g.add_argument("--jump-length", type=int, default=10, help="inpaint (RePaint): positions per resampling jump")
    g.add_argument("--jump-count", type=int, default=10,
                   help="inpaint (RePaint): passes through each jump (1 = no resampling)")
    g.add_argument("--views", default="identity,rot180", help="anagram: one view per class (identity, vflip, "
                                                               "rot180, rot90)")
    g.add_argument("--sigma", type=float, default=1.0, help="hybrid: Gaussian sigma of the low/high split")
    g.add_argument("--view-sigma", type=float, default=1.5, help="hybrid: sigma of the blurred view in the grid")
    g.add_argument("--eta", type=float, default=0.0,
                   help="denoise, img2img, anagram, hybrid: between 0 (deterministic DDIM steps) and 1 (ancestral); "
                        "RePaint always takes ancestral steps")
    g.add_argument("--sigmas", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0",
                   help="denoise on a denoiser run: the noise levels of the sweep (non-negative)")


def _class_list(spec: str, count: int, num_classes: int, flag: str = "--labels") -> list[int]:
    try:
        classes = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated class numbers, got {spec!r}") from None
    if len(classes) != count or any(not 0 <= c < num_classes for c in classes):
        raise UserError(f"{flag} must name {count} classes between 0 and {num_classes - 1}, got {spec!r}")
    return classes


def _default_or_given(spec: str | None, default: str, count: int, num_classes: int, task: str) -> list[int]:
    """The classes of --labels, or the task's digits default when it fits this run; when it does
    not, the message asks for --labels instead of blaming a flag the user never gave."""
    if spec:
        return _class_list(spec, count, max(num_classes, 1))
    fits = len(default.split(",")) == count and all(int(c) < num_classes for c in default.split(","))
    if not fits:
        raise UserError(f"--task {task} needs --labels with {count} classes between 0 and {num_classes - 1} "
                        f"(its default {default} is for the digits' 10 classes)")
    return _class_list(default, count, num_classes)


def _labels(dm, spec: str | None, n: int) -> torch.Tensor | None:
    """One label per image (sample.py's --labels), or None for the unconditional model; an
    unconditional run refuses --labels in plain sampling's words instead of ignoring it."""
    from genscale.sample import parse_labels

    if spec in (None, ""):
        return None
    return parse_labels(spec, n, dm.num_classes)


def _or(value: int | None, default: int) -> int:
    """A flag's value, or the task's default when the flag was not given (0 is a value, not unset)."""
    return default if value is None else value


def run_task(args: argparse.Namespace) -> list[Path]:
    """Run ``args.task`` on ``args.run``; returns the files written."""
    from genscale.sample import load_family

    output_files(args.out)  # checked before the task, not after it
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
    if args.input and _num_given(args):  # every image of the file is used: a --num would be ignored
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


# The applications' flags each task reads; any other one given is refused, not silently ignored.
TASK_FLAGS = {
    "denoise": ("--t", "--steps", "--blur-sigma", "--eta"),
    "img2img": ("--levels", "--steps", "--eta"),
    "inpaint": ("--steps", "--jump-length", "--jump-count"),
    "anagram": ("--views", "--steps", "--eta"),
    "hybrid": ("--sigma", "--view-sigma", "--steps", "--eta"),
    "sweep": ("--sigmas",),
}


def refuse_unused_flags(args: argparse.Namespace, key: str, what: str) -> None:
    stray = [flag for flag in task_flags_given(args) if flag not in TASK_FLAGS[key]]
    if stray:
        raise UserError(f"{', '.join(stray)} {'does' if len(stray) == 1 else 'do'} not apply to {what}, "
                        f"which takes {', '.join(TASK_FLAGS[key])}")


def _num_given(args: argparse.Namespace) -> bool:
    """Whether --num differs from sample.py's default (recorded by add_task_arguments)."""
    return args.num != getattr(args, "num_default", args.num)


def _inpaint(args: argparse.Namespace) -> list[Path]:
    """RePaint on a diffusion run, or the run's own network: sample.py's inpaint_task with the
    settings given (the defaults are filled in by genscale.inpainting.task_options)."""
    from genscale.sample import inpaint_task

    if not args.input or not args.mask:
        raise UserError("--task inpaint needs --input (IMAGES.npz or one image) and --mask (MASKS.npz or one "
                        "black-and-white image, white = known)")
    refuse_unused_flags(args, "inpaint", "--task inpaint (RePaint takes ancestral steps, eta 1)")
    if _num_given(args):
        raise UserError(f"--num does not apply to --task inpaint, which fills every image of {args.input}")
    given = dict(steps=args.steps, jump_length=args.jump_length, jump_count=args.jump_count, labels=args.labels,
                 cfg_scale=args.cfg_scale)
    defaults = dict(steps=None, jump_length=10, jump_count=10, labels=None, cfg_scale=None)
    options = {key: value for key, value in given.items() if value != defaults[key]}
    with _input_for_run(args) as images_path:
        return inpaint_task(args.run, images_path, args.mask, args.out, args.seed, args.batch_size,
                            options=dict(options, progress=True))


@contextlib.contextmanager
def _input_for_run(args: argparse.Namespace):
    """--input, or a temporary .npz of it converted to the run's channels (colour -> grey as denoise
    and img2img convert): sample.py's inpaint_task draws its grid from the images as read, so
    they must already have the run's channels. A run folder that cannot be read is left to it."""
    from genscale.applications.inputs import fit_channels
    from genscale.inpainting import load_inpainting_inputs

    images, _ = load_inpainting_inputs(args.input, args.mask)
    try:
        channels = int(json.loads((Path(args.run) / "config.json").read_text())["data_info"]["channels"])
    except (OSError, ValueError, KeyError, TypeError):
        channels = images.shape[-1]
    if images.shape[-1] == channels:
        yield args.input
        return
    converted = fit_channels(images, channels, f"--input {args.input}")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / (Path(args.input).stem + ".npz")
        np.savez(path, converted)
        yield str(path)


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


def _finite(args: argparse.Namespace, cfg: float, *tensors: torch.Tensor) -> None:
    """Refuse an output that is not finite: as uint8 it would silently turn black."""
    if not all(bool(torch.isfinite(x).all()) for x in tensors):
        raise UserError(f"--task {args.task} gave NaN or infinite values at --cfg-scale {cfg:g} and --eta "
                        f"{args.eta:g}; use smaller values (nothing was written)")


def _denoise(args: argparse.Namespace, dm, cfg: float, images: np.ndarray) -> list[Path]:
    from genscale.applications.denoise import denoise, psnr_from_sse, squared_error

    t = dm.timesteps // 2 if args.t is None else args.t
    if not 0 <= t < dm.timesteps:
        raise UserError(f"--t must be a timestep between 0 and {dm.timesteps - 1}, got {t}")
    if args.steps is not None and not 1 <= args.steps <= t + 1:  # the default is capped, a given value is not
        raise UserError(f"--steps must be between 1 and {t + 1} (the timesteps from --t {t} down to 0), "
                        f"got {args.steps}")
    steps = min(_or(args.steps, 20), t + 1)
    labels = _labels(dm, args.labels, len(images))
    names = ("noisy", "blur", "one_step", "iterative")
    sse = dict.fromkeys(names, 0.0)
    columns: list[list[np.ndarray]] = []

    def draw(start, stop, gen, progress):
        x = to_tensor(images[start:stop], dm.device)
        r = denoise(dm, x, t, steps=steps, blur_sigma=args.blur_sigma, cfg_scale=cfg, eta=args.eta,
                    labels=None if labels is None else labels[start:stop].to(dm.device), generator=gen,
                    progress=progress)
        stages = [r.clean, r.noisy, r.blur, r.one_step, *r.trace, r.iterative]
        _finite(args, cfg, *stages)
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
    steps = _or(args.steps, min(50, dm.timesteps))
    if not 1 <= steps <= dm.timesteps:
        raise UserError(f"--steps must be between 1 and {dm.timesteps}, got {steps}")
    labels = _labels(dm, args.labels, len(images))
    sse = np.zeros(len(levels))
    edited: list[list[np.ndarray]] = []

    def draw(start, stop, gen, progress):
        x = to_tensor(images[start:stop], dm.device)
        edits = sdedit(dm, x, levels, labels=None if labels is None else labels[start:stop].to(dm.device),
                       cfg_scale=cfg, steps=steps, eta=args.eta, generator=gen, progress=progress)
        _finite(args, cfg, *edits)
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
    sigmas = _floats(args.sigmas, "--sigmas")
    images = torch.from_numpy(_task_images(args, info)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return sigma_sweep(family, images, sigmas, args.out, batch_size=args.batch_size, seed=args.seed,
                       progress=True)


def check_task_numbers(args: argparse.Namespace) -> None:
    """A NaN guidance scale or eta turns every image black, a NaN or infinite sigma fails deep in
    the blur, an eta past 1 has no meaning: refuse them in one sentence, as plain sampling does for
    --cfg-scale."""
    for flag, value, positive in (("--cfg-scale", args.cfg_scale, False), ("--eta", args.eta, False),
                                  ("--sigma", args.sigma, True), ("--view-sigma", args.view_sigma, True),
                                  ("--blur-sigma", args.blur_sigma, True)):
        if value is None:
            continue
        if not math.isfinite(value) or (positive and value <= 0) or (flag == "--eta" and value < 0):
            need = "a positive" if positive else "a non-negative" if flag == "--eta" else "a finite"
            raise UserError(f"{flag} must be {need} number, got {value}")
    # DDIM's eta interpolates between its deterministic step (0) and the ancestral DDPM step (1);
    # past 1 the noise it asks for exceeds the variance the step has (ddim_step clamps it away).
    if args.eta > 1:
        raise UserError(f"--eta must lie between 0 (deterministic DDIM steps) and 1 (ancestral steps), got {args.eta}")


def task_flags_given(args: argparse.Namespace) -> list[str]:
    """The applications' flags given a value other than their default (plain sampling ignores them)."""
    probe = argparse.ArgumentParser(add_help=False)
    add_task_arguments(probe)
    defaults = vars(probe.parse_args([]))
    return ["--" + name.replace("_", "-") for name, default in defaults.items() if getattr(args, name) != default]


def _floats(spec: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated numbers, got {spec!r}") from None
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):  # 0: the clean images
        raise UserError(f"{flag} must list non-negative finite numbers, got {spec!r}")
    return values


def _generate(args: argparse.Namespace, dm, cfg: float) -> list[Path]:
    """anagram and hybrid: --num images drawn from noise in batches of --batch-size."""
    dm.require_pixels(args.task)
    if dm.num_classes == 0:
        raise UserError(f"--task {args.task} needs a class-conditional run (one class per view or band)")
    steps = _or(args.steps, min(50, dm.timesteps))
    if not 1 <= steps <= dm.timesteps:
        raise UserError(f"--steps must be between 1 and {dm.timesteps}, got {steps}")
    if args.task == "anagram":
        from genscale.applications.anagram import anagram
        from genscale.applications.views import parse_views

        views = parse_views(args.views)
        classes = _default_or_given(args.labels, ANAGRAM_LABELS, len(views), dm.num_classes, "anagram")

        def make(n, gen, progress):
            x = anagram(dm, n, views, classes, cfg_scale=cfg, steps=steps, eta=args.eta, generator=gen,
                        progress=progress)
            return [x, *(v.apply(x) for v in views)]  # arr_0, then the grid's columns: one per view
        grid_from, names = 1, [f"view_{v.name}" for v in views[1:]]
    else:
        from genscale.applications.filters import lowpass
        from genscale.applications.hybrid import hybrid

        low, high = _default_or_given(args.labels, HYBRID_LABELS, 2, dm.num_classes, "hybrid")
        lowpass(torch.zeros(1, 1, 2, 2), args.view_sigma)  # a bad sigma is refused before any model call

        def make(n, gen, progress):
            x = hybrid(dm, n, low, high, sigma=args.sigma, cfg_scale=cfg, steps=steps, eta=args.eta, generator=gen,
                       progress=progress)
            return [x, lowpass(x, args.view_sigma).clamp(-1, 1)]  # arr_0 and the blurred view, both shown
        grid_from, names = 0, ["blurred"]
    parts: list[list[np.ndarray]] = []

    def draw(start, stop, gen, progress):
        shown = make(stop - start, gen, progress)
        _finite(args, cfg, *shown)
        parts.append([to_uint8(s) for s in shown])

    _in_batches(args.num, args.batch_size, args.seed, args.task, draw)
    arrays = [np.concatenate(c) for c in zip(*parts)]
    return write_task_outputs(args.out, columns_grid(arrays[grid_from:]), arrays[0],
                              dict(zip(names, arrays[len(arrays) - len(names):])))
