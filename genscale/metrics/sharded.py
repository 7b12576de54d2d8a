"""Work on N numbered items split across ranks, gathered so every rank holds all N results.

The items (samples to draw, images to featurise) are cut into fixed-size chunks; chunk k holds
items [k * chunk_size, (k + 1) * chunk_size) and goes to rank k mod world_size. Anything random
about a chunk comes from a generator seeded by (seed, k) alone, so the results are a function
of the item index and never of how many processes share the work: 1 and 8 processes give the
same rows. Each rank computes its chunks without any collective; then all ranks take part in
the same collectives (did any rank fail? then one gather per round of chunks), so no rank waits
alone.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from genscale.errors import UserError

# Chunk k's rows: (k, start, stop) -> tensor (stop - start) x width (cast to the rows' dtype).
ChunkFn = Callable[[int, int, int], torch.Tensor]
# Independent streams for one (seed, chunk); the tag keeps them apart from the data stream's
# and the trainer's seeds.
SAMPLES, NOISE, MASKS = range(3)
_TAG = 0x6E7A


def chunk_seed(seed: int, chunk: int, purpose: int = SAMPLES) -> int:
    """A 32-bit seed for chunk ``chunk`` of a job seeded by ``seed`` (SeedSequence hashing)."""
    return int(np.random.SeedSequence([seed % 2**64, chunk, purpose, _TAG]).generate_state(1)[0])


def chunk_generator(seed: int, chunk: int, purpose: int = SAMPLES) -> torch.Generator:
    """The CPU generator every random draw of chunk ``chunk`` (for ``purpose``) comes from."""
    return torch.Generator().manual_seed(chunk_seed(seed, chunk, purpose))


def rank_chunks(num: int, chunk_size: int, rank: int, world_size: int) -> list[tuple[int, int, int]]:
    """(k, start, stop) of the chunks rank ``rank`` computes, round-robin."""
    count = math.ceil(num / chunk_size)
    return [(k, k * chunk_size, min(num, (k + 1) * chunk_size)) for k in range(rank, count, world_size)]


def _world(accelerator) -> tuple[int, int]:
    return (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)


def any_rank(flag: bool, accelerator) -> bool:
    """True on every rank if ``flag`` is true on any rank (one collective, called by all)."""
    _, world = _world(accelerator)
    if world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def sharded_rows(num: int, chunk_size: int, width: int, compute: ChunkFn, accelerator=None,
                 desc: str = "", dtype: torch.dtype = torch.float64, main_only: bool = False,
                 leave: bool = False) -> np.ndarray | None:
    """Rows (``num`` x ``width`` of ``dtype``: float64 for features, uint8 for images) in item
    order, computed chunk by chunk across ranks.

    ``accelerator`` None means one process. Every rank must call this with the same arguments.
    If ``compute`` raises on some rank, every rank raises (the failing rank its own error).
    ``main_only``: only the main rank gets the rows (the others None), so only it holds them all.
    ``desc`` names a progress bar on rank 0 (none when empty), left on screen when ``leave``.
    """
    if num < 1 or chunk_size < 1:
        raise UserError(f"need at least one item and a positive chunk size, got {num} and {chunk_size}.")
    chunk_size = min(chunk_size, num)  # the same chunks (one, when larger), without a buffer of chunk_size rows
    rank, world = _world(accelerator)
    mine = rank_chunks(num, chunk_size, rank, world)
    per_rank = math.ceil(math.ceil(num / chunk_size) / world)
    rows = torch.zeros((per_rank * chunk_size, width), dtype=dtype)  # round j's chunk at row j * chunk_size
    error: BaseException | None = None
    bar = tqdm(total=num, desc=desc, disable=not desc or rank != 0, leave=leave, dynamic_ncols=True)
    try:
        for j, (k, start, stop) in enumerate(mine):
            out = compute(k, start, stop).detach().to("cpu", dtype)
            if out.shape != (stop - start, width):
                raise RuntimeError(f"chunk {k} gave rows of shape {tuple(out.shape)}, expected {(stop - start, width)}")
            rows[j * chunk_size:j * chunk_size + stop - start] = out
            # rank 0's bar counts the round its chunk belongs to: chunks k .. k + world - 1, the last
            # round possibly short (world times its own chunk overshot the total)
            bar.update(min(num, (k + world) * chunk_size) - k * chunk_size)
    except Exception as err:  # noqa: BLE001 -- re-raised below once every rank knows
        error = err
    finally:
        bar.close()
    if any_rank(error is not None, accelerator):
        if error is not None:
            raise error
        raise UserError("another process failed (its error is printed above).", exit_code=1)
    if world == 1:  # the chunks lie in order from row 0: no copy (sample.py's images can be GBs)
        return rows[:num].numpy()
    keep = not main_only or accelerator.is_main_process
    result = torch.empty((num, width), dtype=dtype) if keep else None
    for j in range(per_rank):
        # One round at a time (a chunk from every rank): the device holds world chunks, not all
        # the rows. Round j's chunk of rank r is chunk k = j * world + r, items [k * cs, ...).
        part = accelerator.gather(rows[j * chunk_size:(j + 1) * chunk_size].to(accelerator.device))
        if result is not None:
            part = part.cpu()
            for r in range(world):
                start = (j * world + r) * chunk_size
                if start < num:
                    count = min(num, start + chunk_size) - start
                    result[start:start + count] = part[r * chunk_size:r * chunk_size + count]
    return None if result is None else result.numpy()


def gather_objects(items: list, accelerator=None) -> list:
    """Every rank's list, concatenated in rank order, on every rank (one collective)."""
    _, world = _world(accelerator)
    if world == 1:
        return list(items)
    from accelerate.utils import gather_object

    return list(gather_object(items))
