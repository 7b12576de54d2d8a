"""Conditional GAN on DCGAN networks: the generator takes z and a class label.

``--discriminator classes`` (default): the discriminator has N+1 outputs, the N classes and
"fake", trained with cross-entropy (true class for reals, "fake" for generated images); the
generator is trained so its samples are classified as the class it was asked for (Salimans
et al. 2016; Odena 2016). ``--discriminator binary``: the plain real/fake conditional GAN of
Mirza & Osindero (2014), the label fed to the discriminator as one-hot input planes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from genscale.errors import UserError
from genscale.families.base import DataInfo
from genscale.families.gan_base import NoiseToImageGAN
from genscale.families.gan_common import DIGITS_PRESET, NOISE_GAN_HELP, check_gan_options
from genscale.families.gan_losses import d_loss_bce, d_loss_classes, g_loss_classes, g_loss_nonsaturating
from genscale.models.dcgan import DCGANDiscriminator, DCGANGenerator

DISCRIMINATORS = ("classes", "binary")


@dataclass
class Options:
    discriminator: str = "classes"  # classes (N+1 outputs) | binary (real/fake given the label)
    z_dim: int = 64
    embed_dim: int = 16  # label embedding concatenated to z
    g_width: int = 64
    d_width: int = 64
    beta1: float = 0.5
    beta2: float = 0.999
    d_lr: float = 0.0  # 0 = the same as --lr

    def validate(self) -> None:
        check_gan_options(self)
        if self.discriminator not in DISCRIMINATORS:
            raise UserError(f"--discriminator must be one of {', '.join(DISCRIMINATORS)}, "
                            f"got {self.discriminator!r}")
        if min(self.embed_dim, self.g_width, self.d_width) <= 0:
            raise UserError("--embed-dim, --g-width and --d-width must be positive")


OPTION_HELP = {
    "discriminator": "classes: N+1-way classifier (N classes + fake); binary: real/fake given the label",
    "z_dim": NOISE_GAN_HELP["z_dim"],
    "embed_dim": "size of the label embedding fed to the generator",
    "g_width": "generator width at full resolution (DCGAN's ngf)",
    "d_width": "discriminator width at full resolution (DCGAN's ndf)",
    "d_lr": NOISE_GAN_HELP["d_lr"],
}


# Options a resume may change (genscale/families/__init__.py; train.check_same_options refuses others).
RESUME_MAY_CHANGE = ("beta1", "beta2", "d_lr")

PRESET = dict(DIGITS_PRESET)


class CGAN(NoiseToImageGAN):
    name = "cgan"

    def __init__(self, train, options: Options, info: DataInfo):
        super().__init__(train, info)
        if info.num_classes < 2:
            raise UserError(f"cgan needs labelled data with at least two classes; {info.name} has "
                            f"{info.num_classes} (try --data digits)")
        self.num_classes = info.num_classes
        self.z_dim = options.z_dim
        self.binary = options.discriminator == "binary"
        self.nets = {
            "generator": DCGANGenerator(options.z_dim, info.channels, info.image_size, options.g_width,
                                        num_classes=info.num_classes, embed_dim=options.embed_dim),
            "discriminator": DCGANDiscriminator(
                info.channels, info.image_size, options.d_width,
                out_dim=1 if self.binary else info.num_classes + 1,
                label_channels=info.num_classes if self.binary else 0),
        }
        self.make_optimizers((options.beta1, options.beta2), options.d_lr)

    def generate(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.nets["generator"](z, labels)

    def discriminator_loss(self, real, real_labels, fake, fake_labels):
        d = self.nets["discriminator"]
        if self.binary:
            if (real_labels < 0).any():
                raise UserError("cgan --discriminator binary needs every training image labelled")
            real_logits, fake_logits = d(real, real_labels), d(fake, fake_labels)
            return d_loss_bce(real_logits, fake_logits), real_logits, fake_logits
        real_logits, fake_logits = d(real), d(fake)
        return d_loss_classes(real_logits, real_labels, fake_logits), real_logits, fake_logits

    def generator_loss(self, fake, fake_labels):
        d = self.nets["discriminator"]
        if self.binary:
            return g_loss_nonsaturating(d(fake, fake_labels))
        return g_loss_classes(d(fake), fake_labels)


FAMILY = CGAN
