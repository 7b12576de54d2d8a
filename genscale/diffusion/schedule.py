"""Noise schedules and the closed-form Gaussian forward process of DDPM.

Every table is computed and kept in float64: abar spans ~1 down to ~1e-5 and products like
beta_t (1 - abar_{t-1}) / (1 - abar_t) lose digits in float32. Tables are cast to the dtype and
device of the tensor they multiply, lazily, and the cast copies are cached per (device, dtype).
"""
from __future__ import annotations

import math

import torch

from genscale.errors import UserError

SCHEDULE_KINDS = ("linear", "cosine")
MAX_BETA = 0.999  # Nichol & Dhariwal clip beta here so abar never reaches exactly zero


def linear_betas(timesteps: int) -> torch.Tensor:
    """DDPM's linear betas 1e-4..0.02, scaled by 1000/T (improved DDPM) so any T keeps the shape."""
    scale = 1000.0 / timesteps
    betas = torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    # Only T <= 20 pushes beta_end past 0.999; clipping keeps abar positive there.
    return betas.clamp(max=MAX_BETA)


def cosine_betas(timesteps: int, s: float = 0.008) -> torch.Tensor:
    """Nichol & Dhariwal: abar(t) = f(t)/f(0), f(t) = cos^2(((t/T)+s)/(1+s) pi/2); beta <= 0.999."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1.0 - f[1:] / f[:-1]
    return betas.clamp(max=MAX_BETA)


class NoiseSchedule:
    """Tables of a discrete Gaussian diffusion with ``timesteps`` steps, indexed by t in [0, T).

    All methods take ``t`` as a per-sample int64 tensor of shape [N] and broadcast the
    coefficients over the remaining dimensions of ``x``, in ``x``'s dtype and on its device.
    """

    def __init__(self, kind: str = "linear", timesteps: int = 1000) -> None:
        if kind not in SCHEDULE_KINDS:
            raise UserError(f"Unknown noise schedule {kind!r}; choose one of {', '.join(SCHEDULE_KINDS)}.")
        if int(timesteps) < 2:
            raise UserError(f"A noise schedule needs at least 2 timesteps, got {timesteps}.")
        self.kind = kind
        self.timesteps = T = int(timesteps)
        betas = linear_betas(T) if kind == "linear" else cosine_betas(T)

        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        abar, abar_prev = self.alphas_cumprod, self.alphas_cumprod_prev

        self.sqrt_alphas_cumprod = abar.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - abar).sqrt()
        self.sqrt_recip_alphas_cumprod = abar.rsqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / abar - 1.0).sqrt()

        # Posterior q(x_{t-1} | x_t, x0) = N(coef1 x0 + coef2 x_t, beta_t (1-abar_{t-1})/(1-abar_t)).
        self.posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        # The variance is 0 at t = 0; like DDPM, log it with t = 1's value there so it stays finite.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]]))
        self.posterior_mean_coef1 = betas * abar_prev.sqrt() / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * self.alphas.sqrt() / (1.0 - abar)

        self._cache: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"NoiseSchedule(kind={self.kind!r}, timesteps={self.timesteps})"

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        """Kept for call sites that move everything; tables are cast lazily, so this only warms the cache."""
        for name in ("sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
            self.table(name, torch.device(device), torch.float32)
        return self

    # -- coefficient lookup ------------------------------------------------------------------

    def table(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Table ``name`` (e.g. "alphas_cumprod") as ``dtype`` on ``device``, copied there once: a
        copy from host memory per training step would wait for the GPU's queue every step."""
        key = (name, device, dtype)
        table = self._cache.get(key)
        if table is None:
            # Cast on the CPU first: some devices (MPS) have no float64.
            table = getattr(self, name).to(dtype).to(device)
            self._cache[key] = table
        return table

    def coef(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``name``'s table at ``t``, shaped [N, 1, ..., 1] to broadcast against ``x``."""
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape [{x.shape[0]}] (one timestep per sample), got {tuple(t.shape)}")
        table = self.table(name, x.device, x.dtype)
        return table[t.to(x.device)].reshape(-1, *([1] * (x.dim() - 1)))

    def sample_timesteps(self, n: int, device: torch.device | str = "cpu",
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """n timesteps drawn uniformly from [0, T), drawn where ``generator`` lives, then moved."""
        where = generator.device if generator is not None else torch.device(device)
        return torch.randint(0, self.timesteps, (n,), generator=generator, device=where).to(device)

    # -- forward process and parameterisations ------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        return (self.coef("sqrt_alphas_cumprod", t, x0) * x0
                + self.coef("sqrt_one_minus_alphas_cumprod", t, x0) * eps)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (self.coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t
                - self.coef("sqrt_recipm1_alphas_cumprod", t, x_t) * eps)

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)."""
        return ((self.coef("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0)
                / self.coef("sqrt_recipm1_alphas_cumprod", t, x_t))

    def v_target(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (Salimans & Ho)."""
        return (self.coef("sqrt_alphas_cumprod", t, x0) * eps
                - self.coef("sqrt_one_minus_alphas_cumprod", t, x0) * x0)

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
        return (self.coef("sqrt_alphas_cumprod", t, x_t) * x_t
                - self.coef("sqrt_one_minus_alphas_cumprod", t, x_t) * v)

    def eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps = sqrt(1 - abar_t) x_t + sqrt(abar_t) v."""
        return (self.coef("sqrt_one_minus_alphas_cumprod", t, x_t) * x_t
                + self.coef("sqrt_alphas_cumprod", t, x_t) * v)

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor,
                  t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0), each shaped like x_t."""
        mean = self.coef("posterior_mean_coef1", t, x_t) * x0 + self.coef("posterior_mean_coef2", t, x_t) * x_t
        ones = torch.ones_like(x_t)
        variance = self.coef("posterior_variance", t, x_t) * ones
        log_variance = self.coef("posterior_log_variance_clipped", t, x_t) * ones
        return mean, variance, log_variance
