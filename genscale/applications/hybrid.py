"""``--task hybrid`` (factorized diffusion, as in hybrid images of Oliva et al.): an image whose
low frequencies read as one class and its high frequencies as another. At each step
eps = lowpass(eps_hat(x_t, c_low)) + highpass(eps_hat(x_t, c_high)), a Gaussian filter of
``sigma`` pixels; both predictions come from one batched, guided model call.
"""
from __future__ import annotations

import torch

from genscale.applications.filters import highpass, lowpass
from genscale.applications.model import DiffusionModel
from genscale.diffusion.samplers import randn, strided_timesteps
from genscale.errors import UserError


def hybrid_eps(dm: DiffusionModel, low_class: int, high_class: int, sigma: float, cfg_scale: float):
    def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        n = x.shape[0]
        labels = torch.tensor([low_class] * n + [high_class] * n, device=x.device)
        eps_low, eps_high = dm.eps(torch.cat([x, x]), t, labels, cfg_scale).chunk(2)
        return lowpass(eps_low, sigma) + highpass(eps_high, sigma)
    return eps_fn


@torch.no_grad()
def hybrid(dm: DiffusionModel, n: int, low_class: int, high_class: int, *, sigma: float = 1.0,
           cfg_scale: float = 3.0, steps: int = 50, eta: float = 0.0,
           generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """``n`` hybrid images (N x C x H x W in [-1, 1])."""
    dm.require_pixels("hybrid")
    if dm.num_classes == 0:
        raise UserError("--task hybrid needs a class-conditional run (one class per frequency band)")
    dm.labels(torch.tensor([low_class, high_class]), 2)  # range check
    lowpass(torch.zeros(1, 1, 2, 2), sigma)  # sigma check before any model call
    x = randn((n, *dm.family.shape), generator, dm.device)
    x, _ = dm.reverse(x, strided_timesteps(dm.timesteps, steps), hybrid_eps(dm, low_class, high_class, sigma,
                                                                              cfg_scale),
                      eta=eta, generator=generator, progress=progress)
    return x.clamp(-1, 1)
