"""``--task img2img`` (SDEdit, Meng et al.): noise a guide image to a level, then run the
reverse process from there with classifier-free guidance toward a class.

A level is a fraction of the T timesteps: level l starts at timestep round(l T) - 1, and level
0 returns the guide untouched. Every level reuses the same noise draw, so the levels differ only
in how much of it they add; the reverse process takes ``steps`` strided steps over the whole
range, i.e. about ``steps * l`` from level l.
"""
from __future__ import annotations

import math

import torch

from genscale.applications.model import DiffusionModel, guided_eps_fn
from genscale.diffusion.samplers import randn, strided_timesteps
from genscale.errors import UserError


def level_timestep(level: float, timesteps: int) -> int | None:
    """The timestep a level starts from, or None for level 0 (no noise, no steps)."""
    if not 0.0 <= level <= 1.0:
        raise UserError(f"noise levels must lie between 0 and 1, got {level}")
    k = round(level * timesteps)
    return None if k == 0 else min(k, timesteps) - 1


def parse_levels(spec: str) -> list[float]:
    try:
        levels = [float(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--levels must be comma-separated fractions of T such as 0.2,0.4,0.6, got {spec!r}") from None
    if not levels:
        raise UserError("--levels needs at least one noise level")
    for level in levels:
        level_timestep(level, 2)
    return levels


@torch.no_grad()
def sdedit(dm: DiffusionModel, images: torch.Tensor, levels: list[float], *, labels: torch.Tensor | None = None,
           cfg_scale: float = 1.0, steps: int = 50, eta: float = 0.0,
           generator: torch.Generator | None = None, progress: bool = False) -> list[torch.Tensor]:
    """One batch of edited images per level (images N x C x H x W in [-1, 1]); ``steps`` (at most T)
    spread over the whole range; ``progress`` shows a bar over each level's steps."""
    if not 1 <= steps <= dm.timesteps:
        raise UserError(f"--steps must be between 1 and {dm.timesteps}, got {steps}")
    guide = images.to(dm.device, torch.float32)
    z0 = dm.encode(guide, generator)
    noise = randn(z0.shape, generator, dm.device)
    eps_fn = guided_eps_fn(dm, labels, cfg_scale)
    out = []
    for level in levels:
        t0 = level_timestep(level, dm.timesteps)
        if t0 is None:
            out.append(guide.clone())
            continue
        n_steps = min(t0 + 1, max(1, math.ceil(steps * (t0 + 1) / dm.timesteps)))
        z, _ = dm.reverse(dm.q_sample(z0, t0, noise), strided_timesteps(t0 + 1, n_steps), eps_fn, eta=eta,
                          generator=generator, progress=progress)
        out.append(dm.decode(z))
    return out


def distances(edits: list[torch.Tensor], guide: torch.Tensor) -> list[float]:
    """Root mean squared distance of each level's edits to the guide (pixels, range [-1, 1])."""
    g = guide.double().cpu()
    return [float((e.double().cpu() - g).square().mean().sqrt()) for e in edits]
