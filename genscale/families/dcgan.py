"""DCGAN (Radford et al. 2015): convolutional generator and discriminator sized from the image size.

Conv weights N(0, 0.02), BatchNorm weights N(1, 0.02); the discriminator steps first on BCE,
then the generator on the non-saturating loss -E[log D(G(z))]. Adam 2e-4, betas (0.5, 0.999).
Unconditional: labels passed to ``sample`` are ignored (``conditional`` is False).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from genscale.errors import UserError
from genscale.families.base import DataInfo
from genscale.families.gan_common import DIGITS_PRESET, NOISE_GAN_HELP, UnconditionalBCEGAN, check_gan_options
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
    **NOISE_GAN_HELP,
    "g_width": "generator width at full resolution (doubles per halving, as in DCGAN's ngf)",
    "d_width": "discriminator width at full resolution (DCGAN's ndf)",
}


# Options a resume may change (genscale/families/__init__.py; train.check_same_options refuses others).
RESUME_MAY_CHANGE = ("beta1", "beta2", "d_lr")

PRESET = {**DIGITS_PRESET, "steps": 3000}


class DCGAN(UnconditionalBCEGAN):
    name = "dcgan"

    def build_nets(self, options: Options, info: DataInfo) -> dict[str, nn.Module]:
        return {
            "generator": DCGANGenerator(options.z_dim, info.channels, info.image_size, options.g_width),
            "discriminator": DCGANDiscriminator(info.channels, info.image_size, options.d_width),
        }


FAMILY = DCGAN
