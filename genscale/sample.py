"""Entry point: draw samples from a trained run.

    python genscale/sample.py --run runs/ddpm --num 100 --labels all --out samples.png
    python genscale/sample.py --run runs/inpaint --task inpaint --input IMAGES.npz --mask MASKS.npz --out OUT.npz
    python genscale/sample.py --run runs/ddpm --task anagram --labels 6,9 --views identity,rot180 --out anagram

Diffusion runs also take ``--task denoise|img2img|inpaint|anagram|hybrid`` (RePaint for inpaint;
docs/applications.md); a denoiser run takes ``--task denoise`` (its sigma sweep).

``--out FILE.png`` writes a grid, ``FILE.npz`` the ADM convention (``arr_0`` uint8 N x H x W x C,
``arr_1`` int labels), a name without a suffix both. The same seed at the same --batch-size (which
groups the draws) gives identical output, in one process or shared across the processes of
``accelerate launch genscale/sample.py ...``.
``--task inpaint`` fills the holes of IMAGES.npz (``arr_0`` uint8 N x H x W x C, or one image file)
under MASKS.npz (``arr_0`` uint8 N x H x W, 1 = known, 0 = hole, or one mask picture, light = known):
OUT.npz ``arr_0`` holds the filled images (known pixels unchanged bit for bit), OUT.png a grid of
masked input | filled pairs.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: import the package, not the files beside this one
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    from genscale.cli import quiet_interrupt_while_starting

    quiet_interrupt_while_starting()

import argparse
import inspect
import json
import math
import os

import numpy as np
import torch

from genscale.applications.task_args import DEFAULT_NUM, TASKS, add_task_arguments, task_flags_given
from genscale.applications.tasks import run_task
from genscale.checkpoints import load_ema_weights
from genscale.cli import ArgumentParser, output_files, run_main
from genscale.config import RunConfig
from genscale.diffusion.samplers import SAMPLERS
from genscale.errors import UserError
from genscale.families import family_module
from genscale.families.base import DataInfo, Family
from genscale.memory_check import check_memory
from genscale.metrics.sharded import SAMPLES, chunk_generator, sharded_rows
from genscale.run_files import grid_image, save_npz, save_png, to_uint8


def load_family(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[Family, DataInfo, int]:
    """Rebuild a run's family from config.json with its latest EMA weights."""
    path = Path(run_dir) / "config.json"
    if not Path(run_dir).exists():
        raise UserError(f"--run {run_dir} does not exist")  # bad input: exit 2, as evaluate.py
    if not path.is_file():
        raise UserError(f"{run_dir} is not a genscale run (no config.json)")
    try:
        record = json.loads(path.read_text())
        run = RunConfig.from_dict(record)
        info = DataInfo(**record["data_info"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError):  # AttributeError: not a mapping
        raise UserError(f"{path} is damaged and cannot be read", exit_code=1) from None
    family = family_module(run.train.model).FAMILY(run.train, run.options, info)
    weights, step = load_ema_weights(run_dir)
    for name, state in weights.items():
        try:
            family.nets[name].load_state_dict(state)
        except (KeyError, RuntimeError):
            raise UserError(f"the checkpoint of {run_dir} does not match its config.json", exit_code=1) from None
    for net in family.nets.values():
        net.to(device).eval()
    return family, info, step


def parse_labels(spec: str | None, num: int, num_classes: int) -> torch.Tensor | None:
    """'all' cycles through the classes, '3' repeats one class, '0,1,2' cycles through a list."""
    if num_classes == 0:
        if spec not in (None, ""):
            raise UserError("this run was trained without labels, so --labels cannot be used")
        return None
    if spec in (None, "", "all"):
        return torch.arange(num) % num_classes
    try:
        chosen = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--labels must be 'all' or comma-separated class numbers, got {spec!r}") from None
    if not chosen or any(not 0 <= c < num_classes for c in chosen):
        raise UserError(f"--labels must name classes between 0 and {num_classes - 1}, got {spec!r}")
    return torch.tensor(chosen)[torch.arange(num) % len(chosen)]


def check_sampling_options(family: Family, sampling_steps: int | None = None, batch_size: int = 1,
                           cfg_scale: float | None = None, sampler: str | None = None) -> None:
    """Raise UserError for sampler settings the family would reject with a traceback (or, for 0
    steps, silently replace by its default; for a nan guidance scale, turn into blank images), and
    for settings it would silently ignore (an option its sampler has no use for)."""
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    if cfg_scale is not None and not math.isfinite(cfg_scale):
        raise UserError(f"--cfg-scale must be a finite number, got {cfg_scale}")
    given = {name: value for name, value in
             dict(cfg_scale=cfg_scale, sampler=sampler, sampling_steps=sampling_steps).items() if value is not None}
    takes = {p.name for p in inspect.signature(family.sample).parameters.values() if p.kind != p.VAR_KEYWORD}
    for name in given:
        if name not in takes:
            raise UserError(f"--{name.replace('_', '-')} does not apply to a {getattr(family, 'name', '')} run")
    if sampling_steps is None:
        return
    timesteps = getattr(getattr(family, "opts", None), "timesteps", None)
    if sampling_steps < 1 or (timesteps and sampling_steps > timesteps):
        top = f" and {timesteps} (the run's timesteps)" if timesteps else ""
        raise UserError(f"--sampling-steps must be between 1{top}, got {sampling_steps}")


def generate(run_dir: str, num: int, labels: str | None = "all", seed: int = 0, cfg_scale: float | None = None,
             sampler: str | None = None, sampling_steps: int | None = None, batch_size: int = 250,
             device: str | None = None, progress: bool = False,
             accelerator=None) -> tuple[np.ndarray | None, np.ndarray]:
    """Samples of a run as uint8 N x H x W x C and their int labels (-1 when unconditional); with
    an ``accelerator`` the batches are shared by its ranks and only the main rank gets the images
    (the others None).

    Batch k holds samples [k * batch_size, (k + 1) * batch_size) and is drawn from a generator
    seeded by (seed, k) alone (genscale.metrics.sharded): the output depends on the seed and the
    batch size, not on how many processes share the batches, and equals the samples evaluate.py
    scores with the same --seed and --chunk-size.
    """
    if not 0 < num < 2**31:
        raise UserError(f"--num must be between 1 and 2**31 - 1, got {num}")
    device = accelerator.device if accelerator is not None else device or ("cuda" if torch.cuda.is_available() else "cpu")
    family, info, _ = load_family(run_dir, device)
    check_sampling_options(family, sampling_steps, batch_size, cfg_scale, sampler)
    # The family, not the data, says whether a run is conditional: gan, dcgan and vae train on the
    # labelled digits (info.num_classes 10) but generate without labels; their outputs are -1.
    classes = int(getattr(family, "num_classes", 0) or 0)
    if classes == 0 and labels == "all":
        labels = None
    label_tensor = parse_labels(labels, num, classes)
    options = {k: v for k, v in dict(cfg_scale=cfg_scale, sampler=sampler, sampling_steps=sampling_steps).items()
               if v is not None}
    shape = (info.image_size, info.image_size, info.channels)
    check_memory(num, shape, batch_size, accelerator)  # before any batch: all ranks agree
    main_rank = accelerator is None or accelerator.is_main_process
    # One batch shows the sampler's own bar (its steps); several show one bar over all the images,
    # not a sampler bar that restarts at zero for each batch (and none at all for GANs and VAEs).
    several = num > batch_size

    def draw(k: int, start: int, stop: int) -> torch.Tensor:
        lab = None if label_tensor is None else label_tensor[start:stop].to(device)
        images = family.sample(stop - start, labels=lab, generator=chunk_generator(seed, k, SAMPLES),
                               progress=progress and not several and main_rank, **options)
        return torch.from_numpy(to_uint8(images)).reshape(stop - start, -1)

    flat = sharded_rows(num, batch_size, math.prod(shape), draw, accelerator,
                        desc="samples" if progress and several else "", dtype=torch.uint8, main_only=True,
                        leave=True)  # the count of images drawn stays on screen, as before
    out_labels = (label_tensor.numpy() if label_tensor is not None else np.full(num, -1)).astype(np.int64)
    return None if flat is None else flat.reshape(num, *shape), out_labels


def write_outputs(out: str, images: np.ndarray, labels: np.ndarray) -> list[Path]:
    files = output_files(out)
    written = []
    if ".png" in files:
        png = files[".png"]
        classes = len(np.unique(labels))
        # --labels all cycles 0..K-1, so K images per row puts one class in each column
        nrow = classes if 1 < classes <= 20 else int(math.ceil(math.sqrt(len(images))))
        scale = max(1, min(8, 64 // images.shape[1]))
        save_png(png, grid_image(images, nrow, scale=scale))
        written.append(png)
    if ".npz" in files:
        save_npz(files[".npz"], images, labels)
        written.append(files[".npz"])
    return written


def inpaint_task(run_dir: str, images_path: str, masks_path: str, out: str, seed: int = 0,
                 batch_size: int = 250, device: str | None = None, options: dict | None = None) -> list[Path]:
    """``--task inpaint``: fill the holes of the --input images under the --mask masks (.npz files,
    or one image and one black-and-white mask picture) and write ``out`` (``options``: RePaint's
    settings for diffusion runs, see genscale.inpainting.task_options)."""
    from genscale.inpainting import can_inpaint, load_inpainting_inputs, run_inpainting, task_options

    files = output_files(out)
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    images, masks = load_inpainting_inputs(images_path, masks_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    family, info, _ = load_family(run_dir, device)
    if not can_inpaint(family):
        raise UserError(f"the run {run_dir} ({family.name}) cannot fill holes; use an inpainting model "
                        "(inpaint, gan-inpaint, transformer) or a ddpm run (RePaint)")
    task_options(family, options)  # RePaint's settings checked (refused for a network) before any work
    if images.shape[1:3] == (info.image_size, info.image_size):  # colour <-> grey, as the other tasks convert
        from genscale.applications.inputs import fit_channels

        images = fit_channels(images, info.channels, f"--input {images_path}")  # the grid shows these
    filled = run_inpainting(family, images, masks, info.image_size, info.channels, seed, batch_size, options)
    written = []
    if ".png" in files:
        shown = np.where(masks[..., None] == 1, images, 255).astype(np.uint8)  # holes shown white
        pairs = np.stack([shown, filled], 1).reshape(-1, *images.shape[1:])
        scale = max(1, min(8, 64 // images.shape[1]))
        save_png(files[".png"], grid_image(pairs, 8 if len(images) >= 4 else 2, scale=scale))
        written.append(files[".png"])
    if ".npz" in files:
        save_npz(files[".npz"], filled)
        written.append(files[".npz"])
    return written


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="genscale/sample.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run folder written by train.py")
    parser.add_argument("--task", choices=["sample", *TASKS], default="sample",
                        help="sample (default); inpaint (with --input and --mask); denoise, img2img, anagram, "
                             "hybrid on diffusion runs")
    parser.add_argument("--input", help="IMAGES.npz (arr_0 uint8 N x H x W x C) or one image (.png, .jpg, .jpeg, "
                                        ".webp); denoise and img2img default to the first --num held-out images")
    parser.add_argument("--mask", help="--task inpaint: MASKS.npz (arr_0 uint8 N x H x W, 1 = known, 0 = hole) or "
                                       "one black-and-white image (white = known) for every input image")
    parser.add_argument("--num", type=int, default=None, help=f"number of samples (default {DEFAULT_NUM})")
    parser.add_argument("--labels", default=None, help="'all', one class '3', or a list '0,1,2'")
    parser.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None,
                        help="ddim, ddpm (ancestral) or dpm++2m (DPM-Solver++: good in 10-20 steps); default the run's")
    parser.add_argument("--sampling-steps", type=int, default=None,
                        help="model calls of ddim and dpm++2m, or with --sampler ddpm the respaced ancestral "
                             "steps (default all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--out", required=True, help="FILE.png (grid), FILE.npz (arrays) or FILE (both)")
    add_task_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        raise UserError("", exit_code=int(exit_.code or 0)) from None
    if not 0 <= args.seed < 2**63:  # torch's generators overflow past 64 bits (a traceback)
        raise UserError(f"--seed must be between 0 and 2**63 - 1, got {args.seed}")
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)  # set by accelerate launch / torchrun
    if args.task != "sample" and world_size > 1:
        raise UserError(f"--task {args.task} runs in one process; start it with python, not a launch of "
                        f"{world_size} processes (plain sampling is the part shared across processes)")
    if args.task != "sample":
        for path in run_task(args):
            print(f"wrote {path}")
        return 0
    if args.input or args.mask:
        raise UserError("--input and --mask go with the tasks (--task inpaint, denoise, img2img)")
    stray = task_flags_given(args)
    if stray:  # e.g. --steps typed for --sampling-steps: plain sampling would ignore it
        raise UserError(f"{', '.join(stray)} go{'es' if len(stray) == 1 else ''} with the tasks (--task ...); "
                        "plain sampling takes --sampler and --sampling-steps")
    output_files(args.out)  # checked before sampling, not after it
    accelerator = None
    if world_size > 1:  # the batches are shared across the processes and gathered; rank 0 writes
        from genscale.launch import new_accelerator

        accelerator = new_accelerator()
    num = DEFAULT_NUM if args.num is None else args.num
    images, labels = generate(args.run, num, args.labels, args.seed, args.cfg_scale, args.sampler,
                              args.sampling_steps, args.batch_size, progress=True, accelerator=accelerator)
    if images is not None:  # the main rank's (the others drew their share and handed it over)
        for path in write_outputs(args.out, images, labels):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    run_main(main, memory_hint="use a smaller --batch-size (or --num)")
