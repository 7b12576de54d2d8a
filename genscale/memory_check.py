"""Whether the samples a command asks for fit in memory, decided before any is drawn: buffers
that fill as batches finish would otherwise meet the OOM killer late, losing all the work."""
from __future__ import annotations

import math
import os
from pathlib import Path

from genscale.errors import UserError
from genscale.metrics.sharded import any_rank


def available_memory() -> int | None:
    """Bytes a new allocation can take: Linux's MemAvailable, or less under a cgroup limit (SLURM's
    --mem; MemAvailable shows the whole node); None where unknown."""
    found = []
    try:
        with open("/proc/meminfo") as meminfo:
            found += [int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def check_memory(num: int, shape: tuple[int, int, int], batch_size: int, accelerator=None) -> None:
    """Refuse before sampling when the samples cannot be held: the buffers fill as batches finish,
    so the OOM killer would otherwise end the job late, losing all of it. The main rank holds every
    image, each process of the machine its own share; every rank votes, so all refuse together
    (one refusing alone would leave the others waiting in a collective)."""
    width = math.prod(shape)
    world = 1 if accelerator is None else accelerator.num_processes
    local = 1 if accelerator is None else int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    share = math.ceil(math.ceil(num / batch_size) / world) * min(batch_size, num) * width
    need = share if world == 1 else num * width + local * share
    available = available_memory()
    short = available is not None and need > available
    if any_rank(short, accelerator):
        have = f"the {available / 2**30:.1f} GiB available" if short else "the memory another process has"
        raise UserError(f"--num {num} samples of {shape[0]} x {shape[1]} x {shape[2]} need about "
                        f"{need / 2**30:.1f} GiB of memory, more than {have}; draw fewer at a time "
                        "(e.g. several runs with different --seed values)")
