"""GroupNorm+SiLU as torch.library custom ops backed by the Triton kernels.

Custom ops keep torch.compile free of graph breaks: the compiler sees one opaque op with a fake
(shape-only) implementation and an autograd formula, and calls the Triton launcher at run time.
This module also plans each launch (which strategy, block shapes, how far to split).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from kernels._dispatch import compiling, env_int, sm_count

# Largest register tile (elements) one fused program holds: x alone forward, x and dy backward.
FUSED_MAX_FWD = 16384
FUSED_MAX_BWD = 8192
SPLIT_TILE = 4096  # elements per tile in the split path's loop
LOOP_TILE = 4096  # elements per tile in the looped fused path


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def ncs_strides(t: torch.Tensor) -> tuple[int, int, int] | None:
    """Strides of ``t`` seen as [N, C, S]; None when its spatial dims cannot collapse into one."""
    n_stride, c_stride = t.stride(0), t.stride(1)
    dims = [(size, stride) for size, stride in zip(t.shape[2:], t.stride()[2:]) if size != 1]
    if not dims:
        return n_stride, c_stride, 1
    for (_, outer), (inner_size, inner) in zip(dims, dims[1:]):
        if outer != inner * inner_size:
            return None
    return n_stride, c_stride, dims[-1][1]


def _viewable(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    strides = ncs_strides(t)
    if strides is None:  # e.g. a spatial crop: rare, copy rather than support every stride pattern
        t = t.contiguous()
        strides = ncs_strides(t)
    return t, strides  # type: ignore[return-value]


@dataclass(frozen=True)
class Plan:
    fused: bool
    single: bool = True  # fused: the groups stay in registers (one read); else two looped passes
    group_block: int = 1  # fused: groups per program
    block_cg: int = 1
    block_c: int = 1  # split: channels per program
    block_s: int = 1
    split: int = 1  # split: spatial chunks per (sample, channel block)
    chunk: int = 1
    num_warps: int = 4


def make_plan(x: torch.Tensor, num_groups: int, x_strides: tuple[int, int, int], backward: bool) -> Plan:
    """Fused (single pass or looped) when N x G / GB programs fill the GPU, else split.

    Environment overrides, for tests and tuning: GENSCALE_GN_PATH=fused|looped|split, and
    GENSCALE_GN_BLOCK_S / _BLOCK_C / _SPLIT / _FUSED_MAX_FWD / _FUSED_MAX_BWD.
    """
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(1, n * c)
    cg = c // num_groups
    channel_fast = x_strides[1] == 1 and s > 1
    sms = sm_count(x.device)
    forced = _path_override()
    # channels_last: several groups per program, so that each row a program reads is >= 32
    # bytes, as long as that still leaves one program per multiprocessor.
    group_block = 1
    if channel_fast:
        while group_block < num_groups and group_block * cg * x.element_size() < 32:
            group_block *= 2
        while group_block > 1 and n * _cdiv(num_groups, group_block) < sms:
            group_block //= 2
    block_cg = _pow2(cg)
    if backward:
        limit = env_int("GENSCALE_GN_FUSED_MAX_BWD", FUSED_MAX_BWD)
    else:
        limit = env_int("GENSCALE_GN_FUSED_MAX_FWD", FUSED_MAX_FWD)
    enough = n * _cdiv(num_groups, group_block) >= sms
    if forced in ("fused", "looped") or (not forced and enough):
        single = group_block * block_cg * _pow2(s) <= limit and forced != "looped"
        block_s = _pow2(s) if single else max(1, min(_pow2(s), LOOP_TILE // (group_block * block_cg)))
        block_s = block_s if single else env_int("GENSCALE_GN_BLOCK_S", block_s)
        elems = group_block * block_cg * block_s
        warps = min(16, max(4, elems // 512))
        return Plan(True, single, group_block=group_block, block_cg=block_cg, block_s=block_s, num_warps=warps)
    if channel_fast:
        block_c = min(_pow2(c), 256)
        block_s = max(1, min(_pow2(s), SPLIT_TILE // block_c))
    else:
        block_s = min(_pow2(s), 1024)
        block_c = min(_pow2(c), max(1, SPLIT_TILE // block_s))
    # Overrides (powers of two) let tests exercise multi-tile loops and channel blocks at tiny shapes.
    block_s = env_int("GENSCALE_GN_BLOCK_S", block_s)
    block_c = env_int("GENSCALE_GN_BLOCK_C", block_c)
    c_blocks = _cdiv(c, block_c)
    tiles = _cdiv(s, block_s)
    split = env_int("GENSCALE_GN_SPLIT", 0) or _cdiv(4 * sms, n * c_blocks)
    split = max(1, min(split, tiles))
    chunk = _cdiv(tiles, split) * block_s
    split = _cdiv(s, chunk)
    return Plan(False, block_c=block_c, block_s=block_s, split=split, chunk=chunk, num_warps=8)


def _path_override() -> str:
    path = os.environ.get("GENSCALE_GN_PATH", "").strip().lower()
    if path not in ("", "fused", "looped", "split"):
        raise ValueError(f"GENSCALE_GN_PATH must be fused, looped or split; got {path!r}")
    return path


def _dummy(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return like if t is None else t


def _finalize_blocks(cg: int, split: int) -> tuple[int, int]:
    block_k = min(_pow2(split), 64)
    return min(_pow2(cg), max(1, 1024 // block_k)), block_k


def forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            num_groups: int, eps: float, act: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from kernels import _group_norm_triton as k

    x, xs = _viewable(x)
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(1, n * c)
    cg = c // num_groups
    y = torch.empty_like(x)
    ys = ncs_strides(y)  # empty_like of a viewable x is dense, hence viewable
    mean = torch.empty((n, num_groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if x.numel() == 0:
        return y, mean, rstd
    p = make_plan(x, num_groups, xs, backward=False)
    w, b = _dummy(weight, x), _dummy(bias, x)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=act)
    inv_cnt = 1.0 / (cg * s)
    if p.fused:
        grid = (n, _cdiv(num_groups, p.group_block))
        k.gn_fwd_fused[grid](x, y, w, b, mean, rstd, num_groups, cg, s, inv_cnt, eps, *xs, *ys, **flags,
                             GB=p.group_block, BLOCK_CG=p.block_cg, BLOCK_S=p.block_s, SINGLE=p.single,
                             num_warps=p.num_warps)
        return y, mean, rstd
    grid = (n, _cdiv(c, p.block_c), p.split)
    plane = n * p.split * c
    part = torch.empty((2, n * p.split, c), device=x.device, dtype=torch.float32)
    k.gn_stats_partial[grid](x, part, c, s, p.chunk, p.split, plane, *xs,
                             BLOCK_C=p.block_c, BLOCK_S=p.block_s, num_warps=p.num_warps)
    bcg, bk = _finalize_blocks(cg, p.split)
    k.gn_stats_finalize[(n * num_groups,)](part, mean, rstd, c, num_groups, cg, s, p.chunk, p.split, plane,
                                            inv_cnt, eps, BLOCK_CG=bcg, BLOCK_K=bk, num_warps=4)
    k.gn_apply[grid](x, y, w, b, mean, rstd, c, num_groups, cg, s, p.chunk, *xs, *ys, **flags,
                     BLOCK_C=p.block_c, BLOCK_S=p.block_s, num_warps=p.num_warps)
    return y, mean, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             mean: torch.Tensor, rstd: torch.Tensor, num_groups: int, act: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns dx (x's dtype and layout) and a [2, C] fp32 tensor holding dbias and dweight."""
    from kernels import _group_norm_triton as k

    x, xs = _viewable(x)
    dy, ds = _viewable(dy)
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(1, n * c)
    cg = c // num_groups
    dx = torch.empty_like(x)
    os_ = ncs_strides(dx)
    if x.numel() == 0:
        return dx, torch.zeros((2, c), device=x.device, dtype=torch.float32)
    p = make_plan(x, num_groups, xs, backward=True)
    w, b = _dummy(weight, x), _dummy(bias, x)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=act)
    inv_cnt = 1.0 / (cg * s)
    split = 1 if p.fused else p.split
    plane = n * split * c
    part = torch.empty((2, n * split, c), device=x.device, dtype=torch.float32)
    if p.fused:
        grid = (n, _cdiv(num_groups, p.group_block))
        k.gn_bwd_fused[grid](x, dy, dx, w, b, mean, rstd, part, c, num_groups, cg, s, inv_cnt, plane,
                             *xs, *ds, *os_, **flags,
                             GB=p.group_block, BLOCK_CG=p.block_cg, BLOCK_S=p.block_s, SINGLE=p.single,
                             num_warps=p.num_warps)
    else:
        grid = (n, _cdiv(c, p.block_c), p.split)
        k.gn_bwd_partial[grid](x, dy, w, b, mean, rstd, part, c, num_groups, cg, s, p.chunk, p.split, plane,
                               *xs, *ds, **flags, BLOCK_C=p.block_c, BLOCK_S=p.block_s, num_warps=p.num_warps)
        coef = torch.empty((2, n * num_groups), device=x.device, dtype=torch.float32)
        bcg, bk = _finalize_blocks(cg, p.split)
        k.gn_bwd_finalize[(n * num_groups,)](part, w, coef, c, num_groups, cg, p.split, plane, inv_cnt,
                                              n * num_groups, HAS_W=weight is not None,
                                              BLOCK_CG=bcg, BLOCK_K=bk, num_warps=4)
        k.gn_bwd_apply[grid](x, dy, dx, w, b, mean, rstd, coef, c, num_groups, cg, s, p.chunk, n * num_groups,
                             *xs, *ds, *os_, **flags, BLOCK_C=p.block_c, BLOCK_S=p.block_s, num_warps=p.num_warps)
    # A fixed-order sum over samples and chunks: deterministic dweight / dbias.
    return dx, part.sum(dim=1)


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("genscale_kernels::group_norm_silu_fwd", mutates_args=())
def group_norm_silu_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                        num_groups: int, eps: float, act: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return forward(x, weight, bias, num_groups, eps, act)


@group_norm_silu_fwd.register_fake
def _(x, weight, bias, num_groups, eps, act):
    stats = (x.shape[0], num_groups)
    y = torch.empty_like(x) if ncs_strides(x) is not None else torch.empty_like(x.contiguous())
    return y, x.new_empty(stats, dtype=torch.float32), x.new_empty(stats, dtype=torch.float32)


@torch.library.custom_op("genscale_kernels::group_norm_silu_bwd", mutates_args=())
def group_norm_silu_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                        bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                        num_groups: int, act: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return backward(dy, x, weight, bias, mean, rstd, num_groups, act)


@group_norm_silu_bwd.register_fake
def _(dy, x, weight, bias, mean, rstd, num_groups, act):
    dx = torch.empty_like(x) if ncs_strides(x) is not None else torch.empty_like(x.contiguous())
    return dx, x.new_empty((2, x.shape[1]), dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, num_groups, _eps, act = inputs
    _y, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.num_groups, ctx.act = num_groups, act


def _input_grads(dx, dbdw, weight, bias):
    dw = dbdw[1].to(weight.dtype) if weight is not None else None
    db = dbdw[0].to(bias.dtype) if bias is not None else None
    return dx, dw, db, None, None, None


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dbdw = group_norm_silu_bwd(dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.act)
    return _input_grads(dx, dbdw, weight, bias)


group_norm_silu_fwd.register_autograd(_backward, setup_context=_setup_context)


class _Direct(torch.autograd.Function):
    """The custom op's forward and backward without the custom-op dispatch (eager calls)."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, act):
        y, mean, rstd = forward(x, weight, bias, num_groups, eps, act)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.act = num_groups, act
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dbdw = backward(dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.act)
        return _input_grads(dx, dbdw, weight, bias)


def group_norm_silu(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    num_groups: int, eps: float, act: bool) -> torch.Tensor:
    """The Triton GroupNorm(+SiLU): the custom op under torch.compile, a direct call otherwise."""
    if compiling():
        return group_norm_silu_fwd(x, weight, bias, num_groups, eps, act)[0]
    return _Direct.apply(x, weight, bias, num_groups, eps, act)
