"""The learning rate as a function of the optimizer step: linear warm-up, then constant or a decay.

A pure function of the step (and the flags), so a resumed run needs no scheduler state and a
run resumed with other flags follows the new schedule from where it stands.

- ``constant``: ``lr`` after the warm-up (the harness's default, as before).
- ``linear``: from ``lr`` down to 0 at ``--steps``, straight (pix2pix's recipe when the decay
  starts half way: ``--lr-decay-start`` = steps / 2).
- ``cosine``: from ``lr`` down to 0 at ``--steps`` along half a cosine (Loshchilov & Hutter 2017,
  without restarts; diffusers' ``cosine``).

The decay starts at the later of the warm-up's end and ``--lr-decay-start``. Step ``s`` (0-based)
trains with the factor at progress ``p = (s - start) / (steps - start)``, so the first decayed
step still has the full rate and the last one a small positive one, never 0.
"""
from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, steps: int, warmup_steps: int = 0, schedule: str = "constant", decay_start: int = 0) -> float:
    """The multiplier of the base learning rate for 0-based optimizer step ``step``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    start = max(warmup_steps, decay_start)
    if schedule == "constant" or step < start or steps <= start:
        return warm
    progress = min(1.0, (step - start) / (steps - start))
    if schedule == "linear":
        return warm * (1.0 - progress)
    return warm * 0.5 * (1.0 + math.cos(math.pi * progress))
