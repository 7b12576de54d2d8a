"""A trained diffusion run seen as what the applications need: a guided eps function, the
schedule, the data space (pixels for ddpm, scaled latents for ldm) and one reverse loop.

Every application steps with ``ddim_step`` from genscale.diffusion.samplers: eta = 0 is
deterministic DDIM, eta = 1 the ancestral (DDPM posterior) step on the same strided timesteps.
Noise comes from a CPU ``torch.Generator`` and is moved to the model's device, so one seed
gives one output on any device.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from genscale.diffusion.guidance import guided_prediction
from genscale.diffusion.samplers import ddim_step, eps_from_prediction, randn
from genscale.errors import UserError

DIFFUSION_FAMILIES = ("ddpm", "ldm")
EpsFn = Callable[[torch.Tensor, int], torch.Tensor]


class NonFiniteError(UserError):
    """The guided prediction overflowed (an absurd --cfg-scale): every later step would turn the
    images into NaN or clip them to black, so the task stops before anything is written."""


class DiffusionModel:
    """The EMA network of a ddpm or ldm run, with the options it was trained with."""

    def __init__(self, family, task: str = "this task") -> None:
        name = getattr(family, "name", type(family).__name__)
        if name not in DIFFUSION_FAMILIES:
            raise UserError(f"--task {task} needs a diffusion run (ddpm or ldm); this run's model is {name}")
        self.family = family
        self.latent = name == "ldm"
        self.schedule = family.schedule
        self.prediction = family.opts.prediction
        self.num_classes = int(family.num_classes)
        self.default_cfg = float(family.opts.cfg_scale)
        self.clip_x0 = not self.latent  # latents are not bounded by 1 (as in the ldm family)
        self.device = family.device
        self.net = family.nets["model"].eval()

    @property
    def timesteps(self) -> int:
        return self.schedule.timesteps

    def require_pixels(self, task: str) -> None:
        """Views, filters and masks act on pixels: refuse latent runs for those tasks."""
        if self.latent:
            raise UserError(f"--task {task} works in pixel space (views, filters and masks do not map 1:1 onto "
                            "an ldm run's latents); use a ddpm run")

    def labels(self, spec: int | torch.Tensor | None, n: int) -> torch.Tensor | None:
        """n labels (one class repeated, or a tensor), or None for the unconditional model."""
        if spec is None or self.num_classes == 0:
            return None
        labels = torch.as_tensor(spec, dtype=torch.long).expand(n) if not torch.is_tensor(spec) or spec.dim() == 0 \
            else spec.long()
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise UserError(f"class labels must lie between 0 and {self.num_classes - 1}")
        return labels.to(self.device)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> the diffusion's data (the images themselves, or ldm latents)."""
        images = images.to(self.device, torch.float32)
        if not self.latent:
            return images
        model = self.family.model
        shape = model.autoencoder.encode(images)[0].shape
        return model.encode(images, randn(shape, generator, self.device))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The diffusion's data -> images in [-1, 1]."""
        return self.family.model.decode(z) if self.latent else z.clamp(-1, 1)

    @torch.no_grad()
    def eps(self, x: torch.Tensor, t: int, labels: torch.Tensor | None, cfg_scale: float) -> torch.Tensor:
        """eps_hat(x_t, t) with classifier-free guidance toward ``labels`` (None: unconditional)."""
        t_batch = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        pred = guided_prediction(self.net, x, t_batch, labels, self.num_classes, cfg_scale).to(x.dtype)
        eps = eps_from_prediction(self.schedule, x, t_batch, pred, self.prediction)
        if not bool(torch.isfinite(eps).all()):
            raise NonFiniteError(f"the model's guided noise prediction at timestep {t} is NaN or infinite "
                                 f"(guidance scale {cfg_scale:g}); nothing was written")
        return eps

    def abar(self, t: int) -> torch.Tensor:
        """abar_t as a float64 0-d tensor; t = -1 means clean data (abar = 1)."""
        if t < 0:
            return torch.ones((), dtype=torch.float64)
        return self.schedule.alphas_cumprod[t]

    def q_sample(self, x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        """sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, coefficients from the float64 table."""
        a = self.abar(t)
        return a.sqrt().to(x0.dtype) * x0 + (1 - a).sqrt().to(x0.dtype) * noise

    def x0_from_eps(self, x_t: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
        """The one-step estimate (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), clipped in pixel space."""
        a = self.abar(t)
        x0 = (x_t - (1 - a).sqrt().to(x_t.dtype) * eps) / a.sqrt().to(x_t.dtype)
        return x0.clamp(-1, 1) if self.clip_x0 else x0

    @torch.no_grad()
    def reverse(self, x: torch.Tensor, timesteps: list[int], eps_fn: EpsFn, *, eta: float = 0.0,
                generator: torch.Generator | None = None, keep: int = 0,
                progress: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Step x from timesteps[0] down through ``timesteps`` to clean data; returns (x0, trace).

        ``trace`` holds ``keep`` intermediate states, evenly spaced over the steps (for grids);
        ``progress`` shows a bar over the steps.
        """
        marks = {round(i * len(timesteps) / (keep + 1)) for i in range(1, keep + 1)} if keep else set()
        trace = []
        for i, t in enumerate(tqdm(timesteps, desc="steps", disable=not progress, leave=False, dynamic_ncols=True)):
            t_next = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            eps = eps_fn(x, t)
            noise = randn(x.shape, generator, x.device) if eta > 0 and t_next >= 0 else None
            x = ddim_step(x, eps, noise, self.abar(t), self.abar(t_next), eta, self.clip_x0)
            if i + 1 in marks:
                trace.append(x)
        return x, trace


def guided_eps_fn(dm: DiffusionModel, labels: torch.Tensor | None, cfg_scale: float) -> EpsFn:
    """The plain guided eps of one condition, as the reverse loop takes it."""
    return lambda x, t: dm.eps(x, t, labels, cfg_scale)
