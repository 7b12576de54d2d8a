"""The one inpainting interface of every family that fills holes, and the task sample.py runs.

A family that can inpaint has ``inpaint(images, masks[, generator]) -> filled images``:
images float N x C x H x W in [-1, 1], masks N x 1 x H x W with 1 = known pixel, 0 = hole, and
the result keeps every known pixel bit for bit (``composite``). ``run_inpainting`` is
``sample.py --task inpaint``: uint8 N x H x W x C images and uint8 N x H x W masks in, uint8
filled images out, with the known pixels copied from the input in the uint8 domain so that
no rounding can touch them.

Diffusion runs inpaint too: a ddpm run fills holes with RePaint (genscale.applications.repaint,
settings in ``options``: steps, jump_length, jump_count, labels, cfg_scale). An ldm run cannot:
its masks would have to act on latents, which do not map 1:1 onto pixels.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import torch

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
    """RePaint on a diffusion run; ``options`` as in the module docstring (labels: sample.py's spec)."""
    from genscale.applications.model import DiffusionModel
    from genscale.applications.repaint import repaint

    dm = DiffusionModel(family, "inpaint")
    dm.require_pixels("inpaint")
    opts = dict(options or {})
    labels = opts.pop("labels", None)
    if labels not in (None, "") and dm.num_classes:
        from genscale.sample import parse_labels

        labels = parse_labels(labels, images.shape[0], dm.num_classes).to(dm.device)
    else:
        labels = None
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


def load_inpainting_inputs(images_path: str, masks_path: str) -> tuple[np.ndarray, np.ndarray]:
    """IMAGES.npz arr_0 uint8 N x H x W x C (or N x H x W) and MASKS.npz arr_0 uint8 N x H x W of 0/1."""
    images, masks = _load_array(images_path, "--input"), _load_array(masks_path, "--mask")
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise UserError(f"--input arr_0 must be uint8 N x H x W x C, got {images.dtype} {images.shape}")
    if images.ndim == 3:
        images = images[..., None]
    if masks.ndim == 4 and masks.shape[-1] == 1:
        masks = masks[..., 0]
    if masks.shape != images.shape[:3]:
        raise UserError(f"--mask arr_0 must be N x H x W matching the images {images.shape[:3]}, got {masks.shape}")
    if not np.isin(masks, (0, 1)).all():
        raise UserError("--mask values must be 1 (known pixel) or 0 (hole)")
    return images, masks.astype(np.uint8)


def run_inpainting(family, images: np.ndarray, masks: np.ndarray, image_size: int, channels: int,
                   seed: int = 0, batch_size: int = 250, options: dict | None = None) -> np.ndarray:
    """Fill the holes of uint8 NHWC ``images`` under uint8 NHW ``masks`` (1 = known) with ``family``."""
    if images.shape[1:] != (image_size, image_size, channels):
        raise UserError(f"the run works on {image_size} x {image_size} x {channels} images, "
                        f"got {' x '.join(map(str, images.shape[1:]))}")
    from genscale.run_files import to_uint8

    device = family.device
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start:start + batch_size]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        m = torch.from_numpy(masks[start:start + batch_size]).to(device)[:, None].float()
        filled = call_inpaint(family, x, m, gen, options)
        if filled.shape != x.shape:
            raise UserError(f"{family.name}.inpaint returned shape {tuple(filled.shape)} for images {tuple(x.shape)}")
        out.append(to_uint8(filled))
    filled = np.concatenate(out) if out else images.copy()
    return np.where(masks[..., None] == 1, images, filled)  # known pixels: the input's bytes
