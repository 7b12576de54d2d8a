"""DCGAN (Radford et al. 2015): convolutional generator and discriminator sized from the image size.

Conv weights N(0, 0.02), BatchNorm weights N(1, 0.02); the discriminator steps first on BCE,
then the generator on the non-saturating loss -E[log D(G(z))]. Adam 2e-4, betas (0.5, 0.999).
Unconditional: labels passed to ``sample`` are ignored (``conditional`` is False).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from genscale.errors import UserError
from genscale.families.base import DataInfo
from genscale.families.gan import check_gan_options
from genscale.families.gan_base import NoiseToImageGAN
from genscale.families.gan_losses import d_loss_bce, g_loss_nonsaturating
from genscale.models.dcgan import DCGANDiscriminator, DCGANGenerator


@dataclass
class Options:
    z_dim: int = 64
    g_width: int = 64  # channels of the generator's last hidden map (doubling towards 4x4)
    d_width: int = 64  # channels of the discriminator's first map
    beta1: float = 0.5
    beta2: float = 0.999
    d_lr: float = 0.0  # 0 = the same as --lr

    def validate(self) -> None:
        check_gan_options(self)
        if self.g_width <= 0 or self.d_width <= 0:
            raise UserError("--g-width and --d-width must be positive")


OPTION_HELP = {
    "z_dim": "dimension of the generator's noise",
    "g_width": "generator width at full resolution (doubles per halving, as in DCGAN's ngf)",
    "d_width": "discriminator width at full resolution (DCGAN's ndf)",
    "beta1": "Adam beta1 of both optimizers (0.5 as in DCGAN)",
    "d_lr": "discriminator learning rate (0 = --lr)",
}

PRESET = {"data": "digits", "image_size": 16, "steps": 3000, "batch_size": 64, "lr": 2e-4,
          "warmup_steps": 0, "grad_clip": 0.0, "ema_decay": 0.999, "ckpt_every": 1000, "sample_every": 500}


class DCGAN(NoiseToImageGAN):
    name = "dcgan"

    def __init__(self, train, options: Options, info: DataInfo):
        super().__init__(train, info)
        self.z_dim = options.z_dim
        self.nets = {
            "generator": DCGANGenerator(options.z_dim, info.channels, info.image_size, options.g_width),
            "discriminator": DCGANDiscriminator(info.channels, info.image_size, options.d_width),
        }
        self.make_optimizers((options.beta1, options.beta2), options.d_lr)

    def generate(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.nets["generator"](z)

    def discriminator_loss(self, real, real_labels, fake, fake_labels):
        d = self.nets["discriminator"]
        real_logits, fake_logits = d(real), d(fake)
        return d_loss_bce(real_logits, fake_logits), real_logits, fake_logits

    def generator_loss(self, fake, fake_labels):
        return g_loss_nonsaturating(self.nets["discriminator"](fake))


FAMILY = DCGAN
