"""The one inpainting interface of every family that fills holes, and the task sample.py runs.

A family that can inpaint has ``inpaint(images, masks[, generator]) -> filled images``:
images float N x C x H x W in [-1, 1], masks N x 1 x H x W with 1 = known pixel, 0 = hole, and
the result keeps every known pixel bit for bit (``composite``). ``run_inpainting`` is
``sample.py --task inpaint``: uint8 N x H x W x C images and uint8 N x H x W masks in (from
.npz files, or one image and one black-and-white mask picture), uint8 filled images out, with
the known pixels copied from the input in the uint8 domain so that no rounding can touch them.

Diffusion runs inpaint too: a ddpm run fills holes with RePaint (genscale.applications.repaint,
settings in ``options``: steps, jump_length, jump_count, labels, cfg_scale). An ldm run cannot:
its masks would have to act on latents, which do not map 1:1 onto pixels.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from genscale.errors import UserError


def composite(image: torch.Tensor, prediction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Known pixels (mask 1) from ``image`` exactly, holes from ``prediction``."""
    return torch.where(mask.expand_as(image) > 0.5, image, prediction.to(image.dtype))


def check_masks(images: torch.Tensor, masks: torch.Tensor) -> None:
    if (masks.ndim != 4 or masks.shape[1] != 1 or masks.shape[0] != images.shape[0]
            or masks.shape[-2:] != images.shape[-2:]):
        raise UserError(f"masks must be N x 1 x H x W matching the images, got {tuple(masks.shape)} "
                        f"for images {tuple(images.shape)}")


def centre_box_masks(n: int, size: int | tuple[int, int], frac: float = 0.5,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` identical masks with one centred square hole of ``frac`` of each side (1 = known)."""
    from genscale.data.masks import centre_masks

    return centre_masks(n, size, frac=frac, device=device)


DIFFUSION_INPAINTERS = ("ddpm", "ldm")  # RePaint (ldm refused with a reason in call_inpaint)


def is_diffusion(family) -> bool:
    """A ddpm/ldm family (with its noise schedule): it inpaints by RePaint."""
    return getattr(family, "name", "") in DIFFUSION_INPAINTERS and hasattr(family, "schedule")


def can_inpaint(family) -> bool:
    """Inpainting runs, and pixel-space diffusion through RePaint (masks do not map onto an ldm's latents)."""
    pixel_diffusion = is_diffusion(family) and getattr(family, "name", "") != "ldm"
    return callable(getattr(family, "inpaint", None)) or pixel_diffusion


def repaint_fill(family, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator | None = None,
                 options: dict | None = None) -> torch.Tensor:
    """RePaint on a diffusion run; ``options`` as in the module docstring (labels: sample.py's spec,
    or one label per image as a tensor)."""
    from genscale.applications.model import DiffusionModel
    from genscale.applications.repaint import repaint

    dm = DiffusionModel(family, "inpaint")
    dm.require_pixels("inpaint")
    opts = dict(options or {})
    labels = opts.pop("labels", None)
    if labels in (None, ""):
        labels = None
    elif isinstance(labels, str):  # sample.py's spec; an unconditional run refuses it (parse_labels says so)
        from genscale.sample import parse_labels

        labels = parse_labels(labels, images.shape[0], dm.num_classes)
    labels = None if labels is None else labels.to(dm.device)
    cfg = opts.pop("cfg_scale", None)
    cfg = (dm.default_cfg if labels is not None else 1.0) if cfg is None else cfg
    check_masks(images, masks)
    return repaint(dm, images, masks, labels=labels, cfg_scale=cfg, generator=generator, **opts)


def call_inpaint(family, images: torch.Tensor, masks: torch.Tensor,
                 generator: torch.Generator | None = None, options: dict | None = None) -> torch.Tensor:
    """``family.inpaint`` with the generator when it takes one (stochastic fillers need it);
    RePaint (with ``options``) for diffusion runs."""
    if is_diffusion(family):
        return repaint_fill(family, images, masks, generator, options)
    if not can_inpaint(family):
        raise UserError(f"model {getattr(family, 'name', type(family).__name__)} cannot fill holes; "
                        "inpainting runs: inpaint, gan-inpaint, transformer")
    if "generator" in inspect.signature(family.inpaint).parameters:
        return family.inpaint(images, masks, generator=generator)
    return family.inpaint(images, masks)


def _load_array(path: str, what: str) -> np.ndarray:
    if Path(path).is_dir():
        raise UserError(f"{what} {path} is a folder, not a file")
    if not Path(path).is_file():
        raise UserError(f"{what} file {path} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):  # a .npy holds one bare array
            raise UserError(f"{what} file {path} is a single array; save it with numpy.savez (as arr_0)")
        with data:
            if "arr_0" not in data:
                raise UserError(f"{what} file {path} has no arr_0 array")
            return data["arr_0"]
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - numpy raises OSError, ValueError, EOFError, BadZipFile ...
        raise UserError(f"{what} file {path} is not a readable .npz") from None


def _is_image_file(path: str) -> bool:
    from genscale.applications.inputs import IMAGE_SUFFIXES

    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _read_image(path: str, what: str) -> np.ndarray:
    """One image file as uint8 1 x H x W x C, decoded as the training data is."""
    from genscale.applications.inputs import input_file, read_image_file

    return read_image_file(input_file(path, what), what)[None]


def _mask_from_image(path: str) -> np.ndarray:
    """A mask picture as 1 x H x W of 1 (known: light, grey level 128 and up) and 0 (hole: dark);
    a picture holding only the values 0 and 1 is taken as they are. Thresholding, not exact black
    and white: a JPEG or a smoothed drawing has grey levels along its edges."""
    from genscale.applications.inputs import fit_channels

    grey = fit_channels(_read_image(path, "--mask"), 1, f"--mask {path}")[..., 0]
    if set(np.unique(grey).tolist()) <= {0, 1}:
        return grey
    return (grey >= 128).astype(np.uint8)


def load_inpainting_inputs(images_path: str, masks_path: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x H x W x C images and N x H x W masks of 0/1 (1 = known).

    Images: IMAGES.npz (arr_0 uint8 N x H x W x C or N x H x W) or one image file (.png, .jpg,
    .jpeg, .webp, decoded as the training data is). Masks: MASKS.npz (arr_0 uint8 N x H x W of
    0/1), or one black-and-white MASK image (white = known) applied to every image.
    """
    if _is_image_file(images_path):
        images = _read_image(images_path, "--input")
    else:
        images = _load_array(images_path, "--input")
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise UserError(f"--input arr_0 must be uint8 N x H x W x C, got {images.dtype} {images.shape}")
        if len(images) == 0:  # nothing to fill: would write empty files
            raise UserError(f"--input {images_path} holds no images (arr_0 has shape {images.shape})")
    if images.ndim == 3:
        images = images[..., None]
    if _is_image_file(masks_path):
        masks = np.repeat(_mask_from_image(masks_path), len(images), 0)
    else:
        masks = _load_array(masks_path, "--mask")
    if masks.ndim == 4 and masks.shape[-1] == 1:
        masks = masks[..., 0]
    if masks.shape != images.shape[:3]:
        raise UserError(f"--mask arr_0 must be N x H x W matching the images {images.shape[:3]}, got {masks.shape}")
    if not np.isin(masks, (0, 1)).all():
        raise UserError("--mask values must be 1 (known pixel) or 0 (hole)")
    return images, masks.astype(np.uint8)


# RePaint's settings for sample.py --task inpaint, and their defaults there (docs/applications.md).
REPAINT_DEFAULTS = dict(steps=100, jump_length=10, jump_count=10)
REPAINT_FLAGS = dict(steps="--steps", jump_length="--jump-length", jump_count="--jump-count", labels="--labels",
                     cfg_scale="--cfg-scale")


def task_options(family, options: dict | None) -> dict:
    """RePaint's settings for ``family``: the given ones over the task's defaults on a diffusion run
    (--steps between 1 and T); on an inpainting network, which has none, a given one is refused."""
    options = {key: value for key, value in (options or {}).items() if value is not None}  # None: not given
    given = [flag for key, flag in REPAINT_FLAGS.items() if key in options]
    if not is_diffusion(family):
        if given:  # an inpainting network would ignore them
            raise UserError(f"{', '.join(given)} apply to RePaint on diffusion runs; this run's network "
                            f"({getattr(family, 'name', '')}) fills holes in one pass without them")
        return options
    timesteps = family.schedule.timesteps
    if "steps" in options and not 1 <= options["steps"] <= timesteps:
        raise UserError(f"--steps must be between 1 and {timesteps}, got {options['steps']}")
    return {**REPAINT_DEFAULTS, "steps": min(REPAINT_DEFAULTS["steps"], timesteps), **options}


def run_inpainting(family, images: np.ndarray, masks: np.ndarray, image_size: int, channels: int,
                   seed: int = 0, batch_size: int = 250, options: dict | None = None) -> np.ndarray:
    """Fill the holes of uint8 NHWC ``images`` under uint8 NHW ``masks`` (1 = known) with ``family``.

    Batch k (``batch_size`` images) draws from the generator seeded by (``seed``, k), so a seed
    gives the same output at the same batch size. ``options``: RePaint's settings (see
    ``task_options``); ``progress`` in them shows a bar (over the images when there are several
    batches, else over RePaint's steps).
    """
    from genscale.applications.inputs import fit_channels
    from genscale.metrics.sharded import chunk_generator
    from genscale.run_files import to_uint8

    if images.shape[1:3] == (image_size, image_size):  # colour <-> grey as the other tasks convert
        images = fit_channels(images, channels, "--input")
    if images.shape[1:] != (image_size, image_size, channels):
        raise UserError(f"the run works on {image_size} x {image_size} x {channels} images, "
                        f"got {' x '.join(map(str, images.shape[1:]))}")
    options = dict(options or {})
    progress = options.pop("progress", False)
    options = task_options(family, options)
    several = len(images) > batch_size
    labels = options.get("labels")
    if is_diffusion(family):
        options["progress"] = progress and not several
        if labels not in (None, ""):  # one label per image, cycled over all of them, not restarted per batch
            from genscale.sample import parse_labels

            labels = parse_labels(labels, len(images), int(family.num_classes))
    device = family.device
    out = []
    bar = tqdm(total=len(images), desc="inpaint", disable=not (progress and several), leave=False,
               dynamic_ncols=True)
    for k, start in enumerate(range(0, len(images), batch_size)):
        x = torch.from_numpy(images[start:start + batch_size]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        m = torch.from_numpy(masks[start:start + batch_size]).to(device)[:, None].float()
        if torch.is_tensor(labels):
            options["labels"] = labels[start:start + batch_size]
        filled = call_inpaint(family, x, m, chunk_generator(seed, k), options)
        if filled.shape != x.shape:
            raise UserError(f"{family.name}.inpaint returned shape {tuple(filled.shape)} for images {tuple(x.shape)}")
        out.append(to_uint8(filled))
        bar.update(len(x))
    bar.close()
    filled = np.concatenate(out) if out else images.copy()
    return np.where(masks[..., None] == 1, images, filled)  # known pixels: the input's bytes
