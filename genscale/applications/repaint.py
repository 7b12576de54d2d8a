"""RePaint (Lugmayr et al. 2022): inpainting with an unconditionally trained diffusion model.

At every reverse step the hole pixels come from the model's ancestral step and the known pixels
from a fresh forward-noised copy of the original at the new timestep, so the two halves always
share a noise level. Resampling: at every ``jump_length``-th position the process goes back up
``jump_length`` positions by forward noising (x_b = sqrt(abar_b / abar_a) x_a +
sqrt(1 - abar_b / abar_a) z, the paper's per-step sqrt(1 - beta) x + sqrt(beta) z composed) and
down again, ``jump_count - 1`` times, so the model harmonises the hole with its surroundings.
Positions index ``steps`` strided timesteps (the paper uses T = 250 steps, jumps 10 and 10).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from genscale.applications.model import DiffusionModel
from genscale.diffusion.samplers import ddim_step, randn, strided_timesteps
from genscale.errors import UserError


def repaint_schedule(steps: int, jump_length: int = 10, jump_count: int = 10) -> list[int]:
    """The positions visited, from ``steps - 1`` (pure noise) to -1 (clean), with the jumps.

    A jump point is every position p = 0, j, 2j, ... below ``steps - j``; each is left upward
    ``jump_count - 1`` times by ``j`` forward steps before the walk passes it for good.
    """
    if steps < 1 or jump_length < 1 or jump_count < 1:
        raise UserError("RePaint needs --steps, --jump-length and --jump-count of at least 1")
    remaining = {p: jump_count - 1 for p in range(0, steps - jump_length, jump_length)}
    path, p = [steps - 1], steps - 1
    while p > 0:
        p -= 1
        path.append(p)
        if remaining.get(p, 0) > 0:
            remaining[p] -= 1
            path.extend(range(p + 1, p + jump_length + 1))
            p += jump_length
    path.append(-1)
    return path


@torch.no_grad()
def repaint(dm: DiffusionModel, images: torch.Tensor, masks: torch.Tensor, *, steps: int = 250,
            jump_length: int = 10, jump_count: int = 10, labels: torch.Tensor | None = None,
            cfg_scale: float = 1.0, generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """Fill the holes (mask 0) of ``images`` in [-1, 1]; known pixels come back as the input's.
    ``progress`` shows a bar over the walk (about steps x jump_count model calls)."""
    dm.require_pixels("inpaint")
    x0 = images.to(dm.device, torch.float32)
    m = masks.to(dm.device, torch.float32).expand_as(x0)
    steps = min(steps, dm.timesteps)
    grid = strided_timesteps(dm.timesteps, steps)[::-1]  # position -> timestep, ascending
    path = repaint_schedule(steps, jump_length, jump_count)

    def known_at(p: int) -> torch.Tensor:
        return x0 if p < 0 else dm.q_sample(x0, grid[p], randn(x0.shape, generator, dm.device))

    x = randn(x0.shape, generator, dm.device)
    x = m * known_at(path[0]) + (1 - m) * x
    for a, b in tqdm(list(zip(path[:-1], path[1:])), desc="RePaint", disable=not progress, leave=False):
        abar_a = dm.abar(grid[a])
        if b < a:  # one reverse step, then the known pixels at the new level
            eps = dm.eps(x, grid[a], labels, cfg_scale)
            abar_b = dm.abar(grid[b] if b >= 0 else -1)
            noise = randn(x.shape, generator, dm.device) if b >= 0 else None
            x = ddim_step(x, eps, noise, abar_a, abar_b, 1.0, dm.clip_x0)
            x = torch.where(m > 0.5, known_at(b), x)
        else:  # resampling jump: forward-noise one position up
            ratio = dm.abar(grid[b]) / abar_a
            x = ratio.sqrt().float() * x + (1 - ratio).sqrt().float() * randn(x.shape, generator, dm.device)
    return torch.where(m > 0.5, x0, x.clamp(-1, 1))
