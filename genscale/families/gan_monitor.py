"""What to watch in a GAN run: D(x), D(G(z)), sample diversity, and the two classic failures.

- The discriminator wins outright: D(x) -> 1 and D(G(z)) -> 0. The generator's gradient then
  vanishes (or, with the non-saturating loss, grows without direction) and training stalls.
- Mode collapse: the generator maps every z to (nearly) the same image. Measured as the mean
  pairwise distance between the samples of a batch, relative to the same figure for the real
  batch beside it (1 = as diverse as the data, 0 = identical samples).

The detectors are pure functions; ``GanMonitor`` smooths the signals over steps (one bad
micro-batch is noise) and returns a warning sentence when a failure persists.
"""
from __future__ import annotations

import math

import torch


def discriminator_wins(d_real: float, d_fake: float, margin: float = 0.05) -> bool:
    """True when D is near-certain on both: mean D(x) > 1 - margin and mean D(G(z)) < margin."""
    return d_real > 1.0 - margin and d_fake < margin


def batch_diversity(images: torch.Tensor) -> torch.Tensor:
    """Mean RMS per-value distance between distinct images of a batch, as a 0-dim tensor on the
    images' device (NaN for fewer than two): the trainer reads it later, without a sync per step."""
    x = images.detach().float().flatten(1)
    n = x.shape[0]
    if n < 2:
        return torch.full((), math.nan, device=x.device)
    dist = torch.cdist(x, x) / math.sqrt(x.shape[1])
    return dist.sum() / (n * (n - 1))


def diversity_ratio(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Diversity of the generated batch over that of the real batch."""
    return batch_diversity(fake) / batch_diversity(real).clamp(min=1e-8)


def collapsed(ratio: float, threshold: float = 0.25) -> bool:
    """True when the samples are less than ``threshold`` as diverse as real images."""
    return ratio < threshold


class GanMonitor:
    """Smoothed D(x), D(G(z)) and diversity ratio; ``update`` returns a warning when one is due.

    A warning fires once a condition has held on the smoothed values for ``patience`` updates
    in a row (after ``warmup`` updates, while a fresh generator is still near-constant), and is
    repeated at most every ``repeat_every`` updates while it lasts.
    """

    def __init__(self, decay: float = 0.95, warmup: int = 200, patience: int = 50, repeat_every: int = 1000,
                 margin: float = 0.05, collapse_threshold: float = 0.25):
        self.decay, self.warmup, self.patience, self.repeat_every = decay, warmup, patience, repeat_every
        self.margin, self.collapse_threshold = margin, collapse_threshold
        self.updates = 0
        self._sums = {"d_real": 0.0, "d_fake": 0.0, "diversity": 0.0}
        self._weight = 0.0
        self._streak = {"wins": 0, "collapse": 0}
        self._last_warned = {"wins": -10**9, "collapse": -10**9}

    def smoothed(self) -> dict[str, float]:
        """Bias-corrected exponential averages of the signals seen so far."""
        return {k: v / self._weight for k, v in self._sums.items()} if self._weight else {}

    def update(self, d_real: float, d_fake: float, diversity: float) -> str | None:
        self.updates += 1
        self._weight = self.decay * self._weight + (1 - self.decay)
        for key, value in (("d_real", d_real), ("d_fake", d_fake), ("diversity", diversity)):
            if math.isfinite(value):
                self._sums[key] = self.decay * self._sums[key] + (1 - self.decay) * value
        s = self.smoothed()
        if self.updates <= self.warmup:
            return None
        states = {"wins": discriminator_wins(s["d_real"], s["d_fake"], self.margin),
                  "collapse": collapsed(s["diversity"], self.collapse_threshold)}
        messages = []
        for key, bad in states.items():
            self._streak[key] = self._streak[key] + 1 if bad else 0
            due = self.updates - self._last_warned[key] >= self.repeat_every
            if self._streak[key] >= self.patience and due:
                self._last_warned[key] = self.updates
                messages.append(self._message(key, s))
        return " ".join(messages) or None

    def _message(self, key: str, s: dict[str, float]) -> str:
        if key == "wins":
            return (f"warning: the discriminator wins outright (mean D(x) = {s['d_real']:.3f}, "
                    f"mean D(G(z)) = {s['d_fake']:.3f} over the last {self.patience}+ steps); its verdicts no longer "
                    "guide the generator - try a lower discriminator learning rate (--d-lr) or a smaller "
                    "discriminator.")
        return (f"warning: the samples look collapsed (their diversity across a batch is "
                f"{s['diversity']:.2f} of the real images'); the generator is producing nearly the same image "
                "for every input.")
