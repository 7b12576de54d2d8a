"""Triton kernels for GroupNorm (+ SiLU): forward and backward, two strategies.

Every tensor is seen as [N, C, S] (S = the spatial dims collapsed) with its own strides, so NCHW,
channels_last and channel slices run without a layout copy; the Triton compiler specialises
strides equal to 1, which gives vectorised, coalesced access along whichever axis is contiguous.
The channels per group (CG) are a compile-time constant: channel offsets g * CG are then known
multiples of CG, which lets channels_last tiles load 16-byte vectors (and c // CG is a shift).

* fused: one program owns GB whole groups of one sample. When they fit in registers it reads x
  (and dy) exactly once: the minimum-bytes kernel; otherwise it loops over the groups twice, the
  second read hitting L2. Used when N x G / GB programs fill the GPU.
* split: a group's reduction is cut over many programs (per channel block x spatial chunk):
  partial statistics -> a tiny finalize kernel per group -> an apply pass. x is read twice
  (usually the second time from L2), but batch 1 and huge groups get enough parallelism.

Statistics are fp32 and stable: two-pass (mean, then centred squares) inside a tile, tiles and
chunks merged with Chan's parallel formula. No atomics: the per-channel dweight/dbias partials
go to a buffer that the host sums in a fixed order, so gradients are deterministic.

Only triton builtins and local jit helpers are called (no tl.sum, tl.zeros, tl.sigmoid, tl.cdiv, which are
jit functions themselves), so the kernels keep working under TRITON_INTERPRET=1 even when
something imported triton before the variable was set.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


# triton's own sum combiner when it exists: the interpreter recognises it and reduces with numpy
# (any other combine function runs element by element in Python, thousands of times slower).
_sum = getattr(getattr(tl, "standard", None), "_sum_combine", None) or _add


@triton.jit
def _params(w_ptr, b_ptr, c, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """fp32 weight and bias at channel indices c (1 and 0 when absent). Loaded once per program,
    at channel granularity, then broadcast over space: not once per element."""
    if HAS_W:
        w = tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = tl.where(cmask, 1.0, 0.0)
    if HAS_B:
        b = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        b = tl.where(cmask, 0.0, 0.0)
    return w, b


@triton.jit
def _silu(z):
    return z / (1.0 + tl.exp(-z))


@triton.jit
def _dz(dy, z, ACT: tl.constexpr):
    """Gradient through SiLU: d/dz [z * sig(z)] = sig (1 + z (1 - sig))."""
    if ACT:
        sig = 1.0 / (1.0 + tl.exp(-z))
        return dy * sig * (1.0 + z * (1.0 - sig))
    else:
        return dy


@triton.jit
def _weight(w_ptr, c, cmask, HAS_W: tl.constexpr):
    if HAS_W:
        return tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        return tl.where(cmask, 1.0, 0.0)


# ----------------------------------------------------------------------------- fused path
# One program per (sample, block of GB groups). SINGLE: the groups fit in registers, x (and dy)
# are read once. Otherwise the program loops over spatial tiles twice: statistics, then the
# output; the second read of its own few tens of KB comes back from L2, not DRAM.


@triton.jit
def _group_tile(G, CG: tl.constexpr, GB: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * GB + tl.arange(0, GB)
    cg = tl.arange(0, BLOCK_CG)
    c2 = g[:, None] * CG + cg[None, :]
    cmask2 = (g[:, None] < G) & (cg[None, :] < CG)
    s3 = tl.arange(0, BLOCK_S)[None, None, :]
    return n, g, c2, cmask2, c2[:, :, None], cmask2[:, :, None], s3


@triton.jit
def gn_fwd_fused(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr,
                 G, CG: tl.constexpr, S, inv_cnt, eps,
                 sxn, sxc, sxs, syn, syc, sys,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                 GB: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr, SINGLE: tl.constexpr,
                 STAGES: tl.constexpr = 1):
    n, g, c2, cmask2, c3, cmask, s3 = _group_tile(G, CG, GB, BLOCK_CG, BLOCK_S)
    w2, b2 = _params(w_ptr, b_ptr, c2, cmask2, HAS_W, HAS_B)
    w3 = w2[:, :, None]
    b3 = b2[:, :, None]
    xb = x_ptr + n * sxn + c3 * sxc
    yb = y_ptr + n * syn + c3 * syc
    if SINGLE:
        mask = cmask & (s3 < S)
        x = tl.load(xb + s3 * sxs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.reduce(tl.reduce(x, 2, _sum), 1, _sum) * inv_cnt
        xc = tl.where(mask, x - mean[:, None, None], 0.0)
        var = tl.reduce(tl.reduce(xc * xc, 2, _sum), 1, _sum) * inv_cnt
        rstd = 1.0 / tl.sqrt(var + eps)
        z = xc * rstd[:, None, None] * w3 + b3
        if ACT:
            z = _silu(z)
        tl.store(yb + s3 * sys, z.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        mean = tl.full((GB,), 0.0, tl.float32)
        m2 = tl.full((GB,), 0.0, tl.float32)
        for s0 in tl.range(0, S, BLOCK_S, num_stages=STAGES):  # tile statistics merged with Chan's formula
            mask = cmask & (s0 + s3 < S)
            x = tl.load(xb + (s0 + s3) * sxs, mask=mask, other=0.0).to(tl.float32)
            nb = tl.minimum(S - s0, BLOCK_S) * CG * 1.0
            seen = s0 * CG * 1.0
            t_mean = tl.reduce(tl.reduce(x, 2, _sum), 1, _sum) / nb
            d = tl.where(mask, x - t_mean[:, None, None], 0.0)
            t_m2 = tl.reduce(tl.reduce(d * d, 2, _sum), 1, _sum)
            delta = t_mean - mean
            tot = seen + nb
            mean = mean + delta * (nb / tot)
            m2 = m2 + t_m2 + delta * delta * (seen * nb / tot)
        rstd = 1.0 / tl.sqrt(m2 * inv_cnt + eps)
        for s0 in tl.range(0, S, BLOCK_S, num_stages=STAGES):
            mask = cmask & (s0 + s3 < S)
            x = tl.load(xb + (s0 + s3) * sxs, mask=mask, other=0.0).to(tl.float32)
            z = (x - mean[:, None, None]) * rstd[:, None, None] * w3 + b3
            if ACT:
                z = _silu(z)
            tl.store(yb + (s0 + s3) * sys, z.to(y_ptr.dtype.element_ty), mask=mask)
    gmask = g < G
    tl.store(mean_ptr + n * G + g, mean, mask=gmask)
    tl.store(rstd_ptr + n * G + g, rstd, mask=gmask)


@triton.jit
def _bwd_tile(xb, db, sxs, sds, s, mask, mean, rstd, w, b, ACT: tl.constexpr):
    """xhat and dz (zero outside the mask) for one tile."""
    x = tl.load(xb + s * sxs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(db + s * sds, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    dz = tl.where(mask, _dz(dy, xhat * w + b, ACT), 0.0)
    return xhat, dz


@triton.jit
def gn_bwd_fused(x_ptr, dy_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, part_ptr,
                 C, G, CG: tl.constexpr, S, inv_cnt, plane,
                 sxn, sxc, sxs, sdn, sdc, sds, son, soc, sos,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                 GB: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_S: tl.constexpr, SINGLE: tl.constexpr,
                 STAGES: tl.constexpr = 1):
    n, g, c2, cmask2, c3, cmask, s3 = _group_tile(G, CG, GB, BLOCK_CG, BLOCK_S)
    gmask = g < G
    w2, b2 = _params(w_ptr, b_ptr, c2, cmask2, HAS_W, HAS_B)
    w3 = w2[:, :, None]
    b3 = b2[:, :, None]
    xb = x_ptr + n * sxn + c3 * sxc
    db = dy_ptr + n * sdn + c3 * sdc
    ob = dx_ptr + n * son + c3 * soc
    mean = tl.load(mean_ptr + n * G + g, mask=gmask, other=0.0)[:, None, None]
    rstd = tl.load(rstd_ptr + n * G + g, mask=gmask, other=0.0)[:, None, None]
    if SINGLE:
        mask = cmask & (s3 < S)
        xhat, dz = _bwd_tile(xb, db, sxs, sds, s3, mask, mean, rstd, w3, b3, ACT)
        db_c = tl.reduce(dz, 2, _sum)
        dw_c = tl.reduce(dz * xhat, 2, _sum)
    else:
        acc_db = tl.full((GB, BLOCK_CG, BLOCK_S), 0.0, tl.float32)
        acc_dw = tl.full((GB, BLOCK_CG, BLOCK_S), 0.0, tl.float32)
        for s0 in tl.range(0, S, BLOCK_S, num_stages=STAGES):
            mask = cmask & (s0 + s3 < S)
            t_xhat, t_dz = _bwd_tile(xb, db, sxs, sds, s0 + s3, mask, mean, rstd, w3, b3, ACT)
            acc_db += t_dz
            acc_dw += t_dz * t_xhat
        db_c = tl.reduce(acc_db, 2, _sum)
        dw_c = tl.reduce(acc_dw, 2, _sum)
    # Per-channel sums over space: the dbias / dweight partials of this sample.
    tl.store(part_ptr + n * C + c2, db_c, mask=cmask2)
    tl.store(part_ptr + plane + n * C + c2, dw_c, mask=cmask2)
    # Group means of dxhat = w dz and of dxhat * xhat follow from the per-channel sums.
    m1 = (tl.reduce(w2 * db_c, 1, _sum) * inv_cnt)[:, None, None]
    m2 = (tl.reduce(w2 * dw_c, 1, _sum) * inv_cnt)[:, None, None]
    if SINGLE:
        dx = rstd * (dz * w3 - m1 - xhat * m2)
        tl.store(ob + s3 * sos, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        for s0 in tl.range(0, S, BLOCK_S, num_stages=STAGES):
            mask = cmask & (s0 + s3 < S)
            t_xhat, t_dz = _bwd_tile(xb, db, sxs, sds, s0 + s3, mask, mean, rstd, w3, b3, ACT)
            dx = rstd * (t_dz * w3 - m1 - t_xhat * m2)
            tl.store(ob + (s0 + s3) * sos, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- split path


@triton.jit
def _chunk_tile(C, S, CHUNK, BLOCK_C: tl.constexpr):
    """This program's sample n, channel block c (valid where cmask), chunk index k and its
    spatial range [start, end): grid (N, channel blocks, chunks)."""
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    k = tl.program_id(2)
    start = k * CHUNK
    return n, c, c < C, k, start, tl.minimum(start + CHUNK, S)


@triton.jit
def gn_stats_partial(x_ptr, part_ptr, C, S, CHUNK, SPLIT, plane, sxn, sxc, sxs,
                     BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per-channel (mean, M2) over one spatial chunk -> part[0|1, n * SPLIT + k, c]."""
    n, c, cmask, k, start, end = _chunk_tile(C, S, CHUNK, BLOCK_C)
    run_mean = tl.full((BLOCK_C,), 0.0, tl.float32)
    run_m2 = tl.full((BLOCK_C,), 0.0, tl.float32)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        m = cmask[:, None] & (s < end)[None, :]
        x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + s[None, :] * sxs, mask=m, other=0.0)
        x = x.to(tl.float32)
        nb = tl.minimum(end - s0, BLOCK_S).to(tl.float32)
        seen = (s0 - start).to(tl.float32)
        t_mean = tl.reduce(x, 1, _sum) / nb
        d = tl.where(m, x - t_mean[:, None], 0.0)
        t_m2 = tl.reduce(d * d, 1, _sum)
        tot = seen + nb
        delta = t_mean - run_mean
        run_mean = run_mean + delta * (nb / tot)
        run_m2 = run_m2 + t_m2 + delta * delta * (seen * nb / tot)
    row = n * SPLIT + k
    tl.store(part_ptr + row * C + c, run_mean, mask=cmask)
    tl.store(part_ptr + plane + row * C + c, run_m2, mask=cmask)


@triton.jit
def gn_stats_finalize(part_ptr, mean_ptr, rstd_ptr, C, G, CG: tl.constexpr, S, CHUNK, SPLIT, plane, inv_cnt, eps,
                      BLOCK_CG: tl.constexpr, BLOCK_K: tl.constexpr):
    """Merge a group's per-(channel, chunk) statistics: mean, then M2 about that mean."""
    pid = tl.program_id(0)
    n = (pid // G).to(tl.int64)
    g = pid % G
    cg = tl.arange(0, BLOCK_CG)[:, None]
    kk = tl.arange(0, BLOCK_K)[None, :]
    acc = tl.full((BLOCK_CG, BLOCK_K), 0.0, tl.float32)
    for k0 in range(0, SPLIT, BLOCK_K):
        k = k0 + kk
        cnt = tl.minimum(tl.maximum(S - k * CHUNK, 0), CHUNK).to(tl.float32)
        for c0 in range(0, CG, BLOCK_CG):
            m = (c0 + cg < CG) & (k < SPLIT)
            off = (n * SPLIT + k) * C + g * CG + c0 + cg
            acc += tl.where(m, cnt * tl.load(part_ptr + off, mask=m, other=0.0), 0.0)
    mean = tl.reduce(tl.reduce(acc, 1, _sum), 0, _sum) * inv_cnt
    acc = tl.full((BLOCK_CG, BLOCK_K), 0.0, tl.float32)
    for k0 in range(0, SPLIT, BLOCK_K):
        k = k0 + kk
        cnt = tl.minimum(tl.maximum(S - k * CHUNK, 0), CHUNK).to(tl.float32)
        for c0 in range(0, CG, BLOCK_CG):
            m = (c0 + cg < CG) & (k < SPLIT)
            off = (n * SPLIT + k) * C + g * CG + c0 + cg
            d = tl.load(part_ptr + off, mask=m, other=0.0) - mean
            acc += tl.where(m, tl.load(part_ptr + plane + off, mask=m, other=0.0) + cnt * d * d, 0.0)
    var = tl.reduce(tl.reduce(acc, 1, _sum), 0, _sum) * inv_cnt
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, 1.0 / tl.sqrt(var + eps))


@triton.jit
def gn_apply(x_ptr, y_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, C, G, CG: tl.constexpr, S, CHUNK,
             sxn, sxc, sxs, syn, syc, sys,
             HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
             BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    n, c, cmask, k, start, end = _chunk_tile(C, S, CHUNK, BLOCK_C)
    mean = tl.load(mean_ptr + n * G + c // CG, mask=cmask, other=0.0)[:, None]
    rstd = tl.load(rstd_ptr + n * G + c // CG, mask=cmask, other=0.0)[:, None]
    w, b = _params(w_ptr, b_ptr, c, cmask, HAS_W, HAS_B)
    scale = rstd * w[:, None]
    b = b[:, None]
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        m = cmask[:, None] & (s < end)[None, :]
        x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + s[None, :] * sxs, mask=m, other=0.0)
        z = (x.to(tl.float32) - mean) * scale + b
        if ACT:
            z = _silu(z)
        tl.store(y_ptr + n * syn + c[:, None] * syc + s[None, :] * sys, z.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def gn_bwd_partial(x_ptr, dy_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, part_ptr,
                   C, G, CG: tl.constexpr, S, CHUNK, SPLIT, plane, sxn, sxc, sxs, sdn, sdc, sds,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per-channel sum(dz) and sum(dz * xhat) over one spatial chunk -> part[0|1, n*SPLIT+k, c]."""
    n, c, cmask, k, start, end = _chunk_tile(C, S, CHUNK, BLOCK_C)
    mean = tl.load(mean_ptr + n * G + c // CG, mask=cmask, other=0.0)[:, None]
    rstd = tl.load(rstd_ptr + n * G + c // CG, mask=cmask, other=0.0)[:, None]
    w, b = _params(w_ptr, b_ptr, c, cmask, HAS_W, HAS_B)
    w = w[:, None]
    b = b[:, None]
    acc_db = tl.full((BLOCK_C, BLOCK_S), 0.0, tl.float32)
    acc_dw = tl.full((BLOCK_C, BLOCK_S), 0.0, tl.float32)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        m = cmask[:, None] & (s < end)[None, :]
        x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + s[None, :] * sxs, mask=m, other=0.0)
        dy = tl.load(dy_ptr + n * sdn + c[:, None] * sdc + s[None, :] * sds, mask=m, other=0.0)
        xhat = tl.where(m, (x.to(tl.float32) - mean) * rstd, 0.0)
        dz = tl.where(m, _dz(dy.to(tl.float32), xhat * w + b, ACT), 0.0)
        acc_db += dz
        acc_dw += dz * xhat
    row = n * SPLIT + k
    tl.store(part_ptr + row * C + c, tl.reduce(acc_db, 1, _sum), mask=cmask)
    tl.store(part_ptr + plane + row * C + c, tl.reduce(acc_dw, 1, _sum), mask=cmask)


@triton.jit
def gn_bwd_finalize(part_ptr, w_ptr, coef_ptr, C, G, CG: tl.constexpr, SPLIT, plane, inv_cnt, NG,
                    HAS_W: tl.constexpr, BLOCK_CG: tl.constexpr, BLOCK_K: tl.constexpr):
    """Group means of w*dz and w*dz*xhat from the per-(channel, chunk) partials."""
    pid = tl.program_id(0)
    n = (pid // G).to(tl.int64)
    g = pid % G
    cg = tl.arange(0, BLOCK_CG)[:, None]
    kk = tl.arange(0, BLOCK_K)[None, :]
    acc1 = tl.full((BLOCK_CG, BLOCK_K), 0.0, tl.float32)
    acc2 = tl.full((BLOCK_CG, BLOCK_K), 0.0, tl.float32)
    for k0 in range(0, SPLIT, BLOCK_K):
        k = k0 + kk
        for c0 in range(0, CG, BLOCK_CG):
            cm = c0 + cg < CG
            m = cm & (k < SPLIT)
            w = _weight(w_ptr, g * CG + c0 + cg, cm, HAS_W)
            off = (n * SPLIT + k) * C + g * CG + c0 + cg
            acc1 += w * tl.load(part_ptr + off, mask=m, other=0.0)
            acc2 += w * tl.load(part_ptr + plane + off, mask=m, other=0.0)
    tl.store(coef_ptr + pid, tl.reduce(tl.reduce(acc1, 1, _sum), 0, _sum) * inv_cnt)
    tl.store(coef_ptr + NG + pid, tl.reduce(tl.reduce(acc2, 1, _sum), 0, _sum) * inv_cnt)


@triton.jit
def gn_bwd_apply(x_ptr, dy_ptr, dx_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, coef_ptr,
                 C, G, CG: tl.constexpr, S, CHUNK, NG,
                 sxn, sxc, sxs, sdn, sdc, sds, son, soc, sos,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    n, c, cmask, k, start, end = _chunk_tile(C, S, CHUNK, BLOCK_C)
    gi = n * G + c // CG
    mean = tl.load(mean_ptr + gi, mask=cmask, other=0.0)[:, None]
    rstd = tl.load(rstd_ptr + gi, mask=cmask, other=0.0)[:, None]
    m1 = tl.load(coef_ptr + gi, mask=cmask, other=0.0)[:, None]
    m2 = tl.load(coef_ptr + NG + gi, mask=cmask, other=0.0)[:, None]
    w, b = _params(w_ptr, b_ptr, c, cmask, HAS_W, HAS_B)
    w = w[:, None]
    b = b[:, None]
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        m = cmask[:, None] & (s < end)[None, :]
        x = tl.load(x_ptr + n * sxn + c[:, None] * sxc + s[None, :] * sxs, mask=m, other=0.0)
        dy = tl.load(dy_ptr + n * sdn + c[:, None] * sdc + s[None, :] * sds, mask=m, other=0.0)
        xhat = (x.to(tl.float32) - mean) * rstd
        dz = _dz(dy.to(tl.float32), xhat * w + b, ACT)
        dx = rstd * (dz * w - m1 - xhat * m2)
        tl.store(dx_ptr + n * son + c[:, None] * soc + s[None, :] * sos, dx.to(dx_ptr.dtype.element_ty), mask=m)
