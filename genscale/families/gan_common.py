"""What the gan, dcgan, cgan and gan-inpaint families' definitions share: option checks, help
texts, the digits preset, and the unconditional BCE noise-to-image family (gan and dcgan).

Each family keeps its own Options dataclass: a shared dataclass base would put its fields
first, and so change the order of the families' flags in --help and of their config.json keys.
"""
from __future__ import annotations

from torch import Tensor, nn

from genscale.config import TrainConfig
from genscale.errors import UserError
from genscale.families.base import DataInfo
from genscale.families.gan_base import NoiseToImageGAN
from genscale.families.gan_losses import d_loss_bce, g_loss_nonsaturating

# Help of the flags gan, dcgan and cgan share (cgan's --beta1 has no help text).
NOISE_GAN_HELP = {
    "z_dim": "dimension of the generator's noise",
    "beta1": "Adam beta1 of both optimizers (0.5 as in DCGAN)",
    "d_lr": "discriminator learning rate (0 = --lr)",
}

# The GAN recipe on digits (Adam 2e-4 as in DCGAN, no warmup, no clipping); the families change
# only the number of steps and how often they sample.
DIGITS_PRESET = {"data": "digits", "image_size": 16, "steps": 2000, "batch_size": 64, "lr": 2e-4,
                 "warmup_steps": 0, "grad_clip": 0.0, "ema_decay": 0.999, "ckpt_every": 1000,
                 "sample_every": 500}


def check_gan_options(opts) -> None:
    """Checks shared by the noise-to-image GAN families' Options (z_dim, beta1, beta2, d_lr)."""
    if opts.z_dim <= 0:
        raise UserError(f"--z-dim must be positive, got {opts.z_dim}")
    if not (0 <= opts.beta1 < 1 and 0 <= opts.beta2 < 1):
        raise UserError(f"--beta1 and --beta2 must be in [0, 1), got {opts.beta1}, {opts.beta2}")
    if opts.d_lr < 0:
        raise UserError(f"--d-lr must not be negative, got {opts.d_lr}")


class UnconditionalBCEGAN(NoiseToImageGAN):
    """gan and dcgan: G(z) -> image; D minimises BCE on reals (1) and fakes (0), G the
    non-saturating BCE of its fakes against 1. Labels are ignored. Subclasses build the nets."""

    def __init__(self, train: TrainConfig, options, info: DataInfo):
        super().__init__(train, info)  # seeds torch: the nets below are built from --seed
        self.z_dim = options.z_dim
        self.nets = self.build_nets(options, info)
        self.make_optimizers((options.beta1, options.beta2), options.d_lr)

    def build_nets(self, options, info: DataInfo) -> dict[str, nn.Module]:
        """{"generator": ..., "discriminator": ...} for these options and data."""
        raise NotImplementedError

    def generate(self, z: Tensor, labels: Tensor | None) -> Tensor:
        return self.nets["generator"](z)

    def discriminator_loss(self, real, real_labels, fake, fake_labels):
        d = self.nets["discriminator"]
        real_logits, fake_logits = d(real), d(fake)
        return d_loss_bce(real_logits, fake_logits), real_logits, fake_logits

    def generator_loss(self, fake, fake_labels):
        return g_loss_nonsaturating(self.nets["discriminator"](fake))
