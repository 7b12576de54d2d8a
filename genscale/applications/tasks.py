"""The command-line side of ``sample.py --task denoise|img2img|inpaint|anagram|hybrid``.

``add_task_arguments`` adds the applications' flags to sample.py's parser and ``run_task``
runs one task from the parsed arguments; every problem with the input is a UserError.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from genscale.applications.inputs import columns_grid, load_images, to_tensor, write_task_outputs
from genscale.cli import output_files
from genscale.errors import UserError

TASKS = ("denoise", "img2img", "inpaint", "anagram", "hybrid")
# Defaults checked on the default ddpm preset's run (docs/applications.md has the numbers).
ANAGRAM_LABELS, HYBRID_LABELS = "6,9", "3,9"


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("applications (diffusion runs; see docs/applications.md)")
    g.add_argument("--t", type=int, default=None, help="denoise: the timestep to noise to (default T/2)")
    g.add_argument("--steps", type=int, default=None,
                   help="reverse steps: denoise's iterative steps from t (20), or the strided steps over all "
                        "T of img2img/anagram/hybrid (50) and inpaint (RePaint, 100)")
    g.add_argument("--blur-sigma", type=float, default=1.0, help="denoise: sigma of the Gaussian-blur baseline")
    g.add_argument("--levels", default="0.2,0.4,0.6,0.8", help="img2img: noise levels as fractions of T")
    g.add_argument("--jump-length", type=int, default=10, help="inpaint (RePaint): positions per resampling jump")
    g.add_argument("--jump-count", type=int, default=10,
                   help="inpaint (RePaint): passes through each jump (1 = no resampling)")
    g.add_argument("--views", default="identity,rot180", help="anagram: one view per class (identity, vflip, "
                                                               "rot180, rot90)")
    g.add_argument("--sigma", type=float, default=1.0, help="hybrid: Gaussian sigma of the low/high split")
    g.add_argument("--view-sigma", type=float, default=1.5, help="hybrid: sigma of the blurred view in the grid")
    g.add_argument("--eta", type=float, default=0.0, help="0 = deterministic DDIM steps, 1 = ancestral")
    g.add_argument("--sigmas", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0",
                   help="denoise on a denoiser run: the noise levels of the sweep")


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
    from genscale.sample import parse_labels

    if spec in (None, "") or dm.num_classes == 0:
        return None  # the unconditional model
    return parse_labels(spec, n, dm.num_classes).to(dm.device)


def _or(value: int | None, default: int) -> int:
    """A flag's value, or the task's default when the flag was not given (0 is a value, not unset)."""
    return default if value is None else value


def run_task(args: argparse.Namespace) -> list[Path]:
    """Run ``args.task`` on ``args.run``; returns the files written."""
    from genscale.sample import inpaint_task, load_family

    output_files(args.out)  # checked before the task, not after it
    for flag, value in (("--num", args.num), ("--batch-size", args.batch_size), ("--steps", args.steps)):
        if value is not None and value < 1:  # None: the task's default
            raise UserError(f"{flag} must be at least 1, got {value}")
    check_task_numbers(args)
    if args.sampler is not None or args.sampling_steps is not None:
        raise UserError("--sampler and --sampling-steps go with plain sampling; the tasks take --steps (and --eta)")
    if args.task == "inpaint":
        if not args.input or not args.mask:
            raise UserError("--task inpaint needs --input IMAGES.npz and --mask MASKS.npz")
        options = dict(steps=_or(args.steps, 100), jump_length=args.jump_length, jump_count=args.jump_count,
                       labels=args.labels, cfg_scale=args.cfg_scale, progress=True)
        return inpaint_task(args.run, args.input, args.mask, args.out, args.seed, args.batch_size, options=options)
    if args.mask:
        raise UserError("--mask goes with --task inpaint")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    family, info, _ = load_family(args.run, device)
    gen = torch.Generator().manual_seed(args.seed)
    if getattr(family, "name", "") == "denoiser":
        if args.task != "denoise":
            raise UserError(f"a denoiser run does --task denoise only, not {args.task}")
        from genscale.applications.denoiser_sweep import sigma_sweep

        images, _ = load_images(args.input, args.run, info.image_size, info.channels, args.num)
        return sigma_sweep(family, to_tensor(images, device), _floats(args.sigmas, "--sigmas"), args.out, gen)
    from genscale.applications.model import DiffusionModel

    dm = DiffusionModel(family, args.task)
    cfg = dm.default_cfg if args.cfg_scale is None else args.cfg_scale
    if args.task in ("anagram", "hybrid"):
        if args.input:
            raise UserError(f"--task {args.task} generates from noise and takes no --input")
        return _generate(args, dm, cfg, gen)
    images, _ = load_images(args.input, args.run, info.image_size, info.channels, args.num)
    x = to_tensor(images, device)
    if args.task == "denoise":
        from genscale.applications.denoise import denoise

        t = dm.timesteps // 2 if args.t is None else args.t
        r = denoise(dm, x, t, steps=_or(args.steps, 20), blur_sigma=args.blur_sigma,
                    labels=_labels(dm, args.labels, len(x)), cfg_scale=cfg, eta=args.eta, generator=gen)
        print("PSNR (dB) at t=%d: " % t + ", ".join(f"{k} {v:.2f}" for k, v in r.psnr().items()))
        grid = columns_grid([r.clean, r.noisy, r.blur, r.one_step, *r.trace, r.iterative])
        return write_task_outputs(args.out, grid, r.iterative, dict(noisy=r.noisy, blur=r.blur, one_step=r.one_step))
    from genscale.applications.sdedit import distances, parse_levels, sdedit

    levels = parse_levels(args.levels)
    edits = sdedit(dm, x, levels, labels=_labels(dm, args.labels, len(x)), cfg_scale=cfg, steps=_or(args.steps, 50),
                   eta=args.eta, generator=gen)
    print("distance to the guide (RMS) by level: " + ", ".join(
        f"{lv:g}: {d:.4f}" for lv, d in zip(levels, distances(edits, x))))
    arr = torch.stack(edits, 1).flatten(0, 1)  # image-major: image 0 at every level, then image 1 ...
    return write_task_outputs(args.out, columns_grid([x, *edits]), arr, dict(levels=np.array(levels)))


def check_task_numbers(args: argparse.Namespace) -> None:
    """A NaN guidance scale or eta turns every image black, a NaN or infinite sigma fails deep in
    the blur: refuse them in one sentence, as plain sampling does for --cfg-scale."""
    for flag, value, positive in (("--cfg-scale", args.cfg_scale, False), ("--eta", args.eta, False),
                                  ("--sigma", args.sigma, True), ("--view-sigma", args.view_sigma, True),
                                  ("--blur-sigma", args.blur_sigma, True)):
        if value is None:
            continue
        if not math.isfinite(value) or (positive and value <= 0) or (flag == "--eta" and value < 0):
            need = "a positive" if positive else "a non-negative" if flag == "--eta" else "a finite"
            raise UserError(f"{flag} must be {need} number, got {value}")


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
    if not values or min(values) < 0:
        raise UserError(f"{flag} must list non-negative numbers, got {spec!r}")
    return values


def _generate(args: argparse.Namespace, dm, cfg: float, gen: torch.Generator) -> list[Path]:
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
        x = anagram(dm, args.num, views, classes, cfg_scale=cfg, steps=steps, eta=args.eta, generator=gen)
        shown = [v.apply(x) for v in views]
        return write_task_outputs(args.out, columns_grid(shown), x,
                                  {f"view_{v.name}": s for v, s in zip(views[1:], shown[1:])})
    from genscale.applications.filters import lowpass
    from genscale.applications.hybrid import hybrid

    low, high = _default_or_given(args.labels, HYBRID_LABELS, 2, dm.num_classes, "hybrid")
    x = hybrid(dm, args.num, low, high, sigma=args.sigma, cfg_scale=cfg, steps=steps, eta=args.eta, generator=gen)
    blurred = lowpass(x, args.view_sigma).clamp(-1, 1)
    return write_task_outputs(args.out, columns_grid([x, blurred]), x, dict(blurred=blurred))
