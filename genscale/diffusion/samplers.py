"""Reverse-process samplers: DDPM ancestral sampling and DDIM, with classifier-free guidance.

The per-step math lives in ``ddpm_step`` and ``ddim_step``: plain tensor-in, tensor-out
functions of (x_t, eps_hat, noise, abar_t, abar_next) so that fused kernels can replace them
one for one. The loops only pick timesteps, call the model and draw noise.

Noise is drawn from the given ``torch.Generator`` on the generator's device (the CPU by
default) and then moved, so one seed gives the same noise on any device.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from genscale.diffusion.guidance import ModelFn, guided_prediction
from genscale.diffusion.schedule import NoiseSchedule

PREDICTIONS = ("eps", "v")


def randn(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
          device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise drawn where ``generator`` lives (CPU when None), then moved to ``device``."""
    where = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(tuple(shape), generator=generator, device=where, dtype=dtype).to(device)


def strided_timesteps(timesteps: int, steps: int) -> list[int]:
    """``steps`` timesteps evenly spaced over [0, T-1], descending, starting at T-1 and ending at 0.

    Uses exact integer rounding of i (T-1)/(K-1), so the steps are distinct whenever K <= T and
    K = T gives every timestep.
    """
    if not 1 <= steps <= timesteps:
        raise ValueError(f"the number of sampling steps must be between 1 and {timesteps}, got {steps}")
    if steps == 1:
        return [timesteps - 1]
    span, k = timesteps - 1, steps - 1
    ascending = [(2 * i * span + k) // (2 * k) for i in range(steps)]  # floor(i span / k + 1/2)
    return ascending[::-1]


def _x0_and_eps(x_t: torch.Tensor, eps_hat: torch.Tensor, abar_t: torch.Tensor,
                clip_x0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x0_hat from eps_hat; when clipping, eps_hat is recomputed so that both stay consistent."""
    sa = abar_t.sqrt().to(x_t.dtype)
    s1a = (1.0 - abar_t).sqrt().to(x_t.dtype)
    x0 = (x_t - s1a * eps_hat) / sa
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        eps_hat = (x_t - sa * x0) / s1a
    return x0, eps_hat


def ddpm_step(x_t: torch.Tensor, eps_hat: torch.Tensor, noise: torch.Tensor | None,
              abar_t: torch.Tensor, abar_prev: torch.Tensor, clip_x0: bool = True) -> torch.Tensor:
    """One ancestral step x_t -> x_{t'} drawn from the posterior q(x_{t'} | x_t, x0_hat).

    ``noise`` ~ N(0, I) shaped like x_t, or None for the final step (its variance is 0).
    ``abar_t`` and ``abar_prev`` (abar at the next, smaller timestep; 1 past t = 0) are tensors
    broadcastable to x_t (0-d or [N, 1, ..., 1]); the coefficients are formed in their dtype
    (pass float64) and cast to x_t's. With abar_prev = abar_{t-1} this is DDPM; with a strided
    abar_prev it is the respaced process of improved DDPM (beta' = 1 - abar_t / abar_prev).
    The posterior variance vanishes when abar_prev = 1, so the final step returns x0_hat.
    """
    x0, _ = _x0_and_eps(x_t, eps_hat, abar_t, clip_x0)
    beta = 1.0 - abar_t / abar_prev
    coef_x0 = (beta * abar_prev.sqrt() / (1.0 - abar_t)).to(x_t.dtype)
    coef_xt = ((1.0 - abar_prev) * (abar_t / abar_prev).sqrt() / (1.0 - abar_t)).to(x_t.dtype)
    x_prev = coef_x0 * x0 + coef_xt * x_t
    if noise is not None:
        std = (beta * (1.0 - abar_prev) / (1.0 - abar_t)).clamp(min=0.0).sqrt().to(x_t.dtype)
        x_prev = x_prev + std * noise
    return x_prev


def ddim_step(x_t: torch.Tensor, eps_hat: torch.Tensor, noise: torch.Tensor | None,
              abar_t: torch.Tensor, abar_next: torch.Tensor, eta: float = 0.0,
              clip_x0: bool = True) -> torch.Tensor:
    """One DDIM step: x_{t'} = sqrt(abar_t') x0_hat + c1 z + sqrt(1 - abar_t' - c1^2) eps_hat.

    c1 = eta sqrt((1 - abar_t/abar_t') (1 - abar_t') / (1 - abar_t)); abar_t' = 1 past t = 0.
    eta = 0 is deterministic; eta = 1 is the ancestral DDPM step. ``noise`` None means no noise
    term (right for eta = 0 and for the final step, where c1 = 0). Coefficient tensors follow
    the same rules as in ``ddpm_step``.
    """
    x0, eps = _x0_and_eps(x_t, eps_hat, abar_t, clip_x0)
    c1 = eta * ((1.0 - abar_t / abar_next) * (1.0 - abar_next) / (1.0 - abar_t)).clamp(min=0.0).sqrt()
    c_eps = (1.0 - abar_next - c1 ** 2).clamp(min=0.0).sqrt()
    x_next = abar_next.sqrt().to(x_t.dtype) * x0 + c_eps.to(x_t.dtype) * eps
    if noise is not None and eta != 0.0:
        x_next = x_next + c1.to(x_t.dtype) * noise
    return x_next


def eps_from_prediction(schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor,
                        pred: torch.Tensor, prediction: str) -> torch.Tensor:
    """The model's output as an eps prediction (v is converted with eps = sqrt(1-abar) x_t + sqrt(abar) v)."""
    if prediction == "eps":
        return pred
    if prediction == "v":
        return schedule.eps_from_v(x_t, t, pred)
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]


def _reverse_process(model_fn: ModelFn, shape: tuple[int, ...], schedule: NoiseSchedule,
                     timesteps: list[int], step: StepFn, *, labels: torch.Tensor | None,
                     num_classes: int, cfg_scale: float, prediction: str, generator: torch.Generator | None,
                     device: torch.device | str, x_T: torch.Tensor | None, progress: bool,
                     desc: str) -> torch.Tensor:
    """Shared loop: step(x, eps_hat, abar_t, abar_next, last) -> x at the next timestep."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    device = torch.device(device)
    x = randn(shape, generator, device) if x_T is None else x_T.to(device, torch.float32)
    if labels is not None:
        labels = labels.to(device)
    abar = schedule.alphas_cumprod  # float64 on the CPU; 0-d slices broadcast onto any device
    one = torch.ones((), dtype=torch.float64)
    for i, t in enumerate(tqdm(timesteps, desc=desc, disable=not progress, leave=False)):
        last = i + 1 == len(timesteps)
        abar_next = one if last else abar[timesteps[i + 1]]
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=device)
        pred = guided_prediction(model_fn, x, t_batch, labels, num_classes, cfg_scale).to(x.dtype)
        eps_hat = eps_from_prediction(schedule, x, t_batch, pred, prediction)
        x = step(x, eps_hat, abar[t], abar_next, last)
    return x


@torch.no_grad()
def ddpm_sample(model_fn: ModelFn, shape: tuple[int, ...], schedule: NoiseSchedule, *,
                labels: torch.Tensor | None = None, num_classes: int = 0, cfg_scale: float = 1.0,
                prediction: str = "eps", clip_x0: bool = True, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu", progress: bool = False, steps: int | None = None,
                x_T: torch.Tensor | None = None) -> torch.Tensor:
    """Ancestral sampling with the posterior variance, from x_T ~ N(0, I) (or the given ``x_T``).

    ``steps`` None runs all T steps (DDPM); fewer runs the respaced process on
    ``strided_timesteps(T, steps)``. Returns float32 samples of ``shape`` on ``device``.
    """
    timesteps = strided_timesteps(schedule.timesteps, steps or schedule.timesteps)

    def step(x, eps_hat, abar_t, abar_next, last):
        noise = None if last else randn(x.shape, generator, x.device, x.dtype)
        return ddpm_step(x, eps_hat, noise, abar_t, abar_next, clip_x0)

    return _reverse_process(model_fn, tuple(shape), schedule, timesteps, step, labels=labels,
                            num_classes=num_classes, cfg_scale=cfg_scale, prediction=prediction,
                            generator=generator, device=device, x_T=x_T, progress=progress, desc="DDPM")


@torch.no_grad()
def ddim_sample(model_fn: ModelFn, shape: tuple[int, ...], schedule: NoiseSchedule, *,
                steps: int = 50, eta: float = 0.0, labels: torch.Tensor | None = None,
                num_classes: int = 0, cfg_scale: float = 1.0, prediction: str = "eps",
                clip_x0: bool = True, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu", progress: bool = False,
                x_T: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM (Song et al.) on ``strided_timesteps(T, steps)``; eta = 0 is deterministic given x_T."""
    timesteps = strided_timesteps(schedule.timesteps, steps)

    def step(x, eps_hat, abar_t, abar_next, last):
        noise = None if eta == 0.0 or last else randn(x.shape, generator, x.device, x.dtype)
        return ddim_step(x, eps_hat, noise, abar_t, abar_next, eta, clip_x0)

    return _reverse_process(model_fn, tuple(shape), schedule, timesteps, step, labels=labels,
                            num_classes=num_classes, cfg_scale=cfg_scale, prediction=prediction,
                            generator=generator, device=device, x_T=x_T, progress=progress, desc="DDIM")
