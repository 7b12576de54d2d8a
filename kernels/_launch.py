"""Launching a Triton kernel again with less host time than ``kernel[grid](...)``.

A launch through a jit function binds and specialises every argument, builds a cache key and
looks the compiled kernel up, every time: ~24 us of host time per launch on the H100 machine
(benchmarks/results/2026-11-22-h100/profiles/launch_host.txt) against 7-13 us for a PyTorch op,
and the U-Net step with the fused kernels is bound by the host issuing kernels. A GroupNorm
launch repeats the same scalars, constants and grid for a given shape, so the compiled kernel the
first launch returns is kept and launched directly afterwards through ``CompiledKernel[grid]``
(the way Triton launches a kernel it compiled ahead of time).

Triton compiles one kernel per *specialisation* of the arguments: integers by value class (fixed
here: the scalars of a launch never change), tensors by dtype and by whether their address is a
multiple of 16. So a direct launch is keyed by the tensors' dtypes and alignment, checked on
every call; any other combination goes through the jit function, which compiles it if needed,
and is kept under its own key. ``GENSCALE_TRITON_LAUNCH=jit`` always launches through the jit
function (for comparison).

What the jit function does on every launch and a kept launch does not: re-read Triton's debug and
instrumentation settings (part of its compile key) and run pre-run hooks (none here); the
kernel is the one loaded on the CUDA device current at the first launch, which is the tensors'
device in a process that drives one GPU (one per process under Accelerate).
"""
from __future__ import annotations

import functools
import os

_MODES = ("direct", "jit")


def direct_launch() -> bool:
    """Whether launches after the first go straight to the compiled kernel (GENSCALE_TRITON_LAUNCH)."""
    mode = os.environ.get("GENSCALE_TRITON_LAUNCH", "direct").strip().lower() or "direct"
    if mode not in _MODES:
        raise ValueError(f"GENSCALE_TRITON_LAUNCH must be direct or jit; got {mode!r}")
    return mode == "direct"


@functools.lru_cache(maxsize=None)
def _compiled_kernel_type() -> type | None:
    try:
        from triton.compiler import CompiledKernel
    except ImportError:
        return None
    return CompiledKernel


def _signature(tensors: tuple) -> tuple:
    """What Triton specialises a tensor argument on: its dtype and 16-byte alignment."""
    return tuple([(t.dtype, t.data_ptr() % 16 == 0) for t in tensors])


def _trailing_arguments(kernel, count: int, meta: dict) -> tuple | None:
    """The kernel's parameters after the first ``count``, in order, as the jit function binds them
    (constexprs included: the compiled kernel's launcher takes and skips them); None when one of
    them is neither in ``meta`` nor defaulted (then the launch is not kept)."""
    params = getattr(kernel, "params", None)  # autotune/heuristics wrappers have none: not kept
    if params is None:
        return None
    values = []
    for param in params[count:]:
        if param.name in meta:
            values.append(meta[param.name])
        elif param.has_default:
            values.append(param.default)
        else:
            return None
    return tuple(values)


def launch(kernel, grid: tuple, tensors: tuple, scalars: tuple, meta: dict, kept: dict | None) -> None:
    """``kernel[grid](*tensors, *scalars, **meta)``; with ``kept`` (a dict owned by the caller, one
    per fixed grid/scalars/meta), later launches with the same tensor signature skip the jit."""
    if kept is None:
        kernel[grid](*tensors, *scalars, **meta)
        return
    signature = _signature(tensors)
    found = kept.get(signature)
    if found is not None and found[0] is kernel:  # a kernel swapped out (a stub, a test) is called
        runner, trailing = found[1:]
        runner(*tensors, *trailing)
        return
    compiled = kernel[grid](*tensors, *scalars, **meta)
    compiled_type = _compiled_kernel_type()
    if compiled_type is None or not isinstance(compiled, compiled_type):
        return  # the interpreter (or a stub) returns no compiled kernel: nothing to keep
    rest = _trailing_arguments(kernel, len(tensors) + len(scalars), meta)
    if rest is not None:
        full_grid = tuple(grid) + (1,) * (3 - len(grid))
        kept[signature] = (kernel, compiled[full_grid], tuple(scalars) + rest)
