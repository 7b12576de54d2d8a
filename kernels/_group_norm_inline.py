"""GroupNorm+SiLU as torch.library *triton ops*, for torch.compile (opt-in, not yet measured).

A custom op (kernels._group_norm_ops) is opaque to Inductor: the compiled graph calls back into
Python and the custom-op dispatch for every GroupNorm, which on the H100 made the fused model
under torch.compile slower than torch.compile of the eager model (82.8 vs 48.7 ms a step,
benchmarks/results/2026-11-22-h100). A triton_op runs the same launch code, but its kernels are
wrapped with ``torch.library.wrap_triton``, so Inductor sees them and launches them from its own
generated code (and can capture them in CUDA graphs with mode="reduce-overhead").

Selected by ``GENSCALE_COMPILE_KERNELS=inline`` (see kernels._dispatch.compile_mode). Compiled CUDA
only: the Triton interpreter's kernels cannot be traced this way, so CPU runs keep the custom ops.
Tested on a GPU by tests/kernels/test_compile.py (gpu-marked); not yet run on one.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.library import triton_op, wrap_triton

from kernels._autograd import first_order_only_all
from kernels._group_norm_ops import _input_grads, _setup_context, backward, forward


@triton_op("genscale_kernels::group_norm_silu_fwd_inline", mutates_args=())
def group_norm_silu_fwd_inline(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                               num_groups: int, eps: float,
                               act: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return forward(x, weight, bias, num_groups, eps, act, wrap=wrap_triton)


@triton_op("genscale_kernels::group_norm_silu_bwd_inline", mutates_args=())
def group_norm_silu_bwd_inline(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                               bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                               num_groups: int, act: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return backward(dy, x, weight, bias, mean, rstd, num_groups, act, wrap=wrap_triton)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dbdw = group_norm_silu_bwd_inline(dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.act)
    return first_order_only_all(_input_grads(dx, dbdw, weight, bias), dy, x, weight, bias)


group_norm_silu_fwd_inline.register_autograd(_backward, setup_context=_setup_context)
