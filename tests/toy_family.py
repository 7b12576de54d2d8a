"""A tiny family and data stream for testing the trainer without images or diffusion.

Linear regression y = x @ w_true + noise; the family also draws from torch's global RNG in
every step (an input jitter) so that exact resume depends on the trainer's RNG handling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from genscale.config import RunConfig, TrainConfig
from genscale.families.base import Family

W_TRUE = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


@dataclass
class ToyOptions:
    jitter: float = 0.1  # std of a random input perturbation drawn inside training_step
    nan_at_step: int = -1  # make the loss non-finite from this many training_step calls on


class ToyFamily(Family):
    name = "toy"
    ema_names = ("model",)

    def __init__(self, train: TrainConfig, options: ToyOptions):
        super().__init__()
        self.opts = options
        torch.manual_seed(train.seed)
        self.nets["model"] = nn.Linear(4, 1)
        self.optimizers["model"] = torch.optim.AdamW(self.nets["model"].parameters(), lr=train.lr)
        self.calls = 0

    def training_step(self, batch, optimize):
        x, y = batch["x"], batch["y"]
        if self.opts.jitter:
            x = x + self.opts.jitter * torch.randn_like(x)
        loss = ((self.nets["model"](x) - y) ** 2).mean()
        self.calls += 1
        if 0 <= self.opts.nan_at_step < self.calls:
            loss = loss * float("nan")
        optimize(loss, "model")
        return {"loss": loss.detach()}  # left on the device: the trainer reads the logs in batches

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, **options):
        w = self.nets["model"].weight.view(1, 1, 2, 2)
        return torch.tanh(w.expand(n, 1, 2, 2) + torch.randn(n, 1, 2, 2, generator=generator))


def big_batch(step: int, size: int, rank: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(size, 4, generator=g)
    y = x @ W_TRUE + 0.01 * torch.randn(size, 1, generator=g)
    return {"x": x, "y": y}


def stream_factory(batch: int, accum: int, rank: int = 0, world: int = 1):
    """Step k's data is one big batch of batch*accum*world rows; each (rank, micro) gets its slice."""

    def stream(start_step: int):
        step = start_step
        while True:
            full = big_batch(step, batch * accum * world)
            for micro in range(accum):
                lo = (micro * world + rank) * batch
                yield {k: v[lo:lo + batch] for k, v in full.items()}
            step += 1

    return stream


def toy_run(out: str, **train_overrides) -> RunConfig:
    options = ToyOptions(**{k: train_overrides.pop(k) for k in ("jitter", "nan_at_step") if k in train_overrides})
    values = dict(model="toy", out=out, steps=12, batch_size=8, lr=0.05, warmup_steps=3, ckpt_every=4,
                  sample_every=0, log_every=2, ema_decay=0.9, grad_clip=0.0)
    values.update(train_overrides)
    return RunConfig(TrainConfig(**values), options)
