"""The applications' flags (``sample.py --task ...``): what sample.py's parser gets, which flags
each task reads (any other one given is refused rather than ignored), and the checks of their
values that need no run."""
from __future__ import annotations

import argparse
import math

import torch

from genscale.errors import UserError

TASKS = ("denoise", "img2img", "inpaint", "anagram", "hybrid")
# Defaults checked on the default ddpm preset's run (docs/applications.md has the numbers).
ANAGRAM_LABELS, HYBRID_LABELS = "6,9", "3,9"


DEFAULT_NUM = 64  # sample.py's --num when not given (its parser's default is None: "not given")


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
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


def class_list(spec: str, count: int, num_classes: int, flag: str = "--labels") -> list[int]:
    try:
        classes = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated class numbers, got {spec!r}") from None
    if len(classes) != count or any(not 0 <= c < num_classes for c in classes):
        raise UserError(f"{flag} must name {count} classes between 0 and {num_classes - 1}, got {spec!r}")
    return classes


def default_or_given(spec: str | None, default: str, count: int, num_classes: int, task: str) -> list[int]:
    """The classes of --labels, or the task's digits default when it fits this run; when it does
    not, the message asks for --labels instead of blaming a flag the user never gave."""
    if spec:
        return class_list(spec, count, max(num_classes, 1))
    fits = len(default.split(",")) == count and all(int(c) < num_classes for c in default.split(","))
    if not fits:
        raise UserError(f"--task {task} needs --labels with {count} classes between 0 and {num_classes - 1} "
                        f"(its default {default} is for the digits' 10 classes)")
    return class_list(default, count, num_classes)


def labels_for(dm, spec: str | None, n: int) -> torch.Tensor | None:
    """One label per image (sample.py's --labels), or None for the unconditional model; an
    unconditional run refuses --labels in plain sampling's words instead of ignoring it."""
    from genscale.sample import parse_labels

    if spec in (None, ""):
        return None
    return parse_labels(spec, n, dm.num_classes)


def or_default(value: int | None, default: int) -> int:
    """A flag's value, or the task's default when the flag was not given (0 is a value, not unset)."""
    return default if value is None else value


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


def num_given(args: argparse.Namespace) -> bool:
    """Whether --num was given (sample.py's default is None, then DEFAULT_NUM: see take_num)."""
    return getattr(args, "num_given", args.num is not None)


def take_num(args: argparse.Namespace) -> None:
    """Record whether --num was given, then put the default in its place."""
    args.num_given = args.num is not None
    if args.num is None:
        args.num = DEFAULT_NUM


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


def parse_floats(spec: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated numbers, got {spec!r}") from None
    if not values or not all(math.isfinite(v) and v >= 0 for v in values):  # 0: the clean images
        raise UserError(f"{flag} must list non-negative finite numbers, got {spec!r}")
    return values
