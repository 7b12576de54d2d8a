"""Peak signal-to-noise ratio, per image, optionally over a region (inpainting's holes)."""
from __future__ import annotations

import torch


def psnr(
    pred: torch.Tensor,
    target: torch.Tensor,
    region: torch.Tensor | None = None,
    data_range: float = 2.0,
) -> torch.Tensor:
    """PSNR in dB of each image in a batch: 10 log10(data_range^2 / MSE).

    ``pred`` and ``target``: N x C x H x W; the default ``data_range`` of 2 suits the harness's
    [-1, 1] images (use 255 for uint8). ``region`` (broadcastable to the images, 1 = counted)
    restricts the mean to some pixels: pass ``1 - mask`` to score inpainting on the holes only
    (masks are 1 = known). Identical images give +inf; an empty region gives NaN.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    err = (pred.double() - target.double()) ** 2
    dims = tuple(range(1, err.ndim))
    if region is None:
        mse = err.mean(dim=dims)
    else:
        weight = region.double().expand_as(err)
        mse = (err * weight).sum(dim=dims) / weight.sum(dim=dims)
    return 10 * torch.log10(data_range**2 / mse)
