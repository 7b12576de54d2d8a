"""The streaming pipeline: shards -> shuffled, decoded, augmented batches, replayable exactly.

Training (``resampled=True``): each rank draws shards with replacement from its own part of
the shard list (its own RNG stream when there are too few shards to part), shuffles samples
in a buffer, decodes, augments and batches in the DataLoader workers; the epoch is a fixed
``batches_per_epoch`` set on the WebLoader, so no rank runs dry and hangs the others.

Evaluation (``resampled=False``): every sample of the split is read exactly once across all
(rank, worker) pairs, unshuffled; the last batch may be short. Ranks may get different numbers
of batches, so evaluation must not run a collective per batch.

Determinism: every random choice (shard draws, shuffle buffer, crops, flips) comes from an RNG
seeded by (seed, epoch, rank, worker id, purpose), never from the clock, the pid or a global
RNG; the DataLoader gets a private generator, so building and iterating a loader leaves
torch's global RNG untouched. The same arguments give the same batches on every iteration;
num_workers 0 and 1 give the same stream, 2 workers another one (each worker streams on its
own and the DataLoader alternates between them in a fixed order).

A batch: "image" float32 NCHW in [-1, 1], "label" int64 (-1 = none), "source" for paired data,
"key" the sample keys, and "skipped" the number of samples (or unreadable tar members) dropped
since the previous batch of the same worker.

Labels: a ``.cls`` member or a JSON ``label``/``cls`` entry holding a non-negative integer (a string
of digits counts); anything else is no label (-1). A label past the shard set's ``num_classes``
stops the stream with a UserError naming the sample, raised in the main process.
"""
from __future__ import annotations

import ctypes
import multiprocessing.context
import os
import random
import signal
import sys
import threading
import zlib
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
import webdataset as wds

from genscale.data.shardset import ShardSet
from genscale.data.transforms import IMAGE_EXTENSIONS, READ_EXTENSIONS, ImageTransform, decode_image, label_value
from genscale.errors import UserError

# A resampled stream over shards that all fail would otherwise loop forever without a batch.
MAX_FAILURES_IN_A_ROW = 1000
# Purposes: independent RNG streams for one (seed, epoch, rank, worker).
_SHARDS, _SHUFFLE, _AUGMENT, _LOADER = range(4)
# A UserError raised in a DataLoader worker reaches the trainer re-raised with the worker's
# traceback inside its message; the stages send it as a batch under this key instead, and the
# loader raises it again in the main process (``_raise_user_errors``) as the one sentence it is.
_ERROR = "__user_error__"


def stream_seed(seed: int, epoch: int, rank: int, worker: int, purpose: int) -> int:
    """A 32-bit seed that depends on every argument (numpy SeedSequence hashing)."""
    words = [v % 2**64 for v in (seed, epoch, rank, worker, purpose)]  # SeedSequence wants v >= 0
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _read_member(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in READ_EXTENSIONS


def _image_handler(key: str, data: bytes):
    # wds.decode handler: images to PIL ("L" or "RGB"); .json falls through to wds's own.
    ext = key.rsplit(".", 1)[-1].lower()
    if ext in IMAGE_EXTENSIONS:
        return decode_image(data)
    if ext == "cls":  # wds's int() would drop the sample for "abc"; an unreadable label is no label
        label = label_value(data)
        return -1 if label is None else label
    return None


def _errors_as_batches(batches: Iterable[dict]) -> Iterator[dict]:
    try:
        yield from batches
    except UserError as err:
        yield {_ERROR: (str(err), err.exit_code)}


def _raise_user_errors(batches: Iterable[dict]) -> Iterator[dict]:
    for batch in batches:
        if _ERROR in batch:
            raise UserError(*batch[_ERROR])
        yield batch


@dataclass(frozen=True)
class _ShardSource:
    """First stage: the shard URLs of this (rank, worker), as dict(url=...)."""

    urls: tuple[str, ...]
    resampled: bool
    seed: int
    epoch: int
    rank: int
    world_size: int
    split_shards: bool  # eval: part shards among (rank, worker); else every pair reads all

    def __call__(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        if self.resampled:
            urls = list(self.urls)
            # Disjoint shards per rank only when they divide evenly: every rank draws the same
            # number of batches uniformly from its slice, so with slices of unequal length (6 shards
            # on 4 ranks: 2, 2, 1, 1) the shards of the short slices were drawn twice as often.
            if len(urls) >= self.world_size and len(urls) % self.world_size == 0:
                urls = urls[self.rank::self.world_size]
            # A fresh ResampledShards per iteration: its internal epoch counter always starts
            # at 0, so every iteration of the loader replays the same draws.
            seed = stream_seed(self.seed, self.epoch, self.rank, worker, _SHARDS)
            shards = wds.ResampledShards(urls, seed=0, worker_seed=lambda: seed, deterministic=True)
            return iter(shards)
        urls = list(self.urls)
        if self.split_shards:
            urls = urls[self.rank::self.world_size]
            return wds.split_by_worker(iter(wds.SimpleShardList(urls)))
        return iter(wds.SimpleShardList(urls))


@dataclass(frozen=True)
class _SampleStages:
    """Everything after the shard list, built per iteration inside the worker process, so the
    RNGs and the skip counter are private to one (rank, worker) stream."""

    transform: ImageTransform
    resampled: bool
    seed: int
    epoch: int
    rank: int
    world_size: int
    split_samples: bool
    batch_size: int
    shuffle_buffer: int

    def __call__(self, shards: Iterable[dict]) -> Iterator[dict]:
        worker, num_workers = _worker()
        skipped, in_a_row = [0], [0]

        def count(exn: Exception) -> bool:  # handler: drop the sample, remember, go on
            if isinstance(exn, UserError):  # e.g. a label past the last class: not a bad sample
                raise exn
            skipped[0] += 1
            in_a_row[0] += 1
            if in_a_row[0] >= MAX_FAILURES_IN_A_ROW:  # unreadable data: fail rather than spin
                raise UserError(f"{in_a_row[0]} samples in a row could not be read from the shards "
                                f"(last error: {type(exn).__name__}: {exn}).", exit_code=1)
            return True

        def transform(sample: dict) -> dict:
            out = self.transform(sample, augment_rng)
            in_a_row[0] = 0
            return out

        samples = wds.tarfile_to_samples(handler=count, select_files=_read_member)(shards)
        if self.split_samples:  # too few shards to part: part samples by a stable hash
            slots, slot = self.world_size * num_workers, self.rank * num_workers + worker
            samples = wds.select(lambda s: zlib.crc32(f"{s['__url__']}/{s['__key__']}".encode()) % slots == slot)(
                samples)
        if self.resampled and self.shuffle_buffer > 1:
            rng = random.Random(stream_seed(self.seed, self.epoch, self.rank, worker, _SHUFFLE))
            # initial = the full buffer: the first batches are then as well mixed as the rest
            # (the buffer holds undecoded bytes, so filling it is cheap).
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        samples = wds.decode(_image_handler, handler=count)(samples)
        augment_rng = random.Random(stream_seed(self.seed, self.epoch, self.rank, worker, _AUGMENT))
        samples = wds.map(transform, handler=count)(samples)

        def collate(batch: list[dict]) -> dict:
            out = {"image": torch.stack([s["image"] for s in batch]),
                   "label": torch.tensor([s["label"] for s in batch], dtype=torch.int64),
                   "key": [s["key"] for s in batch]}
            if "source" in batch[0]:
                out["source"] = torch.stack([s["source"] for s in batch])
            out["skipped"] = skipped[0]
            skipped[0] = 0
            return out

        return _errors_as_batches(wds.batched(self.batch_size, collation_fn=collate,
                                              partial=not self.resampled)(samples))


def _die_with(parent: int) -> None:
    """On Linux, have the kernel SIGKILL this worker when the trainer dies, however it dies.

    A trainer killed outright (the OOM killer, SIGKILL) left its worker running: blocked on a
    full queue no one reads, deaf to SIGTERM (below), holding the launching shell's output pipe.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the trainer died before prctl took effect
        os._exit(0)


_STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class _ShieldedProcess(multiprocessing.context.ForkProcess):
    """A loader worker forked with SIGTERM/SIGINT blocked, so that every thread it ever has blocks
    them: torch starts a thread in the child at fork (with the default thread count), and a thread
    started before ``ignore_stop_signals`` runs keeps an open mask, where a signal sent to the whole
    job landed and torch's worker handler died of it. The trainer's own mask is restored at once;
    a signal arriving meanwhile stays pending and is delivered then."""

    def start(self) -> None:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _ShieldedForkContext(multiprocessing.context.ForkContext):
    Process = _ShieldedProcess


def _worker_context() -> multiprocessing.context.BaseContext | None:
    """Forked shielded workers on Linux; elsewhere the platform's default (macOS spawns: a fork
    there is unsafe once system frameworks are loaded)."""
    return _ShieldedForkContext() if sys.platform.startswith("linux") else None


def ignore_stop_signals(_worker_id: int) -> None:
    """Loader workers leave SIGTERM/SIGINT to the trainer process, which saves before exiting.

    SLURM (scancel, preemption, the time limit) and Ctrl-C signal every process of a job; a
    worker killed that way would crash the trainer before it could save. Only the parent's own
    SIGTERM (multiprocessing's shutdown of its workers) still ends a worker: one thread waits for
    the signals, every other thread blocks them (they are forked blocked, see _ShieldedProcess).
    """
    parent = os.getppid()
    _die_with(parent)
    signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)

    def wait() -> None:
        while True:
            if signal.sigwaitinfo(_STOP_SIGNALS).si_pid == parent:
                os._exit(0)

    threading.Thread(target=wait, daemon=True, name="stop-signals").start()


def make_loader(shards: ShardSet, *, image_size: int, channels: int, batch_size: int,
                batches_per_epoch: int, seed: int, epoch: int, rank: int, world_size: int,
                num_workers: int = 1, shuffle_buffer: int = 1000, flip: bool = False,
                resampled: bool = True, class_cond: bool = True, random_crop: bool = False,
                source_channels: int | None = None) -> wds.WebLoader:
    """An iterable of batches for (seed, epoch, rank): see the module docstring.

    ``batches_per_epoch`` fixes the length of a resampled (training) epoch and is ignored when
    ``resampled=False``. ``class_cond=False`` reports every label as -1. Paired data crops and
    flips source and target together; ``source_channels`` defaults to ``channels``.
    """
    if not shards.urls:
        raise ValueError("the shard set holds no shards")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if batch_size < 1 or (resampled and batches_per_epoch < 1):
        raise ValueError("batch_size and batches_per_epoch must be positive")
    slots = world_size * max(1, num_workers)
    split_shards = not resampled and len(shards.urls) >= slots
    transform = ImageTransform(image_size=image_size, channels=channels, source_channels=source_channels,
                               flip=flip, random_crop=random_crop, class_cond=class_cond,
                               num_classes=shards.num_classes)
    common = dict(resampled=resampled, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
    pipeline = wds.DataPipeline(
        _ShardSource(urls=tuple(shards.urls), split_shards=split_shards, **common),
        _SampleStages(transform=transform, split_samples=not resampled and not split_shards,
                      batch_size=batch_size, shuffle_buffer=shuffle_buffer, **common),
    )
    # A private generator: the DataLoader draws its base seed from it instead of from torch's
    # global RNG, which the trainer checkpoints and must find untouched.
    generator = torch.Generator().manual_seed(stream_seed(seed, epoch, rank, 0, _LOADER))
    # Pinned batches on a GPU machine: the trainer's non_blocking copy from pinned memory is queued
    # behind the step's kernels; from ordinary memory it waits for them (a host-GPU sync per batch).
    loader = wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=num_workers,
                           generator=generator, persistent_workers=False, pin_memory=torch.cuda.is_available(),
                           worker_init_fn=ignore_stop_signals if num_workers else None,
                           multiprocessing_context=_worker_context() if num_workers else None)
    loader = loader.compose(_raise_user_errors)
    if resampled:
        # On the loader, not the dataset: a dataset's epoch would count per worker.
        loader = loader.with_epoch(batches_per_epoch)
    return loader
