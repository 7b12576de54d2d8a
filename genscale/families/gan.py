"""The original GAN (Goodfellow et al. 2014): MLPs on flattened images, binary cross-entropy.

The discriminator (with dropout after each hidden layer, as the original's) minimises BCE on
reals (label 1) and fakes (label 0); the generator the non-saturating BCE of its fakes against
the label 1. Adam 2e-4, betas (0.5, 0.999).
Unconditional: labels passed to ``sample`` are ignored (``conditional`` is False).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from genscale.errors import UserError
from genscale.families.base import DataInfo
from genscale.families.gan_common import DIGITS_PRESET, NOISE_GAN_HELP, UnconditionalBCEGAN, check_gan_options
from genscale.models.mlp_gan import MLPDiscriminator, MLPGenerator


@dataclass
class Options:
    z_dim: int = 64
    g_hidden: tuple[int, ...] = (256, 512)
    d_hidden: tuple[int, ...] = (512, 256)
    d_dropout: float = 0.5  # dropout after each discriminator hidden layer (as in the original GAN)
    beta1: float = 0.5
    beta2: float = 0.999
    d_lr: float = 0.0  # 0 = the same as --lr

    def validate(self) -> None:
        check_gan_options(self)
        if not self.g_hidden or any(h <= 0 for h in self.g_hidden + self.d_hidden):
            raise UserError("--g-hidden and --d-hidden must be positive widths, e.g. 256,512")
        if not 0 <= self.d_dropout < 1:
            raise UserError(f"--d-dropout must be in [0, 1), got {self.d_dropout}")


OPTION_HELP = {
    **NOISE_GAN_HELP,
    "g_hidden": "generator hidden widths, e.g. 256,512",
    "d_hidden": "discriminator hidden widths, e.g. 512,256",
    "d_dropout": "dropout after each discriminator hidden layer",
}

# On digits the MLP discriminator keeps gaining on the generator, which then drops digits: by
# step 2000 every digit is well covered, by 4000 the rarest one is not (measured): 2000 steps.

# Options a resume may change (genscale/families/__init__.py; train.check_same_options refuses others).
RESUME_MAY_CHANGE = ("d_dropout", "beta1", "beta2", "d_lr")

PRESET = {**DIGITS_PRESET, "sample_every": 1000}


class GAN(UnconditionalBCEGAN):
    name = "gan"

    def __init__(self, train, options: Options, info: DataInfo):
        if train.batch_size < 2:  # found here, before the run folder is written, not at the first step
            raise ValueError(f"--batch-size must be at least 2 for gan (its generator's BatchNorm needs two "
                             f"images per batch), got {train.batch_size}")
        super().__init__(train, options, info)

    def build_nets(self, options: Options, info: DataInfo) -> dict[str, nn.Module]:
        shape = (info.channels, info.image_size, info.image_size)
        return {"generator": MLPGenerator(options.z_dim, shape, options.g_hidden),
                "discriminator": MLPDiscriminator(shape, options.d_hidden, options.d_dropout)}


FAMILY = GAN
