"""Inpainting masks: random boxes, brush strokes, scattered pixels, and the fixed centre box
(1 = known pixel, 0 = hole).

Every function returns float32 N x 1 x H x W of exact zeros and ones. All randomness comes
from the ``generator`` argument (a CPU ``torch.Generator``; None = torch's global RNG, which a
training run checkpoints), so the same seed gives the same masks on any machine. Masks are
made on the CPU and moved to ``device`` at the end. Every mask has at least one hole pixel
and at least one known pixel.
"""
from __future__ import annotations

import math

import torch

from genscale.errors import UserError

MASK_KINDS = ("box", "stroke", "pixel", "mixed", "centre")


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    if h < 2 or w < 2:
        raise UserError(f"masks need images of at least 2x2 pixels, got {h}x{w}")
    return int(h), int(w)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def box_masks(n: int, size: int | tuple[int, int], generator: torch.Generator | None = None,
              min_frac: float = 0.25, max_frac: float = 0.5,
              device: torch.device | str | None = None) -> torch.Tensor:
    """One axis-aligned rectangular hole per mask; each side is min_frac..max_frac of the image side."""
    h, w = _size(size)
    if not 0 < min_frac <= max_frac < 1:
        raise UserError(f"box sides must satisfy 0 < min_frac <= max_frac < 1, got {min_frac}, {max_frac}")
    bh = (_uniform(n, min_frac, max_frac, generator) * h).round().clamp(1, h - 1).long()
    bw = (_uniform(n, min_frac, max_frac, generator) * w).round().clamp(1, w - 1).long()
    top = (torch.rand(n, generator=generator, dtype=torch.float64) * (h - bh + 1)).floor().long()
    left = (torch.rand(n, generator=generator, dtype=torch.float64) * (w - bw + 1)).floor().long()
    rows = torch.arange(h)[None, :, None]
    cols = torch.arange(w)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + bh)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + bw)[:, None, None]))
    return (~inside).float()[:, None].to(device)


def _segment_distance(py: torch.Tensor, px: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance from every pixel centre (py, px) to the segment a-b (points as (y, x))."""
    d = b - a
    length2 = float((d * d).sum())
    if length2 == 0.0:
        t = torch.zeros_like(py)
    else:
        t = (((py - a[0]) * d[0] + (px - a[1]) * d[1]) / length2).clamp(0, 1)
    return torch.hypot(py - (a[0] + t * d[0]), px - (a[1] + t * d[1]))


def stroke_masks(n: int, size: int | tuple[int, int], generator: torch.Generator | None = None,
                 max_strokes: int = 4, max_vertices: int = 5,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Free-form brush strokes: 1..max_strokes polylines of 2..max_vertices points drawn with a round brush.

    Segment lengths are 10-40% of the image side and brush radii 3-8% of it (at least one
    pixel, so every stroke covers the pixel nearest its start). A stroke that would leave no
    known pixel is impossible at these sizes but guarded anyway.
    """
    h, w = _size(size)
    side = min(h, w)
    py = torch.arange(h, dtype=torch.float64)[:, None].expand(h, w) + 0.5
    px = torch.arange(w, dtype=torch.float64)[None, :].expand(h, w) + 0.5
    masks = torch.ones(n, 1, h, w)
    for i in range(n):
        hole = torch.zeros(h, w, dtype=torch.bool)
        strokes = int(torch.randint(1, max_strokes + 1, (1,), generator=generator))
        for _ in range(strokes):
            vertices = int(torch.randint(2, max_vertices + 1, (1,), generator=generator))
            radius = max(1.0, float(_uniform(1, 0.03, 0.08, generator)) * side)
            point = torch.rand(2, generator=generator, dtype=torch.float64) * torch.tensor([h, w], dtype=torch.float64)
            angle = float(_uniform(1, 0, 2 * math.pi, generator))
            for _ in range(vertices - 1):
                angle += float(_uniform(1, -math.pi / 2, math.pi / 2, generator))  # a bend of up to 90 degrees
                length = float(_uniform(1, 0.1, 0.4, generator)) * side
                nxt = point + length * torch.tensor([math.sin(angle), math.cos(angle)], dtype=torch.float64)
                nxt = torch.stack([nxt[0].clamp(0, h), nxt[1].clamp(0, w)])
                hole |= _segment_distance(py, px, point, nxt) <= radius
                point = nxt
        if hole.all():
            hole[0, 0] = False
        masks[i, 0][hole] = 0.0
    return masks.to(device)


def pixel_masks(n: int, size: int | tuple[int, int], generator: torch.Generator | None = None,
                min_hole: float = 0.3, max_hole: float = 0.7,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Independent missing pixels: each mask draws a hole rate in [min_hole, max_hole], then every pixel."""
    h, w = _size(size)
    if not 0 < min_hole <= max_hole < 1:
        raise UserError(f"hole rates must satisfy 0 < min_hole <= max_hole < 1, got {min_hole}, {max_hole}")
    rate = _uniform(n, min_hole, max_hole, generator)[:, None, None, None]
    hole = torch.rand(n, 1, h, w, generator=generator, dtype=torch.float64) < rate
    # Guarantee at least one hole and one known pixel per mask (matters only for tiny images).
    flat = hole.view(n, -1)
    flat[~flat.any(1), 0] = True
    flat[flat.all(1), -1] = False
    return (~hole).float().to(device)


def centre_masks(n: int, size: int | tuple[int, int], generator: torch.Generator | None = None,
                 frac: float = 0.5, device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` identical masks with one centred hole of ``frac`` of each side (the classic
    context-encoder benchmark); ``generator`` is accepted for a uniform signature and unused."""
    h, w = _size(size)
    if not 0 < frac < 1:
        raise UserError(f"the centre hole must be a fraction of the side between 0 and 1, got {frac}")
    bh, bw = max(1, round(h * frac)), max(1, round(w * frac))
    top, left = (h - bh) // 2, (w - bw) // 2
    mask = torch.ones(n, 1, h, w)
    mask[:, :, top:top + bh, left:left + bw] = 0.0
    return mask.to(device)


def random_masks(kind: str, n: int, size: int | tuple[int, int], generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` masks of one kind (box, stroke, pixel, centre) or, for ``mixed``, each of a random
    kind among box, stroke and pixel."""
    if kind not in MASK_KINDS:
        raise UserError(f"unknown mask kind {kind!r}; choose one of {', '.join(MASK_KINDS)}")
    makers = {"box": box_masks, "stroke": stroke_masks, "pixel": pixel_masks, "centre": centre_masks}
    if kind != "mixed":
        return makers[kind](n, size, generator=generator, device=device)
    choice = torch.randint(0, 3, (n,), generator=generator)
    h, w = _size(size)
    out = torch.empty(n, 1, h, w)
    for k, name in enumerate(("box", "stroke", "pixel")):
        idx = (choice == k).nonzero().flatten()
        if len(idx):
            out[idx] = makers[name](len(idx), (h, w), generator=generator)
    return out.to(device)
