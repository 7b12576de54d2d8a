"""pix2pix (Isola et al. 2017): paired image-to-image translation with a conditional GAN.

U-Net generator G(A) with skip connections and dropout; PatchGAN discriminator on the pair
(A, B) stacked along channels. Discriminator step on (A, B) vs (A, G(A).detach()) with the
vanilla GAN loss, halved as in the paper (it slows D relative to G); generator step on the
vanilla (non-saturating) GAN loss plus ``l1_weight`` (lambda = 100) times L1(G(A), B).
Batches carry the input as "source" and the target as "image" (``KEY.src.png`` / ``KEY.tgt.png``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from genscale.errors import UserError
from genscale.families.base import Batch, DataInfo, Optimize
from genscale.families.gan_base import AdversarialFamily, eval_mode
from genscale.families.gan_losses import d_loss_bce, g_loss_nonsaturating
from genscale.families.gan_reference import load_reference, pick
from genscale.models.patchgan import PatchDiscriminator, patch_output_size
from genscale.models.pix2pix_unet import UNetGenerator

GRID_ROWS = 8  # held-out pairs shown in the periodic input | output | target grid


@dataclass
class Options:
    l1_weight: float = 100.0
    patch_layers: int = 3  # 3 -> 70x70 receptive field
    g_width: int = 64
    d_width: int = 64
    dropout: float = 0.5
    num_downs: int = 0  # 0 = log2(image size): down to a 1x1 bottleneck
    source_channels: int = 0  # 0 = as many as the target; 1-channel sources are repeated to fit
    residual: bool = False  # output = input + 2 G(input), clamped: for outputs close to their input
    beta1: float = 0.5
    beta2: float = 0.999
    d_lr: float = 0.0  # 0 = the same as --lr

    def validate(self) -> None:
        check_image_to_image_options(self)
        if self.l1_weight < 0:
            raise UserError(f"--l1-weight must not be negative, got {self.l1_weight}")


def check_image_to_image_options(opts) -> None:
    """Checks shared by pix2pix and gan-inpaint."""
    if min(opts.g_width, opts.d_width) <= 0:
        raise UserError("--g-width and --d-width must be positive")
    if opts.patch_layers < 1:
        raise UserError(f"--patch-layers must be at least 1, got {opts.patch_layers}")
    if not 0 <= opts.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {opts.dropout}")
    if opts.num_downs < 0:
        raise UserError(f"--num-downs must not be negative, got {opts.num_downs}")
    if not (0 <= opts.beta1 < 1 and 0 <= opts.beta2 < 1) or opts.d_lr < 0:
        raise UserError("--beta1 and --beta2 must be in [0, 1) and --d-lr must not be negative")


def check_patch_layers(layers: int, image_size: int) -> None:
    if patch_output_size(image_size, layers) < 1:
        most = max((n for n in range(1, 9) if patch_output_size(image_size, n) >= 1), default=0)
        raise UserError(f"--patch-layers {layers} is too deep for {image_size} px images "
                        f"(at most {most} at this size)")


OPTION_HELP = {
    "l1_weight": "weight lambda of the L1 term in the generator loss",
    "patch_layers": "strided layers of the PatchGAN discriminator (3 -> 70x70 patches)",
    "g_width": "U-Net width at full resolution (pix2pix's ngf)",
    "d_width": "PatchGAN width (pix2pix's ndf)",
    "dropout": "dropout in the inner decoder blocks (pix2pix's noise)",
    "num_downs": "U-Net downsamplings (0 = log2 of the image size, i.e. down to 1x1)",
    "source_channels": "channels of the input images (0 = same as the targets)",
    "residual": "predict the change from the input (on for the default colourisation data; "
                "--no-residual for tasks whose output does not resemble the input, e.g. labels -> photo)",
}

# The colourisation pairs of the bundled photos (grey -> colour) at 32 px on a 2-core CPU. The
# output differs from the input only in colour, so the generator predicts the change (residual).

# Options a resume may change (genscale/families/__init__.py; train.check_same_options refuses others).
RESUME_MAY_CHANGE = ("l1_weight", "dropout", "beta1", "beta2", "d_lr")

PRESET = {"data": "photos-paired", "image_size": 32, "steps": 1500, "batch_size": 16, "lr": 5e-4,
          "warmup_steps": 0, "grad_clip": 0.0, "ema_decay": 0.999, "ckpt_every": 500, "sample_every": 500,
          "flip": True, "residual": True, "g_width": 32, "d_width": 32}


def match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """Grey sources to RGB networks (repeat) or RGB to grey (mean); anything else is an error."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1:
        return x.expand(-1, channels, -1, -1)
    if channels == 1:
        return x.mean(1, keepdim=True)
    raise UserError(f"the model takes {channels}-channel inputs but got {c} channels")


class Pix2Pix(AdversarialFamily):
    name = "pix2pix"

    def __init__(self, train, options: Options, info: DataInfo):
        super().__init__(train, info)
        if not info.paired:
            raise UserError(f"pix2pix trains on paired data (shards of KEY.src.png + KEY.tgt.png) and "
                            f"{info.name} is not paired; try --data photos-paired")
        check_patch_layers(options.patch_layers, info.image_size)
        self.opts = options
        self.source_channels = options.source_channels or info.channels
        self.nets = {
            "generator": UNetGenerator(self.source_channels, info.channels, info.image_size, options.g_width,
                                       options.num_downs or None, options.dropout),
            "discriminator": PatchDiscriminator(self.source_channels + info.channels, options.d_width,
                                                options.patch_layers),
        }
        self.make_optimizers((options.beta1, options.beta2), options.d_lr)
        self._reference: dict[str, torch.Tensor] | None = None

    def reference(self) -> dict[str, torch.Tensor]:
        """Held-out pairs of the run's data, for sampling without given sources (cached)."""
        if self._reference is None:
            self._reference = load_reference(self.train_cfg, self.info)
            if "source" not in self._reference:
                raise UserError(f"the run's data {self.train_cfg.data!r} holds no paired sources to translate")
        return self._reference

    def training_step(self, batch: Batch, optimize: Optimize) -> dict[str, float]:
        if "source" not in batch:
            raise UserError("pix2pix needs paired batches with a source image")
        a = match_channels(batch["source"], self.source_channels)
        b = batch["image"]
        d = self.nets["discriminator"]
        fake = self.generate(a)

        real_logits = d(torch.cat([a, b], 1))
        fake_logits = d(torch.cat([a, fake.detach()], 1))
        d_loss = 0.5 * d_loss_bce(real_logits, fake_logits)
        optimize(d_loss, "discriminator")

        g_gan = g_loss_nonsaturating(d(torch.cat([a, fake], 1)))
        g_l1 = (fake - b).abs().mean()
        g_loss = g_gan + self.opts.l1_weight * g_l1
        self.generator_step(g_loss, optimize)
        logs = {"d_loss": d_loss.detach(), "g_loss": g_loss.detach(), "g_gan": g_gan.detach(),
                "l1": g_l1.detach()}
        return self.observe(logs, real_logits, fake_logits, fake, b)

    def generate(self, source: torch.Tensor) -> torch.Tensor:
        out = self.nets["generator"](source)
        if self.opts.residual:
            # The U-Net's tanh output is the change, scaled so any target in [-1, 1] stays
            # reachable; the identity is where training starts instead of a blur of it.
            out = (match_channels(source, out.shape[1]) + 2.0 * out).clamp(-1, 1)
        return out

    @torch.no_grad()
    def translate(self, source: torch.Tensor) -> torch.Tensor:
        """G(source) in [-1, 1], with BatchNorm running statistics and without dropout."""
        source = match_channels(source.to(self.device), self.source_channels)
        with eval_mode(self.nets["generator"]):
            return self.generate(source).float().clamp(-1, 1)

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None,
               source: torch.Tensor | None = None, **options) -> torch.Tensor:
        """Translations of ``source`` (n images); without one, of held-out sources of the run's
        data picked by ``generator`` (the same seed picks the same ones)."""
        self.check_sample_options(options)
        if source is None:
            source = pick(self.reference(), n, generator)["source"]
        if len(source) != n:
            raise UserError(f"got {len(source)} source images for {n} samples")
        return self.translate(source)

    @torch.no_grad()
    def grid(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """The periodic grid: one row per held-out pair, input | output | target; -> (images, per row)."""
        ref = self.reference()
        a, b = ref["source"][:GRID_ROWS], ref["image"][:GRID_ROWS]
        out = self.translate(a)
        rows = torch.stack([match_channels(a, b.shape[1]).to(out), out, b.to(out)], 1)
        return rows.flatten(0, 1), 3


FAMILY = Pix2Pix
