"""Diffusion noise steps: forward noising, the fused eps-prediction loss, DDPM and DDIM steps.

Conventions shared by every function (DDPM, Ho et al. 2020; DDIM, Song et al. 2021):
* ``alphas_cumprod`` is abar[0..T-1], abar[t] = prod_{i<=t} (1 - beta_i); pass it as float64 on
  the tensors' device to avoid a conversion per call.
* ``t`` (and ``t_prev``) is an int or an integer tensor [N], one timestep per sample, in [0, T).
* Draws come from Philox4x32-10 keyed by ``seed`` at stream ``offset`` (see kernels/_philox.py):
  the same (seed, offset) gives the same eps for the same element on any grid and in any memory
  format: bit for bit within one backend (what regenerating eps in the loss relies on), and to
  ~1e-6 across backends (a GPU's log/cos are not correctly rounded); use a new offset (e.g. the
  step number) for each new draw.
* ``seed`` may also be an integer tensor of one element on the tensors' device: the kernels read
  it when they run, not when they are launched, so a CUDA graph that captured them draws anew on
  each replay after the seed tensor changes (e.g. ``torch.randint(0, 2**62, (1,), device="cuda")``
  inside the captured step), and torch.compile sees a tensor input instead of a new constant per
  call. Its value is the int seed's (same draws); it is range-checked only on the CPU.
* Outputs keep the dtype and memory format of the first tensor argument; arithmetic is fp32
  (fp64 for fp64 inputs), schedule coefficients are computed in fp64.
CUDA tensors run the Triton kernels (one pass over memory each), anything else the eager
reference below, which is also the oracle of the tests.
"""
from __future__ import annotations

import math

import torch

from kernels import _noise_custom_ops
from kernels._dispatch import use_triton
from kernels._philox import check_seed_offset, normal_like_reference

_LOSSES = ("l1", "l2")
_VARIANCES = ("posterior", "beta")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _steps(t: torch.Tensor | int, n: int, device: torch.device, timesteps: int, name: str = "t",
           final_ok: bool = False) -> torch.Tensor:
    """t as int64 [n] on ``device``; with ``final_ok`` (t_prev) negative values mean the final step."""
    given_int = t if not torch.is_tensor(t) else None
    t = torch.as_tensor(t)
    if (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.dim() > 1
            or (t.dim() == 1 and t.shape[0] != n)):
        raise ValueError(f"{name} must be an int or an integer tensor of shape ({n},); got {tuple(t.shape)} {t.dtype}")
    # Checked where it is free (ints, CPU tensors, outside torch.compile's tracing, where reading a
    # value would break the graph); elsewhere a check would cost a sync, so the Triton kernels give
    # NaN for the samples whose timestep is outside the table instead.
    if t.device.type == "cpu" and t.numel() and not torch.compiler.is_compiling():
        low, high = int(t.min()), int(t.max())
        if (low < 0 and not final_ok) or high >= timesteps:
            allowed = f"below {timesteps} (negative: the final step)" if final_ok else f"in [0, {timesteps})"
            raise ValueError(f"{name} must lie {allowed} for a schedule of {timesteps} steps; "
                             f"got values from {low} to {high}")
    if given_int is not None and t.dim() == 0:
        # Filled on the device, not copied there: a copy from host memory waits for the stream, so
        # a sampler passing its next timestep as an int synchronised with the GPU at every step
        # (the GPU then idles while the host issues the next step's kernels).
        return torch.full((n,), int(given_int), dtype=torch.int64, device=device)
    return t.to(device=device, dtype=torch.int64, non_blocking=True).expand(n).contiguous()


def _table(alphas_cumprod: torch.Tensor, device: torch.device) -> torch.Tensor:
    """abar as a dense float64 vector on ``device`` (the kernels index it as one: a strided view,
    e.g. a respaced ``abar[::2]``, is copied). Its values are checked where that is free."""
    if alphas_cumprod.dim() != 1 or not alphas_cumprod.is_floating_point():
        raise ValueError(f"alphas_cumprod must be a 1-D floating tensor; got shape {tuple(alphas_cumprod.shape)} "
                         f"{alphas_cumprod.dtype}")
    if alphas_cumprod.device.type == "cpu" and alphas_cumprod.numel() and not torch.compiler.is_compiling():
        low, high = float(alphas_cumprod.detach().min()), float(alphas_cumprod.detach().max())
        if not (0.0 <= low and high <= 1.0):  # NaN fails too
            raise ValueError(f"alphas_cumprod must lie in [0, 1]; got values from {low} to {high}")
    return alphas_cumprod.to(device=device, dtype=torch.float64).contiguous()


def _abar_at(abar: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """abar[t], NaN where t is outside [0, T): what the Triton kernels give for a timestep the host
    could not check (on the GPU, or while torch.compile traces), instead of indexing from the end."""
    inside = (t >= 0) & (t < abar.shape[0])
    return torch.where(inside, abar[t.clamp(0, abar.shape[0] - 1)], torch.full_like(abar[:1], math.nan))


def _check_order(t: torch.Tensor, t_prev: torch.Tensor) -> None:
    """A reverse step goes to less noise: t_prev <= t (checked where free, as in _steps); the
    kernels and the reference give NaN for a sample whose t_prev > t."""
    if t.device.type == "cpu" and t.numel() and not torch.compiler.is_compiling():
        later = t_prev > t
        if bool(later.any()):
            i = int(later.nonzero()[0, 0])
            raise ValueError(f"t_prev must not exceed t (a reverse step removes noise); "
                             f"got t={int(t[i])}, t_prev={int(t_prev[i])} for sample {i}")


def _check_like(x: torch.Tensor, **others: torch.Tensor | None) -> None:
    if x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"expected a floating tensor [N, C, ...]; got {tuple(x.shape)} {x.dtype}")
    for name, other in others.items():
        if other is None:
            continue
        if other.shape != x.shape:
            raise ValueError(f"{name} must have shape {tuple(x.shape)}; got {tuple(other.shape)}")
        if not other.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor; got {other.dtype}")
        if other.device != x.device:
            raise ValueError(f"{name} is on {other.device} but the input is on {x.device}")


def _finite(name: str, value: float, low: float | None = None) -> float:
    value = float(value)
    if not math.isfinite(value) or (low is not None and value < low):
        bound = f" and >= {low:g}" if low is not None else ""
        raise ValueError(f"{name} must be a finite number{bound}; got {value}")
    return value


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd must see this call: the Triton steps have no backward, so such calls take
    the differentiable reference instead (e.g. guidance that differentiates through a step)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(_compute_dtype(like)).reshape((-1,) + (1,) * (like.dim() - 1))


def _as_layout_of(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(like)
    out.copy_(value)
    return out


def _draws(like: torch.Tensor, seed: int | torch.Tensor, offset: int) -> torch.Tensor:
    return normal_like_reference(like.shape, seed, offset, _compute_dtype(like), like.device)


# ----------------------------------------------------------------------------- public API


def philox_normal(like: torch.Tensor, seed: int | torch.Tensor, offset: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The eps that q_sample / eps_loss draw for a tensor shaped like ``like`` (same layout), in
    ``dtype`` (a floating dtype; q_sample on float64 data draws in float64)."""
    _check_like(like)
    seed, offset = check_seed_offset(seed, offset)
    if not dtype.is_floating_point:
        raise ValueError(f"philox_normal draws floating-point numbers; got dtype {dtype}")
    if use_triton(like) and dtype != torch.float64:
        return _noise_custom_ops.call_philox_normal(like, seed, offset, dtype)
    out = torch.empty_like(like, dtype=dtype)
    out.copy_(normal_like_reference(like.shape, seed, offset, torch.float64 if dtype == torch.float64 else torch.float32,
                                    like.device))
    return out


def q_sample(x0: torch.Tensor, t: torch.Tensor | int, alphas_cumprod: torch.Tensor,
             noise: torch.Tensor | None = None, *, seed: int | torch.Tensor = 0, offset: int = 0) -> torch.Tensor:
    """x_t = sqrt(abar[t]) x0 + sqrt(1 - abar[t]) eps; eps = ``noise`` if given, else drawn at (seed, offset)."""
    _check_like(x0, noise=noise)
    seed, offset = check_seed_offset(seed, offset)
    abar = _table(alphas_cumprod, x0.device)
    t = _steps(t, x0.shape[0], x0.device, abar.shape[0])
    if use_triton(x0, noise) and x0.dtype != torch.float64 and not _needs_grad(alphas_cumprod):
        return _noise_custom_ops.call_q_sample(x0, noise, t, abar, seed, offset)
    a = _abar_at(abar, t)
    eps = noise.to(_compute_dtype(x0)) if noise is not None else _draws(x0, seed, offset)
    xt = _per_sample(torch.sqrt(a), x0) * x0.to(eps.dtype) + _per_sample(torch.sqrt(1.0 - a), x0) * eps
    return _as_layout_of(xt, x0)


def eps_loss(pred: torch.Tensor, seed: int | torch.Tensor, offset: int = 0, kind: str = "l2",
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """mean((pred - eps)^2) (``kind="l2"``) or mean(|pred - eps|) with eps regenerated from (seed, offset).

    eps is the one q_sample drew with the same (seed, offset) for a tensor of pred's shape; it is
    drawn again in the backward pass instead of being stored. ``weight`` ([N], one per sample, e.g.
    min-SNR weights) multiplies each sample's terms inside the mean; it is a constant (no gradient
    flows to it). Returns a scalar: fp32 (fp64 for fp64 pred); NaN for an empty pred, as torch's
    mean. The Triton path's gradient is first-order only (differentiating it again raises; see
    kernels/_autograd.py).
    """
    _check_like(pred)
    seed, offset = check_seed_offset(seed, offset)
    if kind not in _LOSSES:
        raise ValueError(f"kind must be 'l1' or 'l2'; got {kind!r}")
    if weight is not None:
        if weight.shape != (pred.shape[0],) or not weight.is_floating_point():
            raise ValueError(f"weight must be a floating tensor of shape [{pred.shape[0]}] (one per sample); "
                             f"got {tuple(weight.shape)} {weight.dtype}")
        weight = weight.detach().to(pred.device)
    if use_triton(pred) and pred.dtype != torch.float64:
        return _noise_custom_ops.call_eps_loss(pred, seed, offset, kind == "l1", weight)
    d = pred.to(_compute_dtype(pred)) - _draws(pred, seed, offset)
    per_element = d.abs() if kind == "l1" else d * d
    if weight is not None:
        per_element = per_element * _per_sample(weight.to(per_element.dtype), per_element)
    return per_element.mean()


def _previous(abar: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor) -> torch.Tensor:
    """abar[t_prev]: 1 where t_prev < 0 (the final step), NaN where t_prev > t or t_prev >= T."""
    a_prev = torch.where(t_prev >= 0, _abar_at(abar, t_prev), torch.ones_like(abar[:1]))
    return torch.where(t_prev > t, torch.full_like(a_prev, math.nan), a_prev)


def _guided(eps: torch.Tensor, eps_cond: torch.Tensor | None, scale: float, cd: torch.dtype) -> torch.Tensor:
    e = eps.to(cd)
    return e if eps_cond is None else e + scale * (eps_cond.to(cd) - e)


def ddpm_step(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int, alphas_cumprod: torch.Tensor, *,
              t_prev: torch.Tensor | int | None = None, eps_cond: torch.Tensor | None = None,
              guidance_scale: float = 1.0, clip_x0: bool = False, variance: str = "posterior",
              seed: int | torch.Tensor = 0, offset: int = 0) -> torch.Tensor:
    """One ancestral DDPM step t -> t_prev (default t - 1; a larger gap is a respaced step).

    eps is the predicted noise; with ``eps_cond`` it is the unconditional prediction and the
    step uses eps + guidance_scale * (eps_cond - eps). x0_hat = (x_t - sqrt(1-abar_t) eps) /
    sqrt(abar_t), clamped to [-1, 1] when ``clip_x0``. With abar' = abar[t_prev] (1 where
    t_prev < 0) and beta = 1 - abar_t / abar', the result is the posterior mean
    beta sqrt(abar') / (1-abar_t) x0_hat + (1-abar') sqrt(1-beta) / (1-abar_t) x_t plus sigma z,
    z drawn at (seed, offset), sigma^2 = beta (1-abar') / (1-abar_t) (``variance="posterior"``)
    or beta (``"beta"``); no noise where t_prev < 0 (the last step returns the mean).
    """
    _check_like(x_t, eps=eps, eps_cond=eps_cond)
    seed, offset = check_seed_offset(seed, offset)
    if variance not in _VARIANCES:
        raise ValueError(f"variance must be 'posterior' or 'beta'; got {variance!r}")
    guidance_scale = _finite("guidance_scale", guidance_scale)
    abar = _table(alphas_cumprod, x_t.device)
    t = _steps(t, x_t.shape[0], x_t.device, abar.shape[0])
    t_prev = t - 1 if t_prev is None else _steps(t_prev, x_t.shape[0], x_t.device, abar.shape[0], "t_prev", True)
    _check_order(t, t_prev)
    if use_triton(x_t, eps, eps_cond) and x_t.dtype != torch.float64 and not _needs_grad(x_t, eps, eps_cond):
        return _noise_custom_ops.call_ddpm_step(x_t, eps, eps_cond, guidance_scale, t, t_prev, abar, bool(clip_x0),
                                         variance == "beta", seed, offset)
    cd = _compute_dtype(x_t)
    a_t = _abar_at(abar, t)
    a_prev = _previous(abar, t, t_prev)
    alpha = a_t / a_prev
    beta = 1.0 - alpha
    var = beta if variance == "beta" else beta * (1.0 - a_prev) / (1.0 - a_t)
    sigma = torch.where(t_prev >= 0, torch.sqrt(var.clamp(min=0.0)), torch.zeros_like(var))
    x = x_t.to(cd)
    e = _guided(eps, eps_cond, guidance_scale, cd)
    x0 = _per_sample(1.0 / torch.sqrt(a_t), x_t) * x - _per_sample(torch.sqrt((1.0 - a_t) / a_t), x_t) * e
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
    mean = (_per_sample(beta * torch.sqrt(a_prev) / (1.0 - a_t), x_t) * x0
            + _per_sample((1.0 - a_prev) * torch.sqrt(alpha) / (1.0 - a_t), x_t) * x)
    return _as_layout_of(mean + _per_sample(sigma, x_t) * _draws(x_t, seed, offset), x_t)


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | int, t_prev: torch.Tensor | int,
              alphas_cumprod: torch.Tensor, *, eps_cond: torch.Tensor | None = None,
              guidance_scale: float = 1.0, eta: float = 0.0, clip_x0: bool = False,
              seed: int | torch.Tensor = 0, offset: int = 0) -> torch.Tensor:
    """One DDIM step t -> t_prev (t_prev < 0 means abar = 1, the final step).

    x_{t'} = sqrt(abar_t') x0_hat + sqrt(1 - abar_t' - sigma^2) eps + sigma z, with
    sigma = eta sqrt((1-abar_t')/(1-abar_t)) sqrt(1 - abar_t/abar_t'); x0_hat and guidance as in
    ddpm_step. With ``clip_x0`` x0_hat is clamped and eps recomputed from it,
    eps = (x_t - sqrt(abar_t) x0_hat) / sqrt(1 - abar_t), as guided-diffusion does.
    """
    _check_like(x_t, eps=eps, eps_cond=eps_cond)
    seed, offset = check_seed_offset(seed, offset)
    eta = _finite("eta", eta, low=0.0)
    guidance_scale = _finite("guidance_scale", guidance_scale)
    n = x_t.shape[0]
    abar = _table(alphas_cumprod, x_t.device)
    t, t_prev = _steps(t, n, x_t.device, abar.shape[0]), _steps(t_prev, n, x_t.device, abar.shape[0], "t_prev", True)
    _check_order(t, t_prev)
    if use_triton(x_t, eps, eps_cond) and x_t.dtype != torch.float64 and not _needs_grad(x_t, eps, eps_cond):
        return _noise_custom_ops.call_ddim_step(x_t, eps, eps_cond, guidance_scale, t, t_prev, abar, eta,
                                         bool(clip_x0), seed, offset)
    cd = _compute_dtype(x_t)
    a_t = _abar_at(abar, t)
    a_p = _previous(abar, t, t_prev)
    sigma = eta * torch.sqrt((1.0 - a_p) / (1.0 - a_t) * (1.0 - a_t / a_p))
    e = _guided(eps, eps_cond, guidance_scale, cd)
    x = x_t.to(cd)
    x0 = _per_sample(1.0 / torch.sqrt(a_t), x_t) * x - _per_sample(torch.sqrt((1.0 - a_t) / a_t), x_t) * e
    if clip_x0:
        x0 = x0.clamp(-1.0, 1.0)
        e = (x - _per_sample(torch.sqrt(a_t), x_t) * x0) * _per_sample(1.0 / torch.sqrt(1.0 - a_t), x_t)
    c_dir = torch.sqrt((1.0 - a_p - sigma * sigma).clamp(min=0.0))
    out = _per_sample(torch.sqrt(a_p), x_t) * x0 + _per_sample(c_dir, x_t) * e
    if eta > 0:
        out = out + _per_sample(sigma, x_t) * _draws(x_t, seed, offset)
    return _as_layout_of(out, x_t)
