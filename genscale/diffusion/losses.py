"""The denoising training objective (Ho et al. 2020; v-prediction from Salimans & Ho 2022), and
min-SNR-gamma loss weighting (Hang et al. 2023)."""
from __future__ import annotations

import torch

from genscale.diffusion.guidance import ModelFn
from genscale.diffusion.schedule import NoiseSchedule

LOSSES = ("l2", "l1")


def min_snr_weights(schedule: NoiseSchedule, t: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Per-sample loss weights [N] (float64) that weight the x0 error by min(SNR_t, gamma).

    Hang et al. 2023: the timesteps' losses conflict, and capping the x0-error weight at gamma
    (they use 5) trains faster. Defined for squared errors (--loss l2). An eps error is the x0
    error times sqrt(SNR) (x0 = (x_t - sigma eps) / alpha), so the eps loss takes
    min(SNR, gamma) / SNR; a v error is the x0 error times sqrt(SNR + 1) (x0 = alpha x_t - sigma v,
    sigma^2 = 1 / (SNR + 1)), so the v loss takes min(SNR, gamma) / (SNR + 1).
    """
    if prediction not in ("eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    abar = schedule.table("alphas_cumprod", t.device, torch.float64)[t]  # cached: no copy per step
    snr = abar / (1.0 - abar)
    capped = snr.clamp(max=gamma)
    return capped / snr if prediction == "eps" else capped / (snr + 1.0)


def diffusion_loss(model_fn: ModelFn, x0: torch.Tensor, labels: torch.Tensor | None,
                   schedule: NoiseSchedule, *, prediction: str = "eps", loss: str = "l2",
                   generator: torch.Generator | None = None, t: torch.Tensor | None = None,
                   snr_gamma: float = 0.0) -> torch.Tensor:
    """Mean over the batch of |target - model_fn(x_t, t, labels)|^2 (or |.|), a scalar; with
    ``snr_gamma`` > 0 each sample's terms weighted by ``min_snr_weights``.

    t ~ U{0, ..., T-1} per sample (unless given) and eps ~ N(0, I); x_t = q_sample(x0, t, eps).
    The target is eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0. With a ``generator`` the
    draws happen on its device and are moved to x0's (a CPU generator makes runs reproducible
    across devices); without one they happen directly on x0's device. The error is computed in
    float32 even when the model runs in half precision.
    """
    if prediction not in ("eps", "v"):
        raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    n = x0.shape[0]
    where = generator.device if generator is not None else x0.device
    if t is None:
        t = torch.randint(0, schedule.timesteps, (n,), generator=generator, device=where).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=where, dtype=x0.dtype).to(x0.device)
    x_t = schedule.q_sample(x0, t, eps)
    target = eps if prediction == "eps" else schedule.v_target(x0, t, eps)
    error = model_fn(x_t, t, labels).float() - target.float()
    per_element = error.square() if loss == "l2" else error.abs()
    if snr_gamma > 0:
        weight = min_snr_weights(schedule, t, snr_gamma, prediction).float()
        per_element = per_element * weight.view(-1, *([1] * (per_element.dim() - 1)))
    return per_element.mean()
