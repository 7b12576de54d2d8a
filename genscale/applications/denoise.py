"""``--task denoise``: noise clean images to timestep t, then recover them three ways.

(a) Gaussian blur of the rescaled noisy image x_t / sqrt(abar_t) = x0 + sqrt(1/abar_t - 1) eps
    (the classical baseline; rescaling removes the shrinkage so the blur is not penalised for it),
(b) one step: x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t),
(c) iterative: the reverse process from t to 0 over ``steps`` strided timesteps.
PSNR is against the clean image, pooled over all pixels of all images (range [-1, 1]).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from genscale.applications.filters import lowpass
from genscale.applications.model import DiffusionModel, guided_eps_fn
from genscale.diffusion.samplers import randn, strided_timesteps
from genscale.errors import UserError


@dataclass
class DenoiseResult:
    clean: torch.Tensor
    noisy: torch.Tensor  # x_t / sqrt(abar_t), what the blur sees (clipped for display)
    blur: torch.Tensor
    one_step: torch.Tensor
    iterative: torch.Tensor
    trace: list[torch.Tensor] = field(default_factory=list)  # intermediate states of (c), decoded

    def psnr(self) -> dict[str, float]:
        return {name: pooled_psnr(getattr(self, name), self.clean) for name in ("noisy", "blur", "one_step", "iterative")}


def squared_error(pred: torch.Tensor, target: torch.Tensor) -> float:
    """The sum of squared differences over every value, in float64 (batches add up to the whole set)."""
    return float((pred.double().cpu() - target.double().cpu()).square().sum())


def psnr_from_sse(sse: float, count: int) -> float:
    """10 log10(2^2 / MSE) for images in [-1, 1], MSE = ``sse`` / ``count`` values."""
    mse = sse / count
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def pooled_psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """10 log10(2^2 / MSE) with the MSE over every value of every image, in float64."""
    return psnr_from_sse(squared_error(pred, target), target.numel())


def one_step_x0(dm: DiffusionModel, x_t: torch.Tensor, t: int, labels: torch.Tensor | None,
                cfg_scale: float) -> torch.Tensor:
    """x0_hat from a single model call at t."""
    return dm.x0_from_eps(x_t, t, dm.eps(x_t, t, labels, cfg_scale))


@torch.no_grad()
def denoise(dm: DiffusionModel, images: torch.Tensor, t: int, *, steps: int | None = None, blur_sigma: float = 1.0,
            labels: torch.Tensor | None = None, cfg_scale: float = 1.0, eta: float = 0.0,
            generator: torch.Generator | None = None, keep: int = 3,
            progress: bool = False) -> DenoiseResult:
    """Noise ``images`` (N x C x H x W in [-1, 1]) to ``t`` and denoise them as (a), (b), (c)."""
    if not 0 <= t < dm.timesteps:
        raise UserError(f"--t must be a timestep between 0 and {dm.timesteps - 1}, got {t}")
    steps = min(20, t + 1) if steps is None else steps  # the default: 20, or every timestep below a small t
    if not 1 <= steps <= t + 1:  # more steps than timesteps from t down to 0 cannot be taken
        raise UserError(f"--steps must be between 1 and {t + 1} (the timesteps from --t {t} down to 0), got {steps}")
    clean = images.to(dm.device, torch.float32)
    z0 = dm.encode(clean, generator)
    z_t = dm.q_sample(z0, t, randn(z0.shape, generator, dm.device))
    noisy = dm.decode(z_t / dm.abar(t).sqrt().to(z_t.dtype)) if dm.latent else z_t / dm.abar(t).sqrt().float()
    blur = lowpass(noisy, blur_sigma).clamp(-1, 1)
    one = dm.decode(one_step_x0(dm, z_t, t, labels, cfg_scale))
    timesteps = strided_timesteps(t + 1, steps)  # from t down to 0
    z, trace = dm.reverse(z_t, timesteps, guided_eps_fn(dm, labels, cfg_scale), eta=eta, generator=generator,
                          keep=keep, progress=progress)
    return DenoiseResult(clean, noisy.clamp(-1, 1), blur, one, dm.decode(z), [dm.decode(s) for s in trace])
