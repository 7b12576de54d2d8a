"""U-Net inpainting by regression: (masked image, mask) -> the whole image.

The network sees the image with its holes zeroed and the mask (1 = known, 0 = hole) as an extra
channel. Loss = MSE over the hole pixels + ``known_weight`` * MSE over the known ones (the
composite never shows the known-pixel predictions, so the default weight is 0). The output is
composited, x' = m * x + (1 - m) * f(m * x, m), so known pixels are kept bit for bit. Masks
(boxes, brush strokes, scattered pixels) come from torch's global RNG, which the trainer seeds
per step: a resumed run draws the same masks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from genscale.data.masks import MASK_KINDS, random_masks
from genscale.errors import UserError
from genscale.families.base import Batch, DataInfo, Family, Optimize
from genscale.families.gan_base import eval_mode
from genscale.families.gan_reference import load_reference, pick
from genscale.inpainting import check_masks, composite
from genscale.models.inpaint_unet import InpaintUNet
from genscale.optim import adam
from genscale.transfer import to_device

PREVIEW = 8  # images kept from the first batch for the periodic grids


@dataclass
class Options:
    mask: str = "mixed"  # box | stroke | pixel | mixed
    known_weight: float = 0.0  # weight of the MSE on known pixels next to the hole MSE
    width: int = 32
    depth: int = 2  # downsamplings of the U-Net

    def validate(self) -> None:
        if self.mask not in MASK_KINDS:
            raise UserError(f"--mask must be one of {', '.join(MASK_KINDS)}, got {self.mask!r}")
        if self.known_weight < 0:
            raise UserError(f"--known-weight must not be negative, got {self.known_weight}")
        if self.width < 1 or self.depth < 1:
            raise UserError("--width and --depth must be positive")


OPTION_HELP = {
    "mask": "training masks: box, stroke, pixel or mixed (1 = known, 0 = hole)",
    "known_weight": "loss = hole MSE + this * known-pixel MSE",
    "width": "U-Net channels at full resolution",
    "depth": "U-Net downsamplings (the image size must divide by 2^depth)",
}


# Options a resume may change (genscale/families/__init__.py; train.check_same_options refuses others).
RESUME_MAY_CHANGE = ("mask", "known_weight")

PRESET = {"data": "digits", "image_size": 8, "steps": 4000, "batch_size": 64, "lr": 1e-3, "warmup_steps": 100,
          "ema_decay": 0.999, "ckpt_every": 1000, "sample_every": 1000}


def masked_mse(pred: torch.Tensor, target: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the pixels where ``region`` is 1 (all channels), in float32."""
    weight = region.expand_as(target).float()
    return ((pred.float() - target.float()).square() * weight).sum() / weight.sum().clamp(min=1.0)


class Inpaint(Family):
    name = "inpaint"
    ema_names = ("unet",)

    def __init__(self, train, options: Options, info: DataInfo):
        super().__init__()
        self.opts, self.info = options, info
        try:
            self.nets["unet"] = InpaintUNet(info.channels + 1, info.channels, info.image_size, options.width,
                                            options.depth)
        except ValueError as err:
            raise UserError(str(err)) from None
        self.optimizers["unet"] = adam(self.nets["unet"].parameters(), train.lr, decoupled=True,
                                       weight_decay=train.weight_decay)
        self.preview: torch.Tensor | None = None  # the first training images: the grids' inputs
        self.train_cfg = train  # its data: held-out images to fill when sampling from a saved run

    def predict(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The network's raw prediction of the whole image from its known part."""
        return self.nets["unet"](torch.cat([image * mask, mask.to(image.dtype)], 1))

    def training_step(self, batch: Batch, optimize: Optimize) -> dict[str, float]:
        x = batch["image"]
        if self.preview is None:
            self.preview = x[:PREVIEW].detach().clone()
        mask = to_device(random_masks(self.opts.mask, x.shape[0], tuple(x.shape[-2:])), x.device, x.dtype)
        pred = self.predict(x, mask)
        hole = masked_mse(pred, x, 1 - mask)
        loss = hole
        logs = {"hole_mse": hole.detach()}
        if self.opts.known_weight > 0:
            known = masked_mse(pred, x, mask)
            loss = loss + self.opts.known_weight * known
            logs["known_mse"] = known.detach()
        optimize(loss, "unet")
        logs["loss"] = loss.detach()
        return logs

    @torch.no_grad()
    def inpaint(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Fill the holes (mask 0) of ``images`` in [-1, 1]; known pixels come back unchanged."""
        images = images.to(self.device)
        masks = masks.to(self.device, images.dtype)
        check_masks(images, masks)
        with eval_mode(self.nets["unet"]):
            pred = self.predict(images, masks).float().clamp(-1, 1)
        return composite(images, pred, masks)

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None,
               image: torch.Tensor | None = None, mask: torch.Tensor | None = None, **options) -> torch.Tensor:
        """Inpaint ``image`` (default: the images kept from training, or in a run loaded from disk
        held-out images of its data picked by ``generator``, as gan-inpaint does) under ``mask``
        (default: random masks of the training kind drawn from ``generator``); labels are ignored."""
        if image is None and self.preview is not None:
            image = self.preview[torch.arange(n) % len(self.preview)]
        elif image is None:
            image = pick(load_reference(self.train_cfg, self.info), n, generator)["image"]
        if mask is None:
            mask = random_masks(self.opts.mask, len(image), tuple(image.shape[-2:]), generator=generator)
        return self.inpaint(image, mask)

    @torch.no_grad()
    def grid(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """The periodic grid: one row per kept image, masked input | inpainted | original."""
        if self.preview is None:
            raise UserError("no training batch seen yet, so there is nothing to inpaint")
        x = self.preview.to(self.device)
        mask = random_masks(self.opts.mask, len(x), tuple(x.shape[-2:]), generator=generator).to(x)
        out = self.inpaint(x, mask)
        shown = torch.where(mask.expand_as(x) > 0.5, x, torch.ones_like(x))  # holes shown white
        return torch.stack([shown, out, x], 1).flatten(0, 1), 3


FAMILY = Inpaint
