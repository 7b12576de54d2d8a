"""Building blocks shared by the U-Nets: time embedding, normalisation, ResBlock, attention, resampling.

Every GroupNorm (+SiLU) goes through ``kernels.group_norm_silu`` so that the fused Triton kernel
replaces all of them at once on CUDA.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels


def group_count(channels: int, max_groups: int = 32) -> int:
    """The largest group count <= min(max_groups, channels // 4) that divides ``channels`` (>= 1).

    Keeps at least 4 channels per group, so narrow CPU models do not normalise single channels.
    """
    groups = max(1, min(max_groups, channels // 4))
    while channels % groups:
        groups -= 1
    return groups


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer-style embedding of (possibly fractional) timesteps: [N] -> [N, dim], float32.

    First half cosines, second half sines, frequencies 1 .. 1/max_period geometrically spaced.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """t -> sinusoidal(t, base) -> Linear -> SiLU -> Linear, width ``embed_dim``."""

    def __init__(self, base_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.base_dim = base_dim
        self.mlp = nn.Sequential(nn.Linear(base_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = sinusoidal_embedding(t, self.base_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class GroupNormSiLU(nn.Module):
    """GroupNorm with an affine transform, followed by SiLU (or nothing when ``activation`` is None)."""

    def __init__(self, channels: int, num_groups: int, activation: str | None = "silu", eps: float = 1e-5) -> None:
        super().__init__()
        if channels % num_groups:
            raise ValueError(f"GroupNorm needs channels divisible by groups: got C={channels}, groups={num_groups}")
        self.num_groups, self.activation, self.eps = num_groups, activation, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.group_norm_silu(x, self.weight, self.bias, self.num_groups, eps=self.eps,
                                       activation=self.activation)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, groups={self.num_groups}, activation={self.activation}"


def zero_init(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters: the block it ends starts as the identity (DDPM, ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """norm-SiLU -> conv3 -> + proj(emb) -> norm-SiLU -> dropout -> conv3 (zero-init), plus skip."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, dropout: float = 0.0,
                 max_groups: int = 32) -> None:
        super().__init__()
        self.norm1 = GroupNormSiLU(in_channels, group_count(in_channels, max_groups))
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(embed_dim, out_channels)
        self.norm2 = GroupNormSiLU(out_channels, group_count(out_channels, max_groups))
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """``emb`` is the time (+class) embedding after its SiLU, shape [N, embed_dim]."""
        h = self.conv1(self.norm1(x))
        h = h + self.emb_proj(emb)[:, :, None, None]
        h = self.conv2(self.dropout(self.norm2(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, pre-norm, zero-initialised output, residual."""

    def __init__(self, channels: int, num_heads: int = 1, max_groups: int = 32) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention needs channels divisible by heads: got C={channels}, heads={num_heads}")
        self.num_heads = num_heads
        self.norm = GroupNormSiLU(channels, group_count(channels, max_groups), activation=None)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(n, 3, self.num_heads, c // self.num_heads, h * w)
        # [N, heads, HW, head_dim] for scaled_dot_product_attention (which scales by 1/sqrt(head_dim)).
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(n, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
