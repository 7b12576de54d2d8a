"""Adversarial inpainting (context-encoder style, Pathak et al. 2016) with a U-Net generator.

The generator sees the masked image (holes zeroed) and the mask (1 = known, 0 = hole) and
predicts the whole image; its output is composited so known pixels are kept exactly:
x' = m * x + (1 - m) * G(m * x, m). Generator loss = masked MSE over the hole
- ``adv_weight`` * E[log D(x')] (non-saturating); the PatchGAN discriminator tells real images
from inpainted ones. Masks (boxes, brush strokes, scattered pixels) are drawn per batch from
torch's global RNG, which the trainer seeds per step, so resumed runs draw the same masks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from genscale.data.masks import MASK_KINDS, random_masks
from genscale.errors import UserError
from genscale.families.base import Batch, DataInfo, Optimize
from genscale.families.gan_base import AdversarialFamily, eval_mode
from genscale.families.gan_common import DIGITS_PRESET
from genscale.families.gan_losses import d_loss_bce, g_loss_nonsaturating, masked_mse
from genscale.families.gan_reference import load_reference, pick
from genscale.families.pix2pix import check_image_to_image_options, check_patch_layers
from genscale.models.patchgan import PatchDiscriminator
from genscale.models.pix2pix_unet import UNetGenerator
from genscale.transfer import to_device

GRID_ROWS = 8  # held-out images shown in the periodic masked | inpainted | original grid


@dataclass
class Options:
    mask: str = "mixed"  # box | stroke | pixel | mixed
    adv_weight: float = 0.01  # lambda: weight of the adversarial term against the hole MSE
    patch_layers: int = 2
    g_width: int = 32
    d_width: int = 32
    dropout: float = 0.0
    num_downs: int = 0  # 0 = log2(image size)
    beta1: float = 0.5
    beta2: float = 0.999
    # The hole MSE makes fills plausible fast; a discriminator at the generator's rate then wins
    # outright (D(x) -> 1, D(x') -> 0) and its signal is useless. At a quarter of it they stay
    # balanced (measured on digits: D(x) ~ 0.6, D(x') ~ 0.4) at the same hole PSNR.
    d_lr: float = 5e-5  # 0 = the same as --lr

    def validate(self) -> None:
        check_image_to_image_options(self)
        if self.mask not in MASK_KINDS:
            raise UserError(f"--mask must be one of {', '.join(MASK_KINDS)}, got {self.mask!r}")
        if self.adv_weight < 0:
            raise UserError(f"--adv-weight must not be negative, got {self.adv_weight}")


OPTION_HELP = {
    "mask": "training masks: box, stroke, pixel or mixed (1 = known, 0 = hole)",
    "adv_weight": "lambda: generator loss = hole MSE - lambda * E[log D(inpainted)]",
    "patch_layers": "strided layers of the PatchGAN discriminator",
    "g_width": "U-Net width at full resolution",
    "d_width": "PatchGAN width",
    "num_downs": "U-Net downsamplings (0 = log2 of the image size)",
}


# Options a resume may change (genscale/families/__init__.py; train.check_same_options refuses others).
RESUME_MAY_CHANGE = ("mask", "adv_weight", "dropout", "beta1", "beta2", "d_lr")

PRESET = dict(DIGITS_PRESET)


def composite(image: torch.Tensor, prediction: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Known pixels from ``image`` bit for bit, holes from ``prediction``."""
    return torch.where(mask.expand_as(image) > 0.5, image, prediction.to(image.dtype))


class GANInpaint(AdversarialFamily):
    name = "gan-inpaint"

    def __init__(self, train, options: Options, info: DataInfo):
        super().__init__(train, info)
        check_patch_layers(options.patch_layers, info.image_size)
        self.opts = options
        c = info.channels
        self.nets = {
            "generator": UNetGenerator(c + 1, c, info.image_size, options.g_width, options.num_downs or None,
                                       options.dropout),
            "discriminator": PatchDiscriminator(c, options.d_width, options.patch_layers),
        }
        self.make_optimizers((options.beta1, options.beta2), options.d_lr)
        self._reference: dict[str, torch.Tensor] | None = None

    def reference(self) -> dict[str, torch.Tensor]:
        """Held-out images of the run's data, for sampling without given images (cached)."""
        if self._reference is None:
            self._reference = load_reference(self.train_cfg, self.info)
        return self._reference

    def predict(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The generator's raw prediction of the whole image from its known part."""
        return self.nets["generator"](torch.cat([image * mask, mask.to(image.dtype)], 1))

    def training_step(self, batch: Batch, optimize: Optimize) -> dict[str, float]:
        x = batch["image"]
        mask = to_device(random_masks(self.opts.mask, x.shape[0], tuple(x.shape[-2:])), x.device, x.dtype)
        d = self.nets["discriminator"]
        pred = self.predict(x, mask)
        filled = composite(x, pred, mask)

        real_logits, fake_logits = d(x), d(filled.detach())
        d_loss = d_loss_bce(real_logits, fake_logits)
        optimize(d_loss, "discriminator")

        mse = masked_mse(pred, x, mask)
        g_adv = g_loss_nonsaturating(d(filled))
        g_loss = mse + self.opts.adv_weight * g_adv
        self.generator_step(g_loss, optimize)
        logs = {"d_loss": d_loss.detach(), "g_loss": g_loss.detach(), "hole_mse": mse.detach(),
                "g_adv": g_adv.detach()}
        return self.observe(logs, real_logits, fake_logits, pred, x)

    @torch.no_grad()
    def inpaint(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Fill the holes (mask 0) of ``image`` in [-1, 1]; known pixels come back unchanged."""
        image, mask = image.to(self.device), mask.to(self.device, image.dtype)
        if mask.shape[1] != 1 or mask.shape[0] != image.shape[0] or mask.shape[-2:] != image.shape[-2:]:
            raise UserError(f"masks must be N x 1 x H x W matching the images, got {tuple(mask.shape)} "
                            f"for images {tuple(image.shape)}")
        with eval_mode(self.nets["generator"]):
            pred = self.predict(image, mask).float().clamp(-1, 1)
        return composite(image, pred.to(image.dtype), mask)

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None,
               image: torch.Tensor | None = None, mask: torch.Tensor | None = None, **options) -> torch.Tensor:
        """Inpaint ``image`` (default: held-out images of the run's data picked by ``generator``)
        under ``mask`` (default: random masks of the training kind drawn from ``generator``)."""
        self.check_sample_options(options)
        if image is None:
            image = pick(self.reference(), n, generator)["image"]
        if len(image) != n:
            raise UserError(f"got {len(image)} images for {n} samples")
        if mask is None:
            mask = random_masks(self.opts.mask, n, tuple(image.shape[-2:]), generator=generator)
        return self.inpaint(image, mask)

    @torch.no_grad()
    def grid(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """The periodic grid: one row per held-out image, masked input | inpainted | original."""
        x = self.reference()["image"][:GRID_ROWS].to(self.device)
        mask = random_masks(self.opts.mask, len(x), tuple(x.shape[-2:]), generator=generator).to(x)
        out = self.inpaint(x, mask)
        shown = torch.where(mask.expand_as(x) > 0.5, x, torch.ones_like(x))  # holes shown white
        return torch.stack([shown, out, x], 1).flatten(0, 1), 3


FAMILY = GANInpaint
