"""Shared by the evaluation tests: hand-built runs, stub families, and an in-process stand-in
for an Accelerator of several ranks (threads meeting at barriers) to test collectives."""
from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from genscale import checkpoints as ckpt
from genscale.config import RunConfig, TrainConfig
from genscale.families import family_module
from genscale.families.base import DataInfo
from genscale.metrics.judge import digits_split

TINY_DDPM = dict(timesteps=50, base_width=16, channel_mults=(1, 2), attention_res=(4,), sampling_steps=5)


def make_run(out: Path, model: str = "ddpm", image_size: int = 8, num_classes: int = 10, seed: int = 0,
             **options) -> Path:
    """A run folder as train.py leaves it (config.json, one checkpoint with EMA weights), with
    freshly initialised weights: evaluation needs no training to be tested."""
    out.mkdir(parents=True, exist_ok=True)
    module = family_module(model)
    train = TrainConfig(model=model, image_size=image_size, out=str(out), seed=seed)
    opts = module.Options(**options)
    info = DataInfo("digits", 1, image_size, num_classes)
    torch.manual_seed(seed)
    family = module.FAMILY(train, opts, info)
    record = RunConfig(train, opts).to_dict()
    record["data_info"] = dataclasses.asdict(info)
    (out / "config.json").write_text(json.dumps(record))
    folder = ckpt.final_name(ckpt.checkpoint_root(out), 0)
    folder.mkdir(parents=True)
    ckpt.save_ema_weights(folder, {n: family.nets[n].state_dict() for n in family.ema_names})
    ckpt.write_meta(folder, 0)
    return out


def upsample(images: np.ndarray, size: int = 16) -> torch.Tensor:
    """uint8 N x 8 x 8 digits -> float N x 1 x size x size in [-1, 1]."""
    x = torch.as_tensor(images).float()[:, None] / 127.5 - 1
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(-1, 1)


class DigitsFamily:
    """A stand-in generator whose "samples" are real held-out digits of the asked class, picked by
    the generator: what a perfect model of the test split would draw."""

    name = "stub"
    device = torch.device("cpu")

    def __init__(self, size: int = 16, wrong: bool = False):
        _, _, x, y = digits_split()
        self.pool = {c: upsample(x[y == c], size) for c in range(10)}
        self.wrong = wrong  # draw the next class instead of the asked one
        self.calls: list[int] = []

    def sample(self, n, labels=None, generator=None, **options):
        self.calls.append(n)
        labels = torch.arange(n) % 10 if labels is None else labels.cpu()
        if self.wrong:
            labels = (labels + 1) % 10
        picks = torch.randint(0, 10**6, (n,), generator=generator)
        return torch.stack([self.pool[int(c)][int(i) % len(self.pool[int(c)])] for c, i in zip(labels, picks)])


class ThreadGroup:
    """``size`` fake ranks in threads; their collectives meet at a barrier."""

    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=120)
        self.slots: list = [None] * size

    def exchange(self, rank: int, value) -> list:
        self.slots[rank] = value
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out

    def run(self, fn) -> list:
        """fn(accelerator) on every rank; the results (or raised exceptions) in rank order."""
        results: list = [None] * self.size

        def body(rank: int) -> None:
            try:
                results[rank] = fn(FakeAccelerator(self, rank))
            except BaseException as err:  # noqa: BLE001 -- handed back to the test
                results[rank] = err

        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        return results


class FakeAccelerator:
    """The part of accelerate.Accelerator that genscale.metrics uses."""

    device = torch.device("cpu")

    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.process_index, self.num_processes = group, rank, group.size
        self.is_main_process = rank == 0

    def reduce(self, tensor, reduction="sum"):
        return torch.stack(self.group.exchange(self.process_index, tensor.clone())).sum(0)

    def gather(self, tensor):
        return torch.cat(self.group.exchange(self.process_index, tensor.clone()))

    def gather_object(self, items: list) -> list:
        return [x for part in self.group.exchange(self.process_index, list(items)) for x in part]
