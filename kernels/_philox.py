"""Counter-based normal draws (Philox4x32-10 + Box-Muller) in eager PyTorch.

This is the stream every noise kernel draws from, so a draw can be regenerated anywhere from
(seed, offset) alone. The element (n, c, s) of a tensor seen as [N, C, S] (S = spatial dims
collapsed, so the draw does not depend on memory format) takes

    quad  Q = (n * C + c) * ceil(S / 4) + s // 4,   lane = s % 4
    (o0, o1, o2, o3) = Philox4x32-10(counter = (Q mod 2^32, Q div 2^32, offset mod 2^32,
                                                offset div 2^32), key = (seed mod 2^32, seed div 2^32))
    u_i = ((o_i >> 9) + 1/2) * 2^-23                     (exact in fp32, strictly inside (0, 1))
    normals = (r0 cos t0, r0 sin t0, r1 cos t1, r1 sin t1),  r0 = sqrt(-2 ln u0), t0 = 2 pi u1,
                                                          r1 = sqrt(-2 ln u2), t1 = 2 pi u3
    eps[n, c, s] = normals[lane]

``offset`` selects an independent stream (it sits in the counter's upper half), so consecutive
training steps can simply use offset = step. The Triton kernels compute the same formula in fp32:
the Philox words are identical, the normals agree to ~1e-6 (a GPU's log and cos are not
correctly rounded), and each backend regenerates its own draws bit for bit.
Philox reference: Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC 2011).
"""
from __future__ import annotations

import math
import operator

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # key increments (golden ratio, sqrt(3) - 1)
ROUNDS = 10


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a * m for a in [0, 2^32) held in int64 (split so nothing overflows)."""
    p_lo = (a & 0xFFFF) * m  # < 2^48
    p_hi = (a >> 16) * m  # < 2^48; a * m = p_hi * 2^16 + p_lo
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & MASK32
    return hi, lo


def philox4x32(counter: tuple[torch.Tensor, ...], key: tuple, rounds: int = ROUNDS) -> tuple[torch.Tensor, ...]:
    """Philox4x32 on int64 tensors holding uint32 words (the key: ints or 0-d int64 tensors);
    returns the four output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def check_seed_offset(seed: int | torch.Tensor, offset: int) -> tuple[int | torch.Tensor, int]:
    """Seeds and offsets lie in [0, 2**63); returns them as Python ints (a seed tensor as it is).
    A seed may also be an integer tensor of one element, read where the draws are made (see
    kernels/noise.py: a CUDA graph replays the kernels with whatever the tensor holds then); its
    value is checked only where that is free (a CPU tensor, outside torch.compile's tracing); on a
    GPU its 64 bits are used as they are."""
    offset = _integer("offset", offset)
    if torch.is_tensor(seed):
        if seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool or seed.numel() != 1:
            raise ValueError(f"a seed tensor must hold one integer; got shape {tuple(seed.shape)} {seed.dtype}")
        checked = 0 if seed.device.type != "cpu" or torch.compiler.is_compiling() else int(seed)
    else:
        seed = checked = _integer("seed", seed)
    for name, v in (("seed", checked), ("offset", offset)):
        if not 0 <= v < 2**63:
            raise ValueError(f"{name} must lie in [0, 2**63); got {v}")
    return seed, offset


def _integer(name: str, value) -> int:
    """``value`` as an int when it is one (numpy integers too); floats, strings, bools and tensors
    are refused rather than truncated or parsed, which would silently draw another stream."""
    if isinstance(value, bool) or torch.is_tensor(value):
        raise TypeError(f"{name} must be an integer; got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer; got {value!r} ({type(value).__name__})") from None


def _key(seed: int | torch.Tensor, device: torch.device | str) -> tuple:
    """Philox's key words: ints, or int64 0-d tensors for a seed tensor (no host read: no sync)."""
    if torch.is_tensor(seed):
        seed = seed.to(device=device, dtype=torch.int64).reshape(())
    return seed & MASK32, (seed >> 32) & MASK32


def normal_ncs(n: int, c: int, s: int, seed: int | torch.Tensor, offset: int, dtype: torch.dtype,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """The normal draws of an [n, c, s] tensor, contiguous, computed in float64 then cast."""
    seed, offset = check_seed_offset(seed, offset)
    quads = -(-s // 4)
    q = torch.arange(n * c * quads, dtype=torch.int64, device=device)
    zero = torch.zeros_like(q)
    counter = (q & MASK32, q >> 32, zero + (offset & MASK32), zero + ((offset >> 32) & MASK32))
    words = philox4x32(counter, _key(seed, device))
    u = [((w >> 9).to(torch.float64) + 0.5) * 2.0**-23 for w in words]
    r0, r1 = torch.sqrt(-2.0 * torch.log(u[0])), torch.sqrt(-2.0 * torch.log(u[2]))
    t0, t1 = (2.0 * math.pi) * u[1], (2.0 * math.pi) * u[3]
    normals = torch.stack([r0 * torch.cos(t0), r0 * torch.sin(t0), r1 * torch.cos(t1), r1 * torch.sin(t1)], dim=-1)
    return normals.reshape(n, c, quads * 4)[:, :, :s].to(dtype)


def normal_like_reference(shape: torch.Size | tuple[int, ...], seed: int | torch.Tensor, offset: int,
                          dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Draws for a tensor of ``shape`` ([N, C, *]), contiguous NCHW."""
    if len(shape) < 2:
        raise ValueError(f"noise draws need a shape [N, C, ...]; got {tuple(shape)}")
    n, c = shape[0], shape[1]
    s = math.prod(shape[2:])
    return normal_ncs(n, c, s, seed, offset, dtype, device).reshape(shape)
