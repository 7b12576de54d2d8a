"""Triton kernels for the diffusion noise steps: one pass over memory each.

Tensors are seen as [N, C, S] with their own strides (NCHW and channels_last without copies);
a program owns a [BLOCK_C, BLOCK_S] tile of one sample, so per-sample schedule coefficients are
scalars computed once per program, in fp64, from the alphas_cumprod table. Normal draws follow
kernels/_philox.py exactly: one Philox4x32-10 call per quad of 4 neighbouring spatial elements
feeds all four through Box-Muller, so the counter arithmetic is shared 4 ways.

Only triton builtins and local jit helpers are called (see _group_norm_triton.py for why).
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice  # approximate log/sin/cos (FAST_MATH); triton >= 3.0

from kernels._group_norm_triton import _sum

_RNG_ARGS = ["k0", "k1", "o0", "o1"]  # never specialised: values change every call


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    # Each round needs the high and low words of two 32x32-bit products. Written as umulhi and a
    # 32-bit multiply, ptxas emitted IMAD.HI + IMAD per product; one 64-bit product is a single
    # IMAD.WIDE.U32 (sm_90a SASS of normal_kernel: 904 -> 768 instructions per 32 elements; the
    # words are the same).
    for _ in tl.static_range(10):
        p0 = c2.to(tl.uint64) * 0xCD9E8D57
        p1 = c0.to(tl.uint64) * 0xD2511F53
        c0 = (p0 >> 32).to(tl.uint32) ^ c1 ^ k0
        c2 = (p1 >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = p0.to(tl.uint32)
        c3 = p1.to(tl.uint32)
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _uniform(word):
    # ((word >> 9) + 1/2) * 2^-23: 23 random bits + 1/2, strictly inside (0, 1), so log() is finite.
    # Built from the bits instead of an int -> float conversion: (word >> 9) as the mantissa of a
    # float in [1, 2) (one shift-and-add), minus (1 - 2^-24). The difference is exact (Sterbenz),
    # so the uniforms are the same bits as converting and scaling; it saves the conversion and a
    # multiply per element in the drawing kernels, which are instruction-bound.
    one_plus = ((word >> 9) + 0x3F800000).to(tl.float32, bitcast=True)
    return one_plus - 0.99999994039535522


@triton.jit
def _normal_tile(k0, k1, o0, o1, n, c, C, SQ, q0, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                 FAST_MATH: tl.constexpr):
    """Draws for channels c (int64 [BLOCK_C]) x spatial [4 q0, 4 q0 + BLOCK_S) of sample n.

    FAST_MATH (compiled GPU kernels): the hardware's approximate log2/sin/cos, one instruction
    each instead of ~30-instruction correctly-rounded routines, which made the drawing kernels
    compute-bound (measured on an H100: q_sample with drawn eps at 31% of copy bandwidth).
    sin.approx/cos.approx are accurate to ~2^-21 absolute on [-pi, pi], so the angle is taken
    as 2 pi u - pi there and the sign folded back: cos(2 pi u) = -cos(2 pi u - pi)."""
    row = n * C + c
    q = row[:, None] * SQ + (q0 + tl.arange(0, BLOCK_S // 4))[None, :]
    c0 = (q & 0xFFFFFFFF).to(tl.uint32)
    c1 = (q >> 32).to(tl.uint32)
    zero = c0 * 0
    w0, w1, w2, w3 = _philox(c0, c1, zero + o0, zero + o1, k0, k1)
    if FAST_MATH:
        # -2 ln(u) as lg2(u) * (-2 ln 2): fast_logf is lg2.approx times fp32(ln 2), and scaling by -2
        # commutes with rounding, so folding it into the constant gives the same bits, one multiply less.
        r0 = tl.sqrt(libdevice.fast_log2f(_uniform(w0)) * -1.3862943649291992)
        r1 = tl.sqrt(libdevice.fast_log2f(_uniform(w2)) * -1.3862943649291992)
        t0 = 6.283185307179586 * _uniform(w1) - 3.141592653589793
        t1 = 6.283185307179586 * _uniform(w3) - 3.141592653589793
        r0 = -r0
        r1 = -r1
        z = tl.join(tl.join(r0 * libdevice.fast_cosf(t0), r1 * libdevice.fast_cosf(t1)),
                    tl.join(r0 * libdevice.fast_sinf(t0), r1 * libdevice.fast_sinf(t1)))
    else:
        r0 = tl.sqrt(-2.0 * tl.log(_uniform(w0)))
        r1 = tl.sqrt(-2.0 * tl.log(_uniform(w2)))
        t0 = 6.283185307179586 * _uniform(w1)
        t1 = 6.283185307179586 * _uniform(w3)
        z = tl.join(tl.join(r0 * tl.cos(t0), r1 * tl.cos(t1)), tl.join(r0 * tl.sin(t0), r1 * tl.sin(t1)))
    return tl.reshape(z, (BLOCK_C, BLOCK_S))


@triton.jit
def _tile(C, S, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    # Spatial tiles on grid axis 0 (up to 2^31 - 1 programs); axes 1 and 2 (channel blocks, samples)
    # are capped at 65535 by CUDA, which large channels_last maps would exceed for spatial tiles.
    n = tl.program_id(2).to(tl.int64)
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = (c < C)[:, None] & (s < S)[None, :]
    return n, c, s, mask


@triton.jit
def _abar_at(abar_ptr, t, T):
    """abar[t] in fp64, NaN when t is outside [0, T): a bad timestep on the GPU poisons its sample's
    output instead of reading outside the table (checking on the host would cost a sync)."""
    a = tl.load(abar_ptr + tl.minimum(tl.maximum(t, 0), T - 1)).to(tl.float64)
    return tl.where((t >= 0) & (t < T), a, float("nan"))


@triton.jit
def _rng_key(k0, k1, o0, o1, SEED_PTR: tl.constexpr):
    """The key and the stream words. SEED_PTR: k0 points to the seed (int64), read here, so that a
    CUDA graph replays the kernel with whatever seed the tensor holds then (k1 is unused)."""
    if SEED_PTR:
        seed = tl.load(k0)
        k0 = seed & 0xFFFFFFFF
        k1 = seed >> 32
    return k0.to(tl.uint32), k1.to(tl.uint32), o0.to(tl.uint32), o1.to(tl.uint32)


@triton.jit
def _clip(x0):
    """x0 clamped to [-1, 1] with NaN kept (Triton's min/max drop it by default; torch.clamp, the
    reference, keeps it): a diverged model's NaN must not turn into a plausible sample."""
    return tl.minimum(tl.maximum(x0, -1.0, propagate_nan=tl.PropagateNan.ALL), 1.0,
                      propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _abar_prev(abar_ptr, t, tp, T):
    """abar[t_prev] in fp64: 1 for the final step (t_prev < 0), NaN where t_prev > t (a step towards
    more noise) or t_prev >= T, as in the reference."""
    a = tl.where(tp >= 0, _abar_at(abar_ptr, tp, T), 1.0)
    return tl.where(tp > t, float("nan"), a)


@triton.jit(do_not_specialize=_RNG_ARGS)
def normal_kernel(out_ptr, C, S, SQ, k0, k1, o0, o1, son, soc, sos,
                  BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                  FAST_MATH: tl.constexpr, SEED_PTR: tl.constexpr):
    n, c, s, mask = _tile(C, S, BLOCK_C, BLOCK_S)
    k0, k1, o0, o1 = _rng_key(k0, k1, o0, o1, SEED_PTR)
    eps = _normal_tile(k0, k1, o0, o1, n, c, C, SQ, tl.program_id(0) * (BLOCK_S // 4),
                       BLOCK_C, BLOCK_S, FAST_MATH)
    tl.store(out_ptr + n * son + c[:, None] * soc + s[None, :] * sos, eps.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_RNG_ARGS)
def q_sample_kernel(x_ptr, e_ptr, out_ptr, t_ptr, abar_ptr, T, C, S, SQ, k0, k1, o0, o1,
                    sxn, sxc, sxs, sen, sec, ses, son, soc, sos,
                    HAS_EPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                    FAST_MATH: tl.constexpr, SEED_PTR: tl.constexpr):
    """x_t = sqrt(abar[t_n]) x0 + sqrt(1 - abar[t_n]) eps, eps loaded or drawn."""
    n, c, s, mask = _tile(C, S, BLOCK_C, BLOCK_S)
    a = _abar_at(abar_ptr, tl.load(t_ptr + n), T)
    ca = tl.sqrt(a).to(tl.float32)
    cb = tl.sqrt(1.0 - a).to(tl.float32)
    x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + s[None, :] * sxs, mask=mask, other=0.0).to(tl.float32)
    if HAS_EPS:
        eps = tl.load(e_ptr + n * sen + c[:, None] * sec + s[None, :] * ses, mask=mask, other=0.0).to(tl.float32)
    else:
        r0, r1, r2, r3 = _rng_key(k0, k1, o0, o1, SEED_PTR)
        eps = _normal_tile(r0, r1, r2, r3, n, c, C, SQ, tl.program_id(0) * (BLOCK_S // 4),
                           BLOCK_C, BLOCK_S, FAST_MATH)
    out = ca * x + cb * eps
    tl.store(out_ptr + n * son + c[:, None] * soc + s[None, :] * sos, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_RNG_ARGS)
def eps_loss_fwd_kernel(p_ptr, w_ptr, part_ptr, C, S, SQ, k0, k1, o0, o1, spn, spc, sps,
                        L1: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                        FAST_MATH: tl.constexpr, SEED_PTR: tl.constexpr):
    """One partial sum of (pred - eps)^2 or |pred - eps| per program, times the sample's weight
    (a program's tile lies in one sample); the host adds them in order."""
    n, c, s, mask = _tile(C, S, BLOCK_C, BLOCK_S)
    k0, k1, o0, o1 = _rng_key(k0, k1, o0, o1, SEED_PTR)
    eps = _normal_tile(k0, k1, o0, o1, n, c, C, SQ, tl.program_id(0) * (BLOCK_S // 4),
                       BLOCK_C, BLOCK_S, FAST_MATH)
    p = tl.load(p_ptr + n * spn + c[:, None] * spc + s[None, :] * sps, mask=mask, other=0.0).to(tl.float32)
    d = tl.where(mask, p - eps, 0.0)
    if L1:
        v = tl.abs(d)
    else:
        v = d * d
    pid = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)
    total = tl.reduce(tl.reduce(v, 1, _sum), 0, _sum)
    if HAS_WEIGHT:
        total = total * tl.load(w_ptr + n).to(tl.float32)
    tl.store(part_ptr + pid, total)


@triton.jit(do_not_specialize=_RNG_ARGS)
def eps_loss_bwd_kernel(p_ptr, w_ptr, g_ptr, dp_ptr, scale, C, S, SQ, k0, k1, o0, o1,
                        spn, spc, sps, son, soc, sos,
                        L1: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                        FAST_MATH: tl.constexpr, SEED_PTR: tl.constexpr):
    """dpred = g * scale * w[n] * (2 (pred - eps) | sign(pred - eps)); eps drawn again, never stored."""
    n, c, s, mask = _tile(C, S, BLOCK_C, BLOCK_S)
    k0, k1, o0, o1 = _rng_key(k0, k1, o0, o1, SEED_PTR)
    eps = _normal_tile(k0, k1, o0, o1, n, c, C, SQ, tl.program_id(0) * (BLOCK_S // 4),
                       BLOCK_C, BLOCK_S, FAST_MATH)
    p = tl.load(p_ptr + n * spn + c[:, None] * spc + s[None, :] * sps, mask=mask, other=0.0).to(tl.float32)
    d = p - eps
    g = tl.load(g_ptr).to(tl.float32) * scale
    if HAS_WEIGHT:
        g = g * tl.load(w_ptr + n).to(tl.float32)
    if L1:
        dp = tl.where(d > 0, g, tl.where(d < 0, -g, 0.0))
    else:
        dp = (2.0 * g) * d
    tl.store(dp_ptr + n * son + c[:, None] * soc + s[None, :] * sos, dp.to(dp_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _guided_eps(eu_ptr, ec_ptr, scale, n, c, s, mask, seun, seuc, seus, secn, secc, secs, CFG: tl.constexpr):
    eu = tl.load(eu_ptr + n * seun + c[:, None] * seuc + s[None, :] * seus, mask=mask, other=0.0).to(tl.float32)
    if CFG:
        ec = tl.load(ec_ptr + n * secn + c[:, None] * secc + s[None, :] * secs, mask=mask, other=0.0)
        eu = eu + scale * (ec.to(tl.float32) - eu)
    return eu


@triton.jit(do_not_specialize=_RNG_ARGS)
def ddpm_step_kernel(x_ptr, eu_ptr, ec_ptr, out_ptr, t_ptr, tp_ptr, abar_ptr, T, scale, C, S, SQ, k0, k1, o0, o1,
                     sxn, sxc, sxs, seun, seuc, seus, secn, secc, secs, son, soc, sos,
                     CFG: tl.constexpr, CLIP: tl.constexpr, LARGE_VAR: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                     FAST_MATH: tl.constexpr, SEED_PTR: tl.constexpr):
    """Ancestral step t -> t_prev (t - 1, or a strided step; < 0: the last, noiseless step):
    posterior mean from x0_hat (optionally clipped) + sigma z."""
    n, c, s, mask = _tile(C, S, BLOCK_C, BLOCK_S)
    t = tl.load(t_ptr + n)
    a_t = _abar_at(abar_ptr, t, T)
    tp = tl.load(tp_ptr + n)
    a_prev = _abar_prev(abar_ptr, t, tp, T)
    alpha = a_t / a_prev
    beta = 1.0 - alpha
    cx = (1.0 / tl.sqrt(a_t)).to(tl.float32)
    ce = tl.sqrt((1.0 - a_t) / a_t).to(tl.float32)
    m1 = (beta * tl.sqrt(a_prev) / (1.0 - a_t)).to(tl.float32)
    m2 = ((1.0 - a_prev) * tl.sqrt(alpha) / (1.0 - a_t)).to(tl.float32)
    if LARGE_VAR:
        var = beta
    else:
        var = beta * (1.0 - a_prev) / (1.0 - a_t)
    sigma = tl.sqrt(tl.maximum(var, 0.0, propagate_nan=tl.PropagateNan.ALL)).to(tl.float32)
    x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + s[None, :] * sxs, mask=mask, other=0.0).to(tl.float32)
    eps = _guided_eps(eu_ptr, ec_ptr, scale, n, c, s, mask, seun, seuc, seus, secn, secc, secs, CFG)
    x0 = cx * x - ce * eps
    if CLIP:
        x0 = _clip(x0)
    out = m1 * x0 + m2 * x
    if tp >= 0:  # the last step adds no noise
        r0, r1, r2, r3 = _rng_key(k0, k1, o0, o1, SEED_PTR)
        z = _normal_tile(r0, r1, r2, r3, n, c, C, SQ, tl.program_id(0) * (BLOCK_S // 4),
                         BLOCK_C, BLOCK_S, FAST_MATH)
        out = out + sigma * z
    tl.store(out_ptr + n * son + c[:, None] * soc + s[None, :] * sos, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_RNG_ARGS)
def ddim_step_kernel(x_ptr, eu_ptr, ec_ptr, out_ptr, t_ptr, tp_ptr, abar_ptr, T, scale, eta, C, S, SQ,
                     k0, k1, o0, o1, sxn, sxc, sxs, seun, seuc, seus, secn, secc, secs, son, soc, sos,
                     CFG: tl.constexpr, CLIP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                     FAST_MATH: tl.constexpr, SEED_PTR: tl.constexpr):
    """DDIM step t -> t_prev (t_prev < 0 means abar = 1): sqrt(a') x0 + sqrt(1 - a' - sig^2) eps + sig z.
    With CLIP, x0 is clamped and eps recomputed from it, so that the two stay consistent."""
    n, c, s, mask = _tile(C, S, BLOCK_C, BLOCK_S)
    t = tl.load(t_ptr + n)
    a_t = _abar_at(abar_ptr, t, T)
    tp = tl.load(tp_ptr + n)
    a_p = _abar_prev(abar_ptr, t, tp, T)
    sig = eta * tl.sqrt((1.0 - a_p) / (1.0 - a_t) * (1.0 - a_t / a_p))
    cx = (1.0 / tl.sqrt(a_t)).to(tl.float32)
    ce = tl.sqrt((1.0 - a_t) / a_t).to(tl.float32)
    c_x0 = tl.sqrt(a_p).to(tl.float32)
    c_dir = tl.sqrt(tl.maximum(1.0 - a_p - sig * sig, 0.0, propagate_nan=tl.PropagateNan.ALL)).to(tl.float32)
    sigma = sig.to(tl.float32)
    x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + s[None, :] * sxs, mask=mask, other=0.0).to(tl.float32)
    eps = _guided_eps(eu_ptr, ec_ptr, scale, n, c, s, mask, seun, seuc, seus, secn, secc, secs, CFG)
    x0 = cx * x - ce * eps
    if CLIP:
        x0 = _clip(x0)
        eps = (x - tl.sqrt(a_t).to(tl.float32) * x0) * (1.0 / tl.sqrt(1.0 - a_t)).to(tl.float32)
    out = c_x0 * x0 + c_dir * eps
    if sigma > 0:
        r0, r1, r2, r3 = _rng_key(k0, k1, o0, o1, SEED_PTR)
        z = _normal_tile(r0, r1, r2, r3, n, c, C, SQ, tl.program_id(0) * (BLOCK_S // 4),
                         BLOCK_C, BLOCK_S, FAST_MATH)
        out = out + sigma * z
    tl.store(out_ptr + n * son + c[:, None] * soc + s[None, :] * sos, out.to(out_ptr.dtype.element_ty), mask=mask)
