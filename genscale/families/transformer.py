"""Encoder-only transformer over patches: masked-patch prediction (BERT / MAE style).

Training masks an exact number of patches per image, chosen uniformly at random: with
``mask_schedule cosine`` (default, as MaskGIT) each image draws its ratio gamma(u) = cos(pi u / 2),
u ~ U(0, 1), so the network learns every masking level from one patch to all of them (what
generation from an empty canvas needs); with ``fixed`` every image masks ``mask_ratio`` of its
patches (MAE's 0.75). Count = ceil(ratio * L), between 1 and L. A share ``inpaint_masks`` of the
images is masked instead with the holes inpainting meets (boxes, strokes, scattered pixels from
genscale.data.masks; a patch with a hole pixel is masked). Loss = MSE over the masked patches
only; visible patches never enter it. Labels (dropped to the null label with probability
``cond_drop``) condition the generation; inpainting uses the null label.

Inpainting: every patch with a hole pixel is masked, one forward pass predicts them all, the
composite keeps known pixels bit for bit. Generation (MaskGIT-style iterative unmasking): start
with every patch masked; at step k of K, predict all masked patches and reveal some, in a random
order, so that L cos(pi/2 (k+1)/K) stay masked; revealed values get Gaussian noise of standard
deviation ``temperature`` (MSE training gives means, the noise gives variety).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from genscale.data.masks import random_masks
from genscale.errors import UserError
from genscale.families.base import Batch, DataInfo, Family, Optimize
from genscale.families.gan_base import eval_mode
from genscale.inpainting import check_masks, composite
from genscale.models.masked_transformer import MaskedTransformer, patch_mask, patchify, unpatchify
from genscale.optim import adam
from genscale.transfer import to_device

MASK_SCHEDULES = ("cosine", "fixed")


@dataclass
class Options:
    patch_size: int = 1
    dim: int = 64
    depth: int = 4
    heads: int = 4
    mlp_ratio: int = 2
    dropout: float = 0.0
    mask_schedule: str = "cosine"  # cosine: a ratio per image from cos(pi u / 2); fixed: mask_ratio
    mask_ratio: float = 0.75
    inpaint_masks: float = 0.5  # share of images masked with box/stroke/pixel holes instead of random patches
    cond_drop: float = 0.5  # probability of training on the null label (inpainting uses the null label)
    sampling_steps: int = 16
    temperature: float = 0.1  # std of the noise added to revealed patches when generating

    def validate(self) -> None:
        if self.mask_schedule not in MASK_SCHEDULES:
            raise UserError(f"--mask-schedule must be one of {', '.join(MASK_SCHEDULES)}, got {self.mask_schedule!r}")
        if not 0 < self.mask_ratio <= 1:
            raise UserError(f"--mask-ratio must be in (0, 1], got {self.mask_ratio}")
        if not 0 <= self.inpaint_masks <= 1:
            raise UserError(f"--inpaint-masks must be in [0, 1], got {self.inpaint_masks}")
        if not 0 <= self.cond_drop <= 1:
            raise UserError(f"--cond-drop must be in [0, 1], got {self.cond_drop}")
        if min(self.patch_size, self.dim, self.depth, self.heads, self.mlp_ratio, self.sampling_steps) < 1:
            raise UserError("--patch-size, --dim, --depth, --heads, --mlp-ratio and --sampling-steps must be positive")
        if self.temperature < 0:
            raise UserError(f"--temperature must not be negative, got {self.temperature}")


OPTION_HELP = {
    "patch_size": "side of the square patches that become tokens (1 = one token per pixel)",
    "mask_schedule": "training mask ratio: cosine (a ratio per image, MaskGIT) or fixed (--mask-ratio)",
    "mask_ratio": "share of patches masked per image with --mask-schedule fixed",
    "inpaint_masks": "share of training images masked with inpainting holes (boxes, strokes, pixels) "
                     "instead of random patches",
    "cond_drop": "probability of training on the null label (1 = unconditional)",
    "sampling_steps": "unmasking steps when generating from an empty canvas",
    "temperature": "std of the noise added to revealed patches when generating",
}

# 64 pixel tokens of width 64: about 0.11 CPU-seconds a step at batch 64.

# Options a resume may change (genscale/families/__init__.py; train.check_same_options refuses others).
RESUME_MAY_CHANGE = ("dropout", "mask_ratio", "inpaint_masks", "cond_drop", "sampling_steps", "temperature")

PRESET = {"data": "digits", "image_size": 8, "steps": 3000, "batch_size": 64, "lr": 1e-3, "warmup_steps": 100,
          "ema_decay": 0.999, "ckpt_every": 1000, "sample_every": 1000}


def mask_counts(n: int, num_tokens: int, schedule: str, ratio: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Masked tokens per image (int64 [n], each in 1..L): ceil(gamma * L) with gamma = cos(pi u / 2)
    for the cosine schedule or gamma = ``ratio`` for the fixed one."""
    if schedule == "cosine":
        gamma = torch.cos(math.pi / 2 * torch.rand(n, generator=generator, dtype=torch.float64))
    else:
        gamma = torch.full((n,), float(ratio), dtype=torch.float64)
    return torch.ceil(gamma * num_tokens - 1e-9).long().clamp(1, num_tokens)


def random_token_mask(counts: torch.Tensor, num_tokens: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool [n, L], True = masked, with exactly ``counts[i]`` masked tokens in row i, chosen uniformly."""
    scores = torch.rand(len(counts), num_tokens, generator=generator)
    ranks = scores.argsort(1).argsort(1)  # each token's place in a uniformly random order
    return ranks < counts[:, None]


def masked_patch_mse(pred: torch.Tensor, target: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked tokens' values only ([N, L, D] tensors, [N, L] mask)."""
    weight = masked[..., None].float()
    return ((pred.float() - target.float()).square() * weight).sum() / (weight.sum() * pred.shape[-1]).clamp(min=1.0)


class Transformer(Family):
    name = "transformer"
    ema_names = ("transformer",)

    def __init__(self, train, options: Options, info: DataInfo):
        super().__init__()
        self.opts, self.info = options, info
        self.num_classes = info.num_classes if options.cond_drop < 1 else 0
        try:
            self.nets["transformer"] = MaskedTransformer(
                info.channels, info.image_size, options.patch_size, options.dim, options.depth, options.heads,
                options.mlp_ratio, self.num_classes, options.dropout)
        except ValueError as err:
            raise UserError(str(err)) from None
        self.optimizers["transformer"] = adam(self.nets["transformer"].parameters(), train.lr, decoupled=True,
                                              betas=(0.9, 0.95), weight_decay=train.weight_decay)

    @property
    def num_tokens(self) -> int:
        return (self.info.image_size // self.opts.patch_size) ** 2

    def _labels(self, labels: torch.Tensor | None, n: int) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        if labels is None:
            return torch.full((n,), self.num_classes, dtype=torch.long, device=self.device)
        return labels.to(self.device, torch.long)

    def training_step(self, batch: Batch, optimize: Optimize) -> dict[str, float]:
        x = batch["image"]
        n, p = x.shape[0], self.opts.patch_size
        counts = mask_counts(n, self.num_tokens, self.opts.mask_schedule, self.opts.mask_ratio)
        masked = random_token_mask(counts, self.num_tokens)
        if self.opts.inpaint_masks > 0:  # the hole shapes inpainting meets: boxes, strokes, pixels
            chosen = (torch.rand(n) < self.opts.inpaint_masks).nonzero().flatten()
            if len(chosen):
                holes = random_masks("mixed", len(chosen), tuple(x.shape[-2:]))
                masked[chosen] = patch_mask(holes, p)
        masked = to_device(masked, x.device)
        labels = None
        if self.num_classes:
            drop = torch.rand(n) < self.opts.cond_drop
            labels = torch.where(to_device(drop, x.device) | (batch["label"] < 0), self.num_classes, batch["label"])
        pred = self.nets["transformer"](x, masked, labels)
        loss = masked_patch_mse(pred, patchify(x, p), masked)
        optimize(loss, "transformer")
        return {"loss": loss.detach(), "mask_ratio": masked.float().mean()}

    @torch.no_grad()
    def inpaint(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Fill the holes (mask 0) of ``images`` in [-1, 1] from the patches without holes."""
        images = images.to(self.device)
        masks = masks.to(self.device, images.dtype)
        check_masks(images, masks)
        net, p = self.nets["transformer"], self.opts.patch_size
        masked = patch_mask(masks, p)
        with eval_mode(net):
            pred = net(images, masked, self._labels(None, len(images))).float()
        filled = unpatchify(pred, p, images.shape[1], *images.shape[-2:]).clamp(-1, 1)
        return composite(images, filled, masks)

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None,
               sampling_steps: int | None = None, temperature: float | None = None, **_) -> torch.Tensor:
        """Generate from an empty canvas by iterative unmasking on the cosine schedule."""
        net, p, L = self.nets["transformer"], self.opts.patch_size, self.num_tokens
        steps = min(sampling_steps or self.opts.sampling_steps, L)
        temp = self.opts.temperature if temperature is None else temperature
        c, s = self.info.channels, self.info.image_size
        tokens = torch.zeros(n, L, c * p * p, device=self.device)
        order = torch.rand(n, L, generator=generator).argsort(1).argsort(1).to(self.device)  # reveal order
        masked = torch.ones(n, L, dtype=torch.bool, device=self.device)
        y = self._labels(labels, n)
        with eval_mode(net):
            for k in range(steps):
                pred = net(unpatchify(tokens, p, c, s, s), masked, y).float()
                remaining = int(math.floor(L * math.cos(math.pi / 2 * (k + 1) / steps)))
                still = order >= L - remaining  # tokens revealed so far: the first L - remaining of the order
                reveal = masked & ~still
                noise = torch.randn(pred.shape, generator=generator).to(pred) * temp
                tokens = torch.where(reveal[..., None], (pred + noise).clamp(-1, 1), tokens)
                masked = still
        return unpatchify(tokens, p, c, s, s)


FAMILY = Transformer
