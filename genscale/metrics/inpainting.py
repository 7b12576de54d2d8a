"""Hole PSNR of an inpainting run against the classical baseline on the same images and masks.

For each held-out image a mask is drawn (genscale.data.masks, 1 = known, 0 = hole) from a
generator seeded by (seed, chunk), the run fills the holes through ``family.inpaint(images,
masks[, generator])`` (RePaint for a ddpm run, genscale.inpainting.call_inpaint) and scikit-image's ``inpaint_biharmonic`` fills the same holes. The score
is the PSNR over all hole pixels together: 10 log10(2^2 / MSE) in the [-1, 1] range, MSE pooled
over every hole pixel of every image (a per-image mean would be +inf as soon as one hole lies
entirely on a flat background that a model fills exactly).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from genscale.errors import UserError
from genscale.metrics.sharded import MASKS, ChunkFn, chunk_generator

DATA_RANGE = 2.0


def check_inpainting_family(family) -> None:
    from genscale.inpainting import can_inpaint

    if not can_inpaint(family):
        raise UserError(f"--metric psnr needs an inpainting run (inpaint, gan-inpaint, transformer, or a ddpm "
                        f"run through RePaint); {getattr(family, 'name', type(family).__name__)} cannot fill holes.")


def biharmonic_fill(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """scikit-image's biharmonic inpainting of [-1, 1] N x C x H x W images; known pixels kept."""
    from skimage.restoration import inpaint_biharmonic

    out = []
    for x, m in zip(images.double().cpu().numpy(), masks.cpu().numpy()):
        hole = m[0] < 0.5
        filled = inpaint_biharmonic(np.moveaxis(x, 0, -1), hole, channel_axis=-1)
        out.append(np.where(hole[None], np.moveaxis(filled, -1, 0), x))
    return torch.from_numpy(np.stack(out)).float()


def hole_errors(pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the sum of squared errors over the holes (float64) and the number of hole values."""
    holes = (masks < 0.5).double().expand_as(target)
    err = (pred.double().cpu() - target.double().cpu()) ** 2 * holes
    dims = tuple(range(1, err.ndim))
    return err.sum(dim=dims), holes.sum(dim=dims)


def pooled_psnr(sse: np.ndarray | float, count: np.ndarray | float) -> float:
    """PSNR (dB, range [-1, 1]) of the MSE pooled over all hole values."""
    mse = float(np.sum(sse)) / float(np.sum(count))
    return math.inf if mse == 0 else 10 * math.log10(DATA_RANGE**2 / mse)


def inpainting_rows(family, images: np.ndarray, mask_kind: str, seed: int) -> ChunkFn:
    """Chunk -> rows [model SSE, biharmonic SSE, hole values, known values the model changed]
    for uint8 NHWC test ``images`` (the last is 0 for a filler that keeps known pixels bit for bit)."""
    from genscale.data.masks import random_masks
    from genscale.inpainting import call_inpaint

    def rows(k: int, start: int, stop: int) -> torch.Tensor:
        x = torch.from_numpy(images[start:stop]).permute(0, 3, 1, 2).float() / 127.5 - 1
        gen = chunk_generator(seed, k, MASKS)
        masks = random_masks(mask_kind, len(x), tuple(x.shape[-2:]), generator=gen)
        filled = call_inpaint(family, x, masks, gen).float().cpu()
        if filled.shape != x.shape:
            raise UserError(f"{family.name}.inpaint returned shape {tuple(filled.shape)} for images {tuple(x.shape)}.")
        model_sse, count = hole_errors(filled, x, masks)
        base_sse, _ = hole_errors(biharmonic_fill(x, masks), x, masks)
        known = (masks > 0.5).expand_as(x)
        changed = ((filled != x) & known).flatten(1).sum(1).double()
        return torch.stack([model_sse, base_sse, count, changed], 1)

    return rows


def psnr_result(rows: np.ndarray, values_per_image: int, mask_kind: str, description: str) -> dict:
    """The report of ``inpainting_rows`` gathered over all images."""
    return {
        "psnr": pooled_psnr(rows[:, 0], rows[:, 2]),
        "psnr_biharmonic": pooled_psnr(rows[:, 1], rows[:, 2]),
        "num": int(len(rows)),
        "hole_fraction": float(rows[:, 2].sum() / (len(rows) * values_per_image)),
        "known_changed": int(rows[:, 3].sum()),
        "known_values": int(len(rows) * values_per_image - rows[:, 2].sum()),
        "mask": mask_kind,
        "reference": description,
    }
