"""What the GAN families share: two Adam optimizers, the D-then-G alternation, noise, monitoring.

The alternation inside one training step (one micro-batch):

1. the generator makes a batch once; the discriminator step sees it detached, so its backward
   never reaches the generator;
2. the generator step back-propagates through the discriminator (the loss needs D's input
   gradient). That backward also adds to D's parameter gradients, so D's gradients are saved
   before and put back after: D's next step then uses exactly its own loss's gradients, also
   when gradient accumulation keeps them across micro-batches. No requires_grad is toggled,
   so a DDP-wrapped discriminator sees an ordinary forward/backward and its reducer stays
   consistent (its all-reduce of the discarded gradients is wasted work, not wrong work).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from genscale.config import TrainConfig
from genscale.errors import UserError
from genscale.families.base import Batch, DataInfo, Family, Optimize
from genscale.families.gan_losses import real_probability
from genscale.families.gan_monitor import GanMonitor, diversity_ratio
from genscale.optim import adam

# Options sample.py may pass to every family; a GAN has no use for them.
IGNORED_SAMPLE_OPTIONS = ("progress",)


@contextmanager
def preserved_grads(module: nn.Module) -> Iterator[None]:
    """Leave ``module``'s .grad exactly as it was before the block (values, or None)."""
    params = [p for p in module.parameters() if p.requires_grad]
    saved = [None if p.grad is None else p.grad.detach().clone() for p in params]
    try:
        yield
    finally:
        for p, g in zip(params, saved):
            if g is None:
                p.grad = None
            elif p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)  # in place: DDP may hold the gradient as a view of its bucket


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Sample with BatchNorm running statistics and without dropout, then restore the modes."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)


class AdversarialFamily(Family):
    """A generator and a discriminator, each with its own Adam."""

    ema_names = ("generator",)
    num_classes = 0  # > 0: the generator is label-conditioned

    def __init__(self, train: TrainConfig, info: DataInfo):
        super().__init__()
        torch.manual_seed(train.seed)  # the same --seed builds the same initial networks
        self.train_cfg, self.info = train, info
        self.monitor = GanMonitor()

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def make_optimizers(self, betas: tuple[float, float], d_lr: float = 0.0) -> None:
        lr, wd = self.train_cfg.lr, self.train_cfg.weight_decay
        self.optimizers = {
            "discriminator": adam(self.nets["discriminator"].parameters(), d_lr or lr, decoupled=False,
                                  betas=betas, weight_decay=wd),
            "generator": adam(self.nets["generator"].parameters(), lr, decoupled=False, betas=betas,
                              weight_decay=wd),
        }

    def generator_step(self, loss: torch.Tensor, optimize: Optimize) -> None:
        """``optimize(loss, "generator")`` without touching the discriminator's accumulated gradients."""
        with preserved_grads(self.nets["discriminator"]):
            optimize(loss, "generator")

    def observe(self, logs: dict, real_logits: torch.Tensor, fake_logits: torch.Tensor,
                fake: torch.Tensor, real: torch.Tensor) -> dict:
        """Add mean D(x), mean D(G(z)) and the diversity ratio to ``logs``, as tensors (no host sync)."""
        logs.update(d_real=real_probability(real_logits).mean().detach(),
                    d_fake=real_probability(fake_logits).mean().detach(), diversity=diversity_ratio(fake, real))
        return logs

    def observe_logs(self, rows: list[dict[str, float]]) -> str:
        """The trainer's read of the logged values, one row per micro-batch in order: the monitor
        smooths them and returns the last warning that fell due ("" for none)."""
        warnings = [self.monitor.update(row["d_real"], row["d_fake"], row["diversity"]) for row in rows]
        return next((w for w in reversed(warnings) if w), "")

    def noise(self, n: int, z_dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """N(0, I) noise on the family's device; a given generator makes the same z on any device."""
        if generator is None:
            return torch.randn(n, z_dim, device=self.device)
        return torch.randn(n, z_dim, generator=generator, device=generator.device).to(self.device)

    def sample_labels(self, n: int, labels: torch.Tensor | None) -> torch.Tensor | None:
        """Labels to condition on: None when unconditional; default cycles through the classes."""
        if not self.conditional:
            return None  # an unconditional generator ignores labels (see ``conditional``)
        if labels is None:
            return torch.arange(n, device=self.device) % self.num_classes
        labels = torch.as_tensor(labels).to(self.device, torch.long).flatten()
        if labels.numel() != n:
            raise UserError(f"got {labels.numel()} labels for {n} samples")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise UserError(f"labels must lie between 0 and {self.num_classes - 1}")
        return labels

    def check_sample_options(self, options: dict) -> None:
        unknown = sorted(k for k, v in options.items() if k not in IGNORED_SAMPLE_OPTIONS and v is not None)
        if unknown:
            raise UserError(f"model {self.name} does not take the sampling option(s) {', '.join(unknown)}")


class NoiseToImageGAN(AdversarialFamily):
    """gan, dcgan and cgan: z (and a label) -> image. Subclasses define three hooks."""

    z_dim = 64

    def generate(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def discriminator_loss(self, real: torch.Tensor, real_labels: torch.Tensor, fake: torch.Tensor,
                           fake_labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (loss, logits on the reals, logits on the fakes)."""
        raise NotImplementedError

    def generator_loss(self, fake: torch.Tensor, fake_labels: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: Batch, optimize: Optimize) -> dict[str, float]:
        real = batch["image"]
        n = real.shape[0]
        real_labels = batch.get("label")
        if real_labels is None:
            real_labels = torch.full((n,), -1, dtype=torch.long, device=real.device)
        fake_labels = (torch.randint(0, self.num_classes, (n,), device=real.device)
                       if self.conditional else None)
        fake = self.generate(self.noise(n, self.z_dim), fake_labels)  # one G forward serves both steps

        d_loss, real_logits, fake_logits = self.discriminator_loss(real, real_labels, fake.detach(), fake_labels)
        optimize(d_loss, "discriminator")

        g_loss = self.generator_loss(fake, fake_labels)
        self.generator_step(g_loss, optimize)
        logs = {"d_loss": d_loss.detach(), "g_loss": g_loss.detach()}
        return self.observe(logs, real_logits, fake_logits, fake, real)

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None,
               **options) -> torch.Tensor:
        """``n`` images in [-1, 1]; the same ``generator`` seed gives the same z (and images) every call."""
        self.check_sample_options(options)
        z = self.noise(n, self.z_dim, generator)
        y = self.sample_labels(n, labels)
        with eval_mode(self.nets["generator"]):
            images = self.generate(z, y)
        return images.float().clamp(-1, 1)
