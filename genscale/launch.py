"""The launch's process group: one Accelerator per process, refused for sharded weights.

On a GPU-less machine `accelerate launch` starts N gloo processes (cpu=True) that share the cores.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from genscale.cli import ranks_started
from genscale.errors import UserError


def sharded_weights(acc) -> str:
    """The name of the launch's weight sharding (FSDP, DeepSpeed ZeRO-3), or "" when every rank
    holds whole weights (DDP, ZeRO-1/2, one process)."""
    if acc.distributed_type == DistributedType.FSDP:
        return "FSDP"
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if acc.distributed_type == DistributedType.DEEPSPEED and getattr(plugin, "zero_stage", 0) == 3:
        return "DeepSpeed ZeRO-3"
    return ""


def new_accelerator(share_cores: bool = True, **kwargs) -> Accelerator:
    """An Accelerator for this process (gloo on a GPU-less machine, whose cores the local processes
    share; ``share_cores=False``: only under a launcher, a lone process keeping torch's own thread
    count); settings accelerate refuses (fp8 without its packages, an unknown precision) are one
    sentence, not its traceback."""
    cpu = not torch.cuda.is_available()
    try:
        acc = Accelerator(cpu=cpu, **kwargs)
    except (ValueError, ImportError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"accelerate refused this launch's settings: {reason}") from None
    ranks_started()
    if cpu and (share_cores or "LOCAL_WORLD_SIZE" in os.environ):
        # accelerate launch pins OMP_NUM_THREADS=1; share the cores between local processes instead.
        threads = int(os.environ.get("GENSCALE_THREADS", "0")) or max(1, (os.cpu_count() or 1) // _local_world())
        torch.set_num_threads(threads)
    return acc


def make_accelerator(grad_accum: int, out: Path, log_with: str = "") -> Accelerator:
    """The training launch's process group: one Accelerator per process, whole weights on every rank."""
    acc = new_accelerator(gradient_accumulation_steps=grad_accum, project_dir=str(out), log_with=log_with or None)
    sharded = sharded_weights(acc)
    if sharded:
        # A deepcopy of a sharded module raises, the grids sample on one rank only and the EMA
        # weights would be saved from rank 0's shards alone: refuse rather than fail later.
        raise UserError(f"{sharded} is not supported yet (the EMA copy and the sample grids need whole weights); "
                        "use DDP, e.g. accelerate_configs/multi_gpu.yaml")
    return acc


def _local_world() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
