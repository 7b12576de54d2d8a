"""Noise-step Triton launchers (kernels/_noise_custom_ops.py registers them as custom ops).

Inputs arrive normalised by kernels/noise.py: t (and t_prev) int64 [N] and alphas_cumprod
float64 on the tensors' device; seed and offset in [0, 2**63), the seed possibly an integer
tensor of one element (read by the kernels themselves, so CUDA graphs can replay them with new
seeds).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from kernels._dispatch import env_int, env_values, interpreter_active, sm_count
from kernels._group_norm_ops import _cdiv, _pow2, _viewable, cached, ncs_strides

MASK32 = 0xFFFFFFFF
TILE = 2048  # elements per program (see _make_layout)
TILE_DRAW = 8192  # elements per program of the kernels that draw normals, on large tensors
# The loss kernels compute pred - eps right after drawing eps; an FMA there would use the unrounded
# product inside eps and break "the regenerated eps is bit-identical", so they (and q_sample, whose
# drawn and explicit-eps variants must round alike, and philox_normal, whose eps must equal the one
# drawn inside them: the fast-math angle 2 pi u - pi would otherwise become an FMA in one kernel and
# not in the other, seen on an H100) are built without floating-point contraction
# (enable_fp_fusion=False): one extra instruction per element in memory-bound kernels.


@dataclass(frozen=True)
class _Layout:
    """How a tensor is launched on: everything derived from its shape and strides (and the math
    mode), worked out once per combination because the host cost of a call is what bounds a
    training step on the GPU (benchmarks/results/2026-11-22-h100)."""
    copy: bool  # the spatial dims do not collapse into one: the launcher works on a contiguous copy
    strides: tuple  # [N, C, S] strides (of the copy when ``copy``)
    out_strides: tuple  # those of torch.empty_like(the tensor launched on)
    c: int
    s: int
    meta: dict  # tile constants
    grid: tuple


_LAYOUTS: dict = {}
_MAX_LAYOUTS = 1024
_TUNING_VARS = ("GENSCALE_NOISE_MATH", "GENSCALE_NOISE_TILE", "GENSCALE_NOISE_WARPS", "TRITON_INTERPRET")


def _layout(x: torch.Tensor, draws: bool = False) -> _Layout:
    """The layout of the tensor a kernel is launched on; ``draws``: the kernel draws normals."""
    key = (x.shape, x.stride(), x.device, draws, env_values(_TUNING_VARS))
    return cached(_LAYOUTS, key, lambda: _make_layout(x, draws, fast_math(), env_int("GENSCALE_NOISE_TILE", 0),
                                                      env_int("GENSCALE_NOISE_WARPS", 0)), _MAX_LAYOUTS)


def _make_layout(x: torch.Tensor, draws: bool, fast: bool, tile: int, warps: int) -> _Layout:
    """Tiles of ``tile`` elements (a power of two) run by ``warps`` warps; 0 picks them:

    * kernels that draw normals are compute-bound (Philox + Box-Muller; measured on the H100, bf16
      and fp32 q_sample took the same time), and each thread also pays a fixed setup (indices,
      fp64 schedule coefficients, the key). TILE_DRAW elements per 8 warps (32 per thread) cut
      the static sm_90a instructions per element (benchmarks/aot_report.py; no spills) from 62
      to 39 for q_sample, 50 to 36 for the loss forward and 113 to 60 for a DDPM step, against
      TILE (8 per thread); used when that still leaves >= 4 programs per multiprocessor;
    * the others move bytes: TILE (2048 elements, 8 warps) reached 90-94% of copy bandwidth.
    Overrides for tuning: GENSCALE_NOISE_TILE, GENSCALE_NOISE_WARPS."""
    if not tile:
        tile = TILE_DRAW if draws and x.numel() >= TILE_DRAW * 4 * sm_count(x.device) else TILE
    copy = ncs_strides(x) is None
    x, strides = _viewable(x)
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(1, n * c)
    channel_fast = x.stride(1) == 1 and s > 1
    if channel_fast:  # channels_last: a tile spans channels, which are contiguous
        block_c = min(_pow2(c), 64)
        block_s = max(4, min(_pow2(s), tile // block_c))
    else:
        block_s = max(4, min(_pow2(s), tile // 2))
        block_c = min(_pow2(c), max(1, tile // block_s))
    meta = dict(BLOCK_C=block_c, BLOCK_S=block_s, FAST_MATH=fast,
                num_warps=warps or (4 if block_c * block_s <= 1024 else 8))
    grid = (_cdiv(s, block_s), _cdiv(c, block_c), n)
    if max(grid[1:]) > 65535:  # CUDA's limit on grid axes 1 and 2
        raise ValueError(f"the noise kernels take at most 65535 samples and {65535 * block_c} channels; "
                         f"got N={n}, C={c}")
    return _Layout(copy, strides, ncs_strides(torch.empty_like(x)), c, s, meta, grid)


def _launch_view(t: torch.Tensor, draws: bool = False) -> tuple[torch.Tensor, _Layout]:
    """``t`` as the kernels read it (a contiguous copy only when its spatial dims do not collapse)."""
    lay = _layout(t, draws)
    return (t.contiguous() if lay.copy else t), lay


def fast_math() -> bool:
    """Compiled kernels draw normals with the GPU's approximate log/sin/cos (see _normal_tile);
    GENSCALE_NOISE_MATH=precise selects the correctly-rounded routines (for comparison)."""
    mode = os.environ.get("GENSCALE_NOISE_MATH", "fast").strip().lower() or "fast"
    if mode not in ("fast", "precise"):
        raise ValueError(f"GENSCALE_NOISE_MATH must be fast or precise; got {mode!r}")
    return mode == "fast" and not interpreter_active()


_SEED_IN_TENSOR, _SEED_IN_ARGS = dict(SEED_PTR=True), dict(SEED_PTR=False)


def _rng(seed: int | torch.Tensor, offset: int, device: torch.device) -> tuple[tuple, dict]:
    """The kernels' Philox arguments (k0, k1, o0, o1) and the SEED_PTR constant: a seed tensor is
    passed as a pointer in k0 (int64 on the kernel's device), an int as its two 32-bit words."""
    stream = (offset & MASK32, (offset >> 32) & MASK32)
    if torch.is_tensor(seed):
        return (seed.to(device=device, dtype=torch.int64).reshape(1), 0, *stream), _SEED_IN_TENSOR
    return (seed & MASK32, (seed >> 32) & MASK32, *stream), _SEED_IN_ARGS


def normal(like: torch.Tensor, seed: int | torch.Tensor, offset: int, dtype: torch.dtype) -> torch.Tensor:
    from kernels import _noise_triton as k

    out = torch.empty_like(like, dtype=dtype)
    if out.numel() == 0:
        return out
    lay = _layout(out, draws=True)
    rng, seed_ptr = _rng(seed, offset, out.device)
    k.normal_kernel[lay.grid](out, lay.c, lay.s, _cdiv(lay.s, 4), *rng, *lay.strides,
                              enable_fp_fusion=False, **seed_ptr, **lay.meta)
    return out


def q_sample(x0: torch.Tensor, noise: Optional[torch.Tensor], t: torch.Tensor, abar: torch.Tensor,
             seed: int | torch.Tensor, offset: int) -> torch.Tensor:
    from kernels import _noise_triton as k

    x0, lay = _launch_view(x0, draws=noise is None)
    out = torch.empty_like(x0)
    if out.numel() == 0:
        return out
    e, elay = _launch_view(noise) if noise is not None else (x0, lay)
    rng, seed_ptr = _rng(seed if noise is None else 0, offset, x0.device)
    k.q_sample_kernel[lay.grid](x0, e, out, t, abar, abar.shape[0], lay.c, lay.s, _cdiv(lay.s, 4),
                                *rng, *lay.strides, *elay.strides, *lay.out_strides,
                                HAS_EPS=noise is not None, enable_fp_fusion=False, **seed_ptr, **lay.meta)
    return out


def _weight(weight: Optional[torch.Tensor], pred: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The per-sample weights as the kernels read them (fp32, contiguous), or pred as a placeholder."""
    if weight is None:
        return pred, False
    return weight.to(device=pred.device, dtype=torch.float32).contiguous(), True


def eps_loss(pred: torch.Tensor, seed: int | torch.Tensor, offset: int, l1: bool,
             weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    from kernels import _noise_triton as k

    pred, lay = _launch_view(pred, draws=True)
    if pred.numel() == 0:  # the mean of nothing, as torch's mean (the reference) gives it
        return torch.full((), float("nan"), device=pred.device, dtype=torch.float32)
    grid = lay.grid
    part = torch.empty(grid[0] * grid[1] * grid[2], device=pred.device, dtype=torch.float32)
    rng, seed_ptr = _rng(seed, offset, pred.device)
    w, has_weight = _weight(weight, pred)
    k.eps_loss_fwd_kernel[grid](pred, w, part, lay.c, lay.s, _cdiv(lay.s, 4), *rng, *lay.strides,
                                L1=l1, HAS_WEIGHT=has_weight, enable_fp_fusion=False, **seed_ptr, **lay.meta)
    # Partial sums added in a fixed order (fp64): deterministic and accurate.
    return part.sum(dtype=torch.float64).div_(pred.numel()).to(torch.float32)


def eps_loss_backward(grad: torch.Tensor, pred: torch.Tensor, seed: int | torch.Tensor, offset: int,
                      l1: bool, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    from kernels import _noise_triton as k

    pred, lay = _launch_view(pred, draws=True)
    out = torch.empty_like(pred)
    if out.numel() == 0:
        return out
    g = grad.to(device=pred.device, dtype=torch.float32).reshape(())
    rng, seed_ptr = _rng(seed, offset, pred.device)
    w, has_weight = _weight(weight, pred)
    k.eps_loss_bwd_kernel[lay.grid](pred, w, g, out, 1.0 / pred.numel(), lay.c, lay.s, _cdiv(lay.s, 4),
                                    *rng, *lay.strides, *lay.out_strides, L1=l1, HAS_WEIGHT=has_weight,
                                    enable_fp_fusion=False, **seed_ptr, **lay.meta)
    return out


def ddpm_step(x: torch.Tensor, eps: torch.Tensor, eps_cond: Optional[torch.Tensor], scale: float,
              t: torch.Tensor, t_prev: torch.Tensor, abar: torch.Tensor, clip: bool, large_var: bool,
              seed: int | torch.Tensor, offset: int) -> torch.Tensor:
    from kernels import _noise_triton as k

    x, lay = _launch_view(x, draws=True)
    eps, elay = _launch_view(eps)
    ec, clay = _launch_view(eps_cond) if eps_cond is not None else (eps, elay)
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    rng, seed_ptr = _rng(seed, offset, x.device)
    k.ddpm_step_kernel[lay.grid](x, eps, ec, out, t, t_prev, abar, abar.shape[0], float(scale), lay.c, lay.s,
                                 _cdiv(lay.s, 4), *rng, *lay.strides, *elay.strides, *clay.strides, *lay.out_strides,
                                 CFG=eps_cond is not None, CLIP=clip, LARGE_VAR=large_var, **seed_ptr, **lay.meta)
    return out


def ddim_step(x: torch.Tensor, eps: torch.Tensor, eps_cond: Optional[torch.Tensor], scale: float,
              t: torch.Tensor, t_prev: torch.Tensor, abar: torch.Tensor, eta: float, clip: bool,
              seed: int | torch.Tensor, offset: int) -> torch.Tensor:
    from kernels import _noise_triton as k

    x, lay = _launch_view(x, draws=eta > 0)
    eps, elay = _launch_view(eps)
    ec, clay = _launch_view(eps_cond) if eps_cond is not None else (eps, elay)
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    rng, seed_ptr = _rng(seed if eta > 0 else 0, offset, x.device)
    k.ddim_step_kernel[lay.grid](x, eps, ec, out, t, t_prev, abar, abar.shape[0], float(scale), float(eta),
                                 lay.c, lay.s, _cdiv(lay.s, 4), *rng,
                                 *lay.strides, *elay.strides, *clay.strides, *lay.out_strides,
                                 CFG=eps_cond is not None, CLIP=clip, **seed_ptr, **lay.meta)
    return out
