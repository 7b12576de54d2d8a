"""The single-step denoiser: a plain U-Net trained to remove Gaussian noise of one level.

Training pairs are (x + sigma n, x) with n ~ N(0, I) drawn from torch's global RNG (which the
trainer seeds per step, so resume stays exact) and the loss is the MSE to the clean image: the
network learns E[x | x + sigma n] for the training sigma only (0.5 by default, images in
[-1, 1]). ``sample.py --task denoise`` on such a run sweeps sigma from 0 to 1, i.e. mostly out
of the training distribution, and plots PSNR against sigma (genscale/applications/denoiser_sweep.py).
No time or class input: the network is not told the noise level.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from genscale.errors import UserError
from genscale.families.base import Batch, DataInfo, Family, Optimize
from genscale.families.gan_base import eval_mode
from genscale.models.inpaint_unet import InpaintUNet
from genscale.optim import adam

PREVIEW = 8  # images kept from the first batch for the periodic grids


@dataclass
class Options:
    sigma: float = 0.5  # training noise std, in the [-1, 1] image range
    width: int = 32
    depth: int = 2  # downsamplings of the U-Net

    def validate(self) -> None:
        if not self.sigma > 0:
            raise UserError(f"--sigma must be positive, got {self.sigma}")
        if self.width < 1 or self.depth < 1:
            raise UserError("--width and --depth must be positive")


OPTION_HELP = {
    "sigma": "standard deviation of the training noise (images in [-1, 1])",
    "width": "U-Net channels at full resolution",
    "depth": "U-Net downsamplings (the image size must divide by 2^depth)",
}

# ~2 minutes on one CPU thread for the 8x8 digits.

# Options a resume may change (genscale/families/__init__.py; train.check_same_options refuses others).
# (--sigma is the noise level the weights remove: not one of them)
RESUME_MAY_CHANGE = ()

PRESET = {"data": "digits", "image_size": 8, "steps": 1500, "batch_size": 64, "lr": 1e-3, "warmup_steps": 100,
          "ema_decay": 0.999, "ckpt_every": 500, "sample_every": 500}


class Denoiser(Family):
    name = "denoiser"
    ema_names = ("unet",)

    def __init__(self, train, options: Options, info: DataInfo):
        super().__init__()
        self.opts, self.info = options, info
        try:
            self.nets["unet"] = InpaintUNet(info.channels, info.channels, info.image_size, options.width,
                                            options.depth)
        except ValueError as err:
            raise UserError(str(err)) from None
        self.optimizers["unet"] = adam(self.nets["unet"].parameters(), train.lr, decoupled=True,
                                       weight_decay=train.weight_decay)
        self.preview: torch.Tensor | None = None

    def training_step(self, batch: Batch, optimize: Optimize) -> dict[str, float]:
        x = batch["image"]
        if self.preview is None:
            self.preview = x[:PREVIEW].detach().clone()
        noisy = x + self.opts.sigma * torch.randn_like(x)
        loss = (self.nets["unet"](noisy).float() - x.float()).square().mean()
        optimize(loss, "unet")
        return {"loss": loss.detach()}

    @torch.no_grad()
    def denoise(self, noisy: torch.Tensor) -> torch.Tensor:
        """One forward pass: the clean estimate of ``noisy`` images, clamped to [-1, 1]."""
        with eval_mode(self.nets["unet"]):
            return self.nets["unet"](noisy.to(self.device)).float().clamp(-1, 1)

    @torch.no_grad()
    def noisy_pair(self, images: torch.Tensor, sigma: float,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(images + sigma n, denoised), with n drawn from ``generator`` on the CPU."""
        noise = torch.randn(images.shape, generator=generator).to(images.device)
        noisy = images + sigma * noise
        return noisy, self.denoise(noisy)

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None,
               **options) -> torch.Tensor:
        """Denoised copies of images kept from training, noised at the training sigma."""
        if self.preview is None:
            raise UserError("a denoiser removes noise from images: use sample.py --task denoise")
        images = self.preview[torch.arange(n) % len(self.preview)].to(self.device)
        return self.noisy_pair(images, self.opts.sigma, generator)[1]

    @torch.no_grad()
    def grid(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """The periodic grid: one row per kept image, noisy | denoised | clean."""
        if self.preview is None:
            raise UserError("no training batch seen yet, so there is nothing to denoise")
        x = self.preview.to(self.device)
        noisy, out = self.noisy_pair(x, self.opts.sigma, generator)
        return torch.stack([noisy.clamp(-1, 1), out, x], 1).flatten(0, 1), 3


FAMILY = Denoiser
