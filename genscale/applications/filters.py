"""Gaussian low-pass and its complement, the high-pass, for hybrid images.

The kernel is a sampled Gaussian normalised to sum to one (so a constant image passes the
low-pass unchanged), applied separably with reflect padding (so the borders are not darkened);
the high-pass is x - lowpass(x), so low + high is x exactly up to one rounding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from genscale.errors import UserError


def gaussian_kernel1d(sigma: float, radius: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sampled 1-D Gaussian of standard deviation ``sigma`` over [-radius, radius], summing to 1."""
    if not sigma > 0:
        raise UserError(f"the Gaussian filter's sigma must be positive, got {sigma}")
    radius = max(1, math.ceil(3 * sigma)) if radius is None else radius
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(dtype)


def lowpass(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of N x C x H x W ``x``; the kernel is cut to fit the image (reflect padding)."""
    h, w = x.shape[-2:]
    radius = min(max(1, math.ceil(3 * sigma)), h - 1, w - 1)
    k = gaussian_kernel1d(sigma, radius, x.dtype).to(x.device)
    n, c = x.shape[:2]
    y = x.reshape(n * c, 1, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    return y.reshape(n, c, h, w)


def highpass(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """x - lowpass(x): what the low-pass removes."""
    return x - lowpass(x, sigma)
