"""The families' optimizers: torch.optim's Adam and AdamW, with the fused step.

The default step is a Python loop over the parameters on a CPU (several small operations per
tensor) and foreach kernels over chunks of them on a GPU; the fused step updates all of an
optimizer's tensors of one device and dtype in one kernel. Same algorithm, results equal up to
rounding (tests/test_optim.py checks it against the formulas in float64). Measured on the 2-core
build machine (AdamW alone, one thread, 2026-11-23): 300 U-Net-sized tensors 72 -> 29 ms a step,
240 small ones 13.6 -> 3.8 ms; a whole step of the 8-pixel ddpm preset is convolutions (150
steps: 24-26 CPU s either way). On a GPU it is fewer kernel launches in a step that is
host-bound (benchmarks/results/2026-11-22-h100); the U-Net benchmark already used it.
"""
from __future__ import annotations

from typing import Iterable

import torch


def adam(params: Iterable[torch.Tensor], lr: float, *, decoupled: bool, **options) -> torch.optim.Optimizer:
    """AdamW (``decoupled`` weight decay) or Adam (L2 weight decay) with the fused step; ``options``
    are the optimizer's own (betas, weight_decay, eps)."""
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    return cls(params, lr=lr, fused=True, **options)
