"""Reverse-process samplers: DDPM ancestral sampling and DDIM, with classifier-free guidance.

The sampling loops (``ddpm_sample``, ``ddim_sample``) run each step as ONE fused kernel call,
``kernels.ddpm_step`` / ``kernels.ddim_step`` (Triton on CUDA, their eager reference elsewhere):
the guidance combine eps_u + s (eps_c - eps_u) happens inside the kernel, which reads both
halves once, and the step noise is drawn inside it from Philox at (seed, offset). The loops only
pick timesteps, call the model and turn v predictions into eps (v -> eps is affine in v, so
converting both halves before the combine is exact).

Randomness: x_T is drawn from the given ``torch.Generator`` where it lives (the CPU by default)
and moved; then ONE seed is drawn from the same generator (``draw_seed``), and step i of the loop
draws its noise at (seed, offset=i). Philox offsets are independent streams (kernels/_philox.py),
so no two steps share draws, and one generator seed gives the same samples on any device up to
fp32 rounding.

``ddpm_step`` and ``ddim_step`` below are the same steps with explicit noise (plain tensor-in,
tensor-out functions of (x_t, eps_hat, noise, abar_t, abar_next)), for callers that need to
choose the noise themselves (RePaint, SDEdit) and as the tests' reference.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

import kernels
from genscale.diffusion.guidance import ModelFn, guided_halves
from genscale.diffusion.schedule import NoiseSchedule

PREDICTIONS = ("eps", "v")
SAMPLERS = ("ddpm", "ddim", "dpm++2m")  # dpm++2m: DPM-Solver++(2M), genscale/diffusion/dpm_solver.py
SEED_BOUND = 2**62  # seeds lie in [0, 2**62): positive in int64 and inside Philox's [0, 2**63)


def randn(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
          device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise drawn where ``generator`` lives (CPU when None), then moved to ``device``."""
    where = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(tuple(shape), generator=generator, device=where, dtype=dtype).to(device)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """One Philox seed for a sampling run, drawn from ``generator`` (torch's default CPU RNG when None)."""
    where = generator.device if generator is not None else torch.device("cpu")
    return int(torch.randint(0, SEED_BOUND, (), generator=generator, device=where).item())


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


def check_sampler_args(prediction: str, eta: float = 0.0) -> None:
    """ValueError for a prediction type no sampler knows, or a negative eta."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")


def _reverse_process(model_fn: ModelFn, shape: tuple[int, ...], schedule: NoiseSchedule,
                     timesteps: list[int], sampler: str, *, eta: float, clip_x0: bool,
                     labels: torch.Tensor | None, num_classes: int, cfg_scale: float, prediction: str,
                     generator: torch.Generator | None, device: torch.device | str,
                     x_T: torch.Tensor | None, progress: bool) -> torch.Tensor:
    """The shared loop: step i goes timesteps[i] -> timesteps[i + 1] (-1 after the last, abar = 1)
    through one fused kernel call, its noise drawn at (seed, offset = i)."""
    device = torch.device(device)
    x = randn(shape, generator, device) if x_T is None else x_T.to(device, torch.float32)
    seed = draw_seed(generator)  # after x_T, so x_T (and eta = 0 DDIM) match the pre-kernel loops
    if labels is not None:
        labels = labels.to(device)
    abar = schedule.alphas_cumprod.to(device)  # float64, moved once rather than per step
    for i, t in enumerate(tqdm(timesteps, desc=sampler.upper(), disable=not progress, leave=False)):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=device)
        pred_u, pred_c = guided_halves(model_fn, x, t_batch, labels, num_classes, cfg_scale)
        eps = eps_from_prediction(schedule, x, t_batch, pred_u.to(x.dtype), prediction)
        eps_c = None if pred_c is None else eps_from_prediction(schedule, x, t_batch, pred_c.to(x.dtype), prediction)
        # offset = i, not i * numel: the offset fills the upper half of Philox's counter, so each
        # step reads its own stream whatever the tensor's size (kernels/_philox.py).
        common = dict(eps_cond=eps_c, guidance_scale=cfg_scale, clip_x0=clip_x0, seed=seed, offset=i)
        if sampler == "ddpm":
            x = kernels.ddpm_step(x, eps, t_batch, abar, t_prev=t_prev, **common)
        else:
            x = kernels.ddim_step(x, eps, t_batch, t_prev, abar, eta=eta, **common)
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
    check_sampler_args(prediction)
    timesteps = strided_timesteps(schedule.timesteps, steps or schedule.timesteps)
    return _reverse_process(model_fn, tuple(shape), schedule, timesteps, "ddpm", eta=1.0, clip_x0=clip_x0,
                            labels=labels, num_classes=num_classes, cfg_scale=cfg_scale, prediction=prediction,
                            generator=generator, device=device, x_T=x_T, progress=progress)


@torch.no_grad()
def ddim_sample(model_fn: ModelFn, shape: tuple[int, ...], schedule: NoiseSchedule, *,
                steps: int = 50, eta: float = 0.0, labels: torch.Tensor | None = None,
                num_classes: int = 0, cfg_scale: float = 1.0, prediction: str = "eps",
                clip_x0: bool = True, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu", progress: bool = False,
                x_T: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM (Song et al.) on ``strided_timesteps(T, steps)``; eta = 0 is deterministic given x_T."""
    check_sampler_args(prediction, eta)
    timesteps = strided_timesteps(schedule.timesteps, steps)
    return _reverse_process(model_fn, tuple(shape), schedule, timesteps, "ddim", eta=float(eta), clip_x0=clip_x0,
                            labels=labels, num_classes=num_classes, cfg_scale=cfg_scale, prediction=prediction,
                            generator=generator, device=device, x_T=x_T, progress=progress)
