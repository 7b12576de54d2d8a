"""GroupNorm+SiLU as torch.library custom ops backed by the Triton kernels.

Custom ops keep torch.compile free of graph breaks: the compiler sees one opaque op with a fake
(shape-only) implementation and an autograd formula, and calls the Triton launcher at run time.
This module also plans each launch (which strategy, block shapes, how far to split).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from kernels._autograd import first_order_only_all
from kernels._dispatch import compiling, env_int, env_values, sm_count
from kernels._launch import direct_launch, launch

# Largest register tile (elements) one fused program holds: x alone forward, x and dy backward.
FUSED_MAX_FWD = 16384
FUSED_MAX_BWD = 8192
SPLIT_TILE = 4096  # elements per tile in the split path's loop
# Elements per tile in the looped fused path. Each tile is one round of loads in flight; with one
# or two programs per multiprocessor (large groups, few programs) 4096 bf16 elements are 8-16 KB
# in flight per SM, under the ~23 KB that 3 TB/s x ~1 us of latency asks for: the suspect of
# the looped plan's 26% of copy bandwidth. GENSCALE_GN_LOOP_TILE tries larger ones, and
# GENSCALE_GN_LOOP_STAGES > 1 keeps that many tiles in flight through shared memory (Triton's
# software pipelining, cp.async on sm_90; 1 compiles to the same PTX as a plain loop). Both untimed.
LOOP_TILE = 4096


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
    stages: int = 1  # looped: tiles of loads in flight (software pipelining through shared memory)


def make_plan(x: torch.Tensor, num_groups: int, x_strides: tuple[int, int, int], backward: bool) -> Plan:
    """Fused (single pass or looped) when N x G / GB programs fill the GPU, else split.

    Environment overrides, for tests and tuning: GENSCALE_GN_PATH=fused|looped|split, and
    GENSCALE_GN_BLOCK_S / _BLOCK_C / _SPLIT / _FUSED_MAX_FWD / _FUSED_MAX_BWD / _GROUP_BLOCK /
    _LOOP_TILE / _LOOP_STAGES.
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
    group_block = env_int("GENSCALE_GN_GROUP_BLOCK", group_block, power_of_two=True)  # a power of two (tuning)
    block_cg = _pow2(cg)
    if backward:
        limit = env_int("GENSCALE_GN_FUSED_MAX_BWD", FUSED_MAX_BWD)
    else:
        limit = env_int("GENSCALE_GN_FUSED_MAX_FWD", FUSED_MAX_FWD)
    enough = n * _cdiv(num_groups, group_block) >= sms
    if forced in ("fused", "looped") or (not forced and enough):
        single = group_block * block_cg * _pow2(s) <= limit and forced != "looped"
        loop_tile = env_int("GENSCALE_GN_LOOP_TILE", LOOP_TILE, power_of_two=True)
        block_s = _pow2(s) if single else max(1, min(_pow2(s), loop_tile // (group_block * block_cg)))
        block_s = block_s if single else env_int("GENSCALE_GN_BLOCK_S", block_s, power_of_two=True)
        elems = group_block * block_cg * block_s
        warps = min(16, max(4, elems // 512))
        stages = 1 if single else env_int("GENSCALE_GN_LOOP_STAGES", 1)
        return Plan(True, single, group_block=group_block, block_cg=block_cg, block_s=block_s, num_warps=warps,
                    stages=stages)
    if channel_fast:
        block_c = min(_pow2(c), 256)
        block_s = max(1, min(_pow2(s), SPLIT_TILE // block_c))
    else:
        block_s = min(_pow2(s), 1024)
        block_c = min(_pow2(c), max(1, SPLIT_TILE // block_s))
    # Overrides (powers of two) let tests exercise multi-tile loops and channel blocks at tiny shapes.
    block_s = env_int("GENSCALE_GN_BLOCK_S", block_s, power_of_two=True)
    block_c = env_int("GENSCALE_GN_BLOCK_C", block_c, power_of_two=True)
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


def _finalize_blocks(cg: int, split: int) -> tuple[int, int]:
    block_k = min(_pow2(split), 64)
    return min(_pow2(cg), max(1, 1024 // block_k)), block_k


# ----------------------------------------------------------------------------- launch specs
# Everything a call launches depends only on the shapes, strides, dtypes and options, so it is
# worked out once per combination and reused: on the GPU the step is bound by the host issuing
# kernels (benchmarks/results/2026-11-22-h100), and planning cost as much host time as a launch.

_TUNING_VARS = ("GENSCALE_GN_PATH", "GENSCALE_GN_BLOCK_S", "GENSCALE_GN_BLOCK_C", "GENSCALE_GN_SPLIT",
                "GENSCALE_GN_FUSED_MAX_FWD", "GENSCALE_GN_FUSED_MAX_BWD", "GENSCALE_GN_GROUP_BLOCK",
                "GENSCALE_GN_LOOP_TILE", "GENSCALE_GN_LOOP_STAGES", "GENSCALE_TRITON_LAUNCH")
_SPECS: dict = {}
_MAX_SPECS = 1024  # a long run meets a handful of shapes; a sweep over many just starts afresh


@dataclass(frozen=True)
class _Launch:
    kernel: str  # the jit function's name in kernels._group_norm_triton
    grid: tuple
    scalars: tuple  # the arguments after the tensors
    meta: dict
    # compiled kernels kept for direct launches (kernels._launch), by tensor signature; None: always jit
    kept: dict | None = field(default_factory=lambda: {} if direct_launch() else None, compare=False, repr=False)

    def __call__(self, k, *tensors: torch.Tensor, wrap=None) -> None:
        kernel = getattr(k, self.kernel)
        if wrap is not None:  # inside a triton op: Inductor launches the kernel itself
            wrap(kernel)[self.grid](*tensors, *self.scalars, **self.meta)
        else:
            launch(kernel, self.grid, tensors, self.scalars, self.meta, self.kept)


@dataclass(frozen=True)
class _Spec:
    copy_x: bool  # x (or dy) must be made contiguous first (its spatial dims do not collapse)
    copy_dy: bool
    launches: tuple  # of _Launch; empty for an empty tensor
    part: tuple | None  # shape of the fp32 partials buffer
    coef: tuple | None = None  # split backward: shape of the per-group coefficients


def cached(cache: dict, key: tuple, build, limit: int = _MAX_SPECS):
    """``cache[key]``, built on a miss; a full cache starts afresh. Unhashable keys (symbolic sizes:
    a triton op traced with dynamic shapes) are built every time."""
    try:
        found = cache.get(key)
    except TypeError:
        return build()
    if found is None:
        if len(cache) >= limit:
            cache.clear()
        found = cache[key] = build()
    return found


def _tuning() -> tuple:
    return env_values(_TUNING_VARS)


def _forward_spec(x: torch.Tensor, num_groups: int, eps: float, flags: dict) -> _Spec:
    copy = ncs_strides(x) is None
    x, xs = _viewable(x)
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(1, n * c)
    cg = c // num_groups
    ys = ncs_strides(torch.empty_like(x))  # empty_like of a viewable x is dense, hence viewable
    if x.numel() == 0:
        return _Spec(copy, False, (), None)
    p = make_plan(x, num_groups, xs, backward=False)
    inv_cnt = 1.0 / (cg * s)
    if p.fused:
        meta = dict(flags, GB=p.group_block, BLOCK_CG=p.block_cg, BLOCK_S=p.block_s, SINGLE=p.single,
                    STAGES=p.stages, num_warps=p.num_warps)
        fused = _Launch("gn_fwd_fused", (n, _cdiv(num_groups, p.group_block)),
                        (num_groups, cg, s, inv_cnt, eps, *xs, *ys), meta)
        return _Spec(copy, False, (fused,), None)
    grid = (n, _cdiv(c, p.block_c), p.split)
    plane = n * p.split * c
    bcg, bk = _finalize_blocks(cg, p.split)
    tiles = dict(BLOCK_C=p.block_c, BLOCK_S=p.block_s, num_warps=p.num_warps)
    return _Spec(copy, False, (
        _Launch("gn_stats_partial", grid, (c, s, p.chunk, p.split, plane, *xs), tiles),
        _Launch("gn_stats_finalize", (n * num_groups,),
                (c, num_groups, cg, s, p.chunk, p.split, plane, inv_cnt, eps),
                dict(BLOCK_CG=bcg, BLOCK_K=bk, num_warps=4)),
        _Launch("gn_apply", grid, (c, num_groups, cg, s, p.chunk, *xs, *ys), dict(flags, **tiles)),
    ), (2, n * p.split, c))


def _backward_spec(dy: torch.Tensor, x: torch.Tensor, num_groups: int, flags: dict) -> _Spec:
    copy_x, copy_dy = ncs_strides(x) is None, ncs_strides(dy) is None
    x, xs = _viewable(x)
    dy, ds = _viewable(dy)
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(1, n * c)
    cg = c // num_groups
    os_ = ncs_strides(torch.empty_like(x))
    if x.numel() == 0:
        return _Spec(copy_x, copy_dy, (), None)
    p = make_plan(x, num_groups, xs, backward=True)
    inv_cnt = 1.0 / (cg * s)
    split = 1 if p.fused else p.split
    plane = n * split * c
    part = (2, n * split, c)
    if p.fused:
        meta = dict(flags, GB=p.group_block, BLOCK_CG=p.block_cg, BLOCK_S=p.block_s, SINGLE=p.single,
                    STAGES=p.stages, num_warps=p.num_warps)
        fused = _Launch("gn_bwd_fused", (n, _cdiv(num_groups, p.group_block)),
                        (c, num_groups, cg, s, inv_cnt, plane, *xs, *ds, *os_), meta)
        return _Spec(copy_x, copy_dy, (fused,), part)
    grid = (n, _cdiv(c, p.block_c), p.split)
    tiles = dict(BLOCK_C=p.block_c, BLOCK_S=p.block_s, num_warps=p.num_warps)
    bcg, bk = _finalize_blocks(cg, p.split)
    ng = n * num_groups
    return _Spec(copy_x, copy_dy, (
        _Launch("gn_bwd_partial", grid, (c, num_groups, cg, s, p.chunk, p.split, plane, *xs, *ds),
                dict(flags, **tiles)),
        _Launch("gn_bwd_finalize", (ng,), (c, num_groups, cg, p.split, plane, inv_cnt, ng),
                dict(HAS_W=flags["HAS_W"], BLOCK_CG=bcg, BLOCK_K=bk, num_warps=4)),
        _Launch("gn_bwd_apply", grid, (c, num_groups, cg, s, p.chunk, ng, *xs, *ds, *os_), dict(flags, **tiles)),
    ), part, coef=(2, ng))


def forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            num_groups: int, eps: float, act: bool, wrap=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y, mean, rstd. ``wrap`` (torch.library.wrap_triton inside a triton_op) wraps each kernel."""
    from kernels import _group_norm_triton as k

    has_w, has_b = weight is not None, bias is not None
    key = ("fwd", x.shape, x.stride(), x.dtype, x.device, num_groups, eps, has_w, has_b, act, _tuning())
    spec = cached(_SPECS, key, lambda: _forward_spec(x, num_groups, eps, dict(HAS_W=has_w, HAS_B=has_b, ACT=act)))
    if spec.copy_x:  # e.g. a spatial crop: rare, copy rather than support every stride pattern
        x = x.contiguous()
    y = torch.empty_like(x)
    mean = torch.empty((x.shape[0], num_groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    w, b = weight if has_w else x, bias if has_b else x  # absent parameters: any pointer, never read
    if len(spec.launches) == 1:
        spec.launches[0](k, x, y, w, b, mean, rstd, wrap=wrap)
    elif spec.launches:
        part = torch.empty(spec.part, device=x.device, dtype=torch.float32)
        stats, finalize, apply = spec.launches
        stats(k, x, part, wrap=wrap)
        finalize(k, part, mean, rstd, wrap=wrap)
        apply(k, x, y, w, b, mean, rstd, wrap=wrap)
    return y, mean, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             mean: torch.Tensor, rstd: torch.Tensor, num_groups: int, act: bool,
             wrap=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns dx (x's dtype and layout) and a [2, C] fp32 tensor holding dbias and dweight."""
    from kernels import _group_norm_triton as k

    has_w, has_b = weight is not None, bias is not None
    key = ("bwd", x.shape, x.stride(), dy.stride(), x.dtype, dy.dtype, x.device, num_groups, has_w, has_b, act,
           _tuning())
    spec = cached(_SPECS, key, lambda: _backward_spec(dy, x, num_groups, dict(HAS_W=has_w, HAS_B=has_b, ACT=act)))
    x = x.contiguous() if spec.copy_x else x
    dy = dy.contiguous() if spec.copy_dy else dy
    dx = torch.empty_like(x)
    if not spec.launches:
        return dx, torch.zeros((2, x.shape[1]), device=x.device, dtype=torch.float32)
    w, b = weight if has_w else x, bias if has_b else x
    part = torch.empty(spec.part, device=x.device, dtype=torch.float32)
    if len(spec.launches) == 1:
        spec.launches[0](k, x, dy, dx, w, b, mean, rstd, part, wrap=wrap)
    else:
        coef = torch.empty(spec.coef, device=x.device, dtype=torch.float32)
        partial, finalize, apply = spec.launches
        partial(k, x, dy, w, b, mean, rstd, part, wrap=wrap)
        finalize(k, part, w, coef, wrap=wrap)
        apply(k, x, dy, dx, w, b, mean, rstd, coef, wrap=wrap)
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
    db, dw = dbdw.unbind(0)  # one op for both rows: every op is host time on the GPU
    dw = None if weight is None else dw if dw.dtype == weight.dtype else dw.to(weight.dtype)
    db = None if bias is None else db if db.dtype == bias.dtype else db.to(bias.dtype)
    return dx, dw, db, None, None, None


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dbdw = group_norm_silu_bwd(dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.act)
    # create_graph=True: a second order through the kernels must fail, as on the direct route
    return first_order_only_all(_input_grads(dx, dbdw, weight, bias), dy, x, weight, bias)


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
        # create_graph=True: a second order through the kernels must fail
        return first_order_only_all(_input_grads(dx, dbdw, weight, bias), dy, x, weight, bias)


def group_norm_silu(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                    num_groups: int, eps: float, act: bool) -> torch.Tensor:
    """The Triton GroupNorm(+SiLU): the custom op under torch.compile, a direct call otherwise."""
    if compiling():
        return group_norm_silu_fwd(x, weight, bias, num_groups, eps, act)[0]
    return _Direct.apply(x, weight, bias, num_groups, eps, act)
