"""GroupNorm (+ optional SiLU): the public entry point and its eager reference.

The reference is both the fallback for tensors that are not on CUDA and the oracle the Triton
kernels are tested against. Both compute in fp32 (fp64 for fp64 inputs) and return x's dtype
and memory format, so a bf16 activation with fp32 parameters works without autocast.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.nn.functional as F

from kernels import _group_norm_ops
from kernels._dispatch import compile_mode, compiling, use_triton

try:
    from kernels import _group_norm_inline
except ImportError:  # a torch without torch.library.triton_op: the custom ops serve torch.compile
    _group_norm_inline = None

_ACTIVATIONS = ("silu", None)


def _check(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
           num_groups: int, eps: float, activation: str | None) -> None:
    if isinstance(num_groups, bool) or not hasattr(type(num_groups), "__index__") or torch.is_tensor(num_groups):
        raise TypeError(f"num_groups must be an integer; got {num_groups!r}")
    num_groups = operator.index(num_groups)
    if isinstance(eps, bool) or torch.is_tensor(eps) or not isinstance(eps, (int, float)) or not 0 <= eps < math.inf:
        raise ValueError(f"GroupNorm eps must be a finite number >= 0; got {eps!r}")
    if x.dim() < 2:
        raise ValueError(f"GroupNorm needs an input of shape [N, C, ...]; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"GroupNorm needs a floating-point input; got {x.dtype}")
    channels = x.shape[1]
    if num_groups <= 0 or channels % num_groups != 0:
        raise ValueError(
            f"GroupNorm needs channels divisible by groups: got C={channels}, num_groups={num_groups}"
        )
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if tuple(p.shape) != (channels,):
            raise ValueError(f"GroupNorm {name} must have shape ({channels},); got {tuple(p.shape)}")
        if not p.is_floating_point():
            raise ValueError(f"GroupNorm {name} must be a floating tensor; got {p.dtype}")
        if p.device != x.device:
            raise ValueError(f"GroupNorm {name} is on {p.device} but the input is on {x.device}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected 'silu' or None")


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def group_norm_silu_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float = 1e-5,
    activation: str | None = "silu",
) -> torch.Tensor:
    """Eager PyTorch: ``silu(group_norm(x))`` computed in fp32 (fp64 for fp64 x)."""
    _check(x, weight, bias, num_groups, eps, activation)
    if x.numel() == 0:  # F.group_norm refuses C = 0 or an empty spatial size; the kernels return empty
        return x * 0  # empty, and still in the autograd graph
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = weight.to(compute) if weight is not None else None
    b = bias.to(compute) if bias is not None else None
    y = F.group_norm(x.to(compute), num_groups, w, b, eps)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype).contiguous(memory_format=_memory_format(x))


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float = 1e-5,
    activation: str | None = "silu",
) -> torch.Tensor:
    """``F.silu(F.group_norm(x, num_groups, weight, bias, eps))``; ``activation=None`` is plain GroupNorm.

    x is [N, C, *] in fp32, fp16 or bf16, NCHW or channels_last (the output keeps x's dtype and
    memory format); weight and bias are optional [C] tensors of any float dtype. CUDA tensors run
    the Triton kernels (forward and backward), everything else the eager reference; see
    kernels._dispatch for the GENSCALE_KERNELS override.
    """
    _check(x, weight, bias, num_groups, eps, activation)
    num_groups = operator.index(num_groups)
    if use_triton(x, weight, bias) and x.dtype != torch.float64:
        # The kernels index weight and bias as dense vectors: a strided or expanded one is copied
        # here (no-op when already dense), where autograd sees the copy.
        weight = weight.contiguous() if weight is not None else None
        bias = bias.contiguous() if bias is not None else None
        mode = compile_mode() if compiling() else None
        if mode == "reference":  # Inductor fuses the reference itself (see _dispatch.compile_mode)
            return group_norm_silu_reference(x, weight, bias, num_groups, eps, activation)
        if mode == "inline" and _group_norm_inline is not None:
            op = _group_norm_inline.group_norm_silu_fwd_inline
            return op(x, weight, bias, num_groups, float(eps), activation == "silu")[0]
        return _group_norm_ops.group_norm_silu(x, weight, bias, num_groups, float(eps), activation == "silu")
    return group_norm_silu_reference(x, weight, bias, num_groups, eps, activation)
