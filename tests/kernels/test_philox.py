"""The counter-based normal draws every noise kernel shares (kernels/_philox.py): Philox4x32-10
against Random123's published vectors, the documented counter layout and uniform mapping against
an independent scalar Philox, and the draws' statistics."""
from __future__ import annotations

import math

import pytest
import torch

from kernels._philox import normal_like_reference, philox4x32


def draws(shape, seed: int, offset: int) -> torch.Tensor:
    return normal_like_reference(shape, seed, offset, torch.float64)


def test_philox_known_answers():
    """Random123's published Philox4x32-10 vectors."""
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in cases:
        words = philox4x32(tuple(torch.tensor([w], dtype=torch.int64) for w in counter), key)
        assert tuple(int(w) for w in words) == expected


def _philox_scalar(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, ...]:
    """Philox4x32-10 on Python ints, written from Salmon et al. (2011), independent of _philox.py."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & 0xFFFFFFFF, (p0 >> 32) ^ c3 ^ k1, p0 & 0xFFFFFFFF
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


def test_draws_follow_the_documented_counter_layout_and_uniforms():
    """Elements of a [2, 3, 3, 3] draw (S = 9: three quads per row, the last one partial) computed
    one by one from the formula in kernels/_philox.py's docstring, with a seed and an offset above
    2^32 so that every counter and key word is used."""
    assert _philox_scalar((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == (
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)  # Random123's vector: the scalar code is right
    seed, offset = (5 << 32) + 123_456_789, (7 << 32) + 42
    got = draws((2, 3, 3, 3), seed, offset).reshape(2, 3, 9)
    for n, c, s in [(0, 0, 0), (0, 0, 5), (1, 2, 8), (1, 1, 3), (0, 2, 6)]:
        q = (n * 3 + c) * 3 + s // 4
        words = _philox_scalar((q & 0xFFFFFFFF, q >> 32, offset & 0xFFFFFFFF, offset >> 32),
                               (seed & 0xFFFFFFFF, seed >> 32))
        u = [((w >> 9) + 0.5) / 2**23 for w in words]
        pair, lane = divmod(s % 4, 2)
        radius = math.sqrt(-2.0 * math.log(u[2 * pair]))
        angle = 2.0 * math.pi * u[2 * pair + 1]
        expected = radius * (math.cos(angle) if lane == 0 else math.sin(angle))
        assert float(got[n, c, s]) == pytest.approx(expected, rel=1e-12, abs=1e-12), (n, c, s)


def test_draw_statistics():
    """2^20 reference draws: mean 0, std 1, normal shape, no correlation with neighbours or streams."""
    n = 1 << 20
    z = draws((16, 4, 128, 128), 2024, 5).flatten()
    bound = 5.0 / math.sqrt(n)
    assert abs(z.mean().item()) < bound
    assert abs(z.std().item() - 1.0) < 5.0 * math.sqrt(0.5 / n)
    assert abs((z**4).mean().item() - 3.0) < 0.05  # kurtosis of a normal
    for lag in (1, 2, 3, 4, 5):  # inside a quad (1..3) and across quads (4, 5)
        assert abs(torch.corrcoef(torch.stack([z[:-lag], z[lag:]]))[0, 1].item()) < bound
    for other in (draws((16, 4, 128, 128), 2024, 6).flatten(), draws((16, 4, 128, 128), 2025, 5).flatten()):
        assert abs(torch.corrcoef(torch.stack([z, other]))[0, 1].item()) < bound
    scipy_stats = pytest.importorskip("scipy.stats")
    assert scipy_stats.kstest(z[:200_000].numpy(), "norm").pvalue > 1e-4
