"""GroupNorm (+ optional SiLU) — eager reference implementation.

The reference is both the CPU fallback and the oracle the Triton kernels are tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def group_norm_silu(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float = 1e-5,
    activation: str | None = "silu",
) -> torch.Tensor:
    """Return ``silu(group_norm(x))`` (or plain group norm when ``activation`` is None)."""
    channels = x.shape[1]
    if channels % num_groups != 0:
        raise ValueError(f"GroupNorm needs channels divisible by groups: got C={channels}, groups={num_groups}")
    y = F.group_norm(x, num_groups, weight, bias, eps)
    if activation == "silu":
        y = F.silu(y)
    elif activation is not None:
        raise ValueError(f"unknown activation {activation!r}; expected 'silu' or None")
    return y
