"""The contract every model family fulfils; the trainer knows families only through it.

A family owns its networks and optimizers. The trainer prepares them with Accelerate, keeps
an EMA of the networks named by ``ema_names``, checkpoints everything, and calls
``training_step`` once per micro-batch inside ``accelerator.accumulate``.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

# (loss, optimizer name) -> backward, clip when gradients sync, optimizer step, zero_grad.
# Under gradient accumulation Accelerate's wrapped optimizer skips the step until the last
# micro-batch, so a family may call this every micro-batch.
Optimize = Callable[[torch.Tensor, str], None]

# A batch: "image" float NCHW in [-1, 1], "label" int64 (-1 = no label); paired data adds
# "source" (the conditioning image); inpainting families build their masks themselves.
Batch = dict


@dataclass(frozen=True)
class DataInfo:
    """What a family needs to know about its data to build its networks."""

    name: str
    channels: int
    image_size: int
    num_classes: int  # 0 = unlabelled: the family trains unconditionally
    paired: bool = False


class Family:
    """Base class: subclasses fill ``nets`` and ``optimizers`` in ``__init__``."""

    name: str = ""
    ema_names: tuple[str, ...] = ()
    num_classes: int = 0  # > 0: sample() draws the classes it is given; 0: it draws without labels

    def __init__(self) -> None:
        self.nets: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}

    def training_step(self, batch: Batch, optimize: Optimize) -> dict[str, torch.Tensor | float]:
        """One micro-batch: compute losses, call ``optimize`` per optimizer, return scalars to log:
        0-dim tensors left on the device (``loss.detach()``, not ``loss.item()``, which waits for
        the GPU; the trainer reads them all at once at the next log step) or plain numbers."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None,
               **options) -> torch.Tensor:
        """Return ``n`` images in [-1, 1], NCHW, on the family's device."""
        raise NotImplementedError

    # Optional: ``grid(generator) -> (images, images_per_row)`` replaces the periodic sample grid
    # (e.g. input | output | target rows), and a "warning" string in training_step's dict is
    # printed and logged at the next logging step. ``observe_logs(rows) -> str`` receives the
    # logged values on the host, one dict per micro-batch in order, whenever the trainer reads them
    # (a GAN's monitor), and may return a warning. ``final_metrics() -> dict[str, float]`` is
    # called once with the EMA networks when training finishes (main process only): the trainer
    # prints it and logs it to metrics.jsonl (e.g. the VAE's negative ELBO on the test split).

    @contextmanager
    def using(self, nets: dict[str, nn.Module]) -> Iterator[None]:
        """Temporarily swap networks (the trainer samples grids with the EMA copies)."""
        saved = {k: self.nets[k] for k in nets}
        self.nets.update(nets)
        try:
            yield
        finally:
            self.nets.update(saved)

    @property
    def device(self) -> torch.device:
        return next(iter(self.nets.values())).parameters().__next__().device
