"""A plain U-Net for regression from (masked image, mask) to the whole image.

Each level holds two 3x3 convolutions with GroupNorm and SiLU; a stride-2 convolution goes down
a level and nearest upsampling plus a 3x3 convolution comes back up, where the encoder map of
the same resolution is concatenated (the skip connection). The output is linear (no tanh): the
regression target is in [-1, 1] and the caller clamps. No time or class input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genscale.models.layers import GroupNormSiLU, group_count


class ConvBlock(nn.Module):
    """conv3 -> GroupNorm-SiLU -> conv3 -> GroupNorm-SiLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        groups = group_count(out_channels, 8)
        self.body = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1),
                                  GroupNormSiLU(out_channels, groups),
                                  nn.Conv2d(out_channels, out_channels, 3, padding=1),
                                  GroupNormSiLU(out_channels, groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class InpaintUNet(nn.Module):
    """forward(x [N, in_channels, H, W]) -> [N, out_channels, H, W]; H and W halve ``depth`` times."""

    def __init__(self, in_channels: int, out_channels: int, image_size: int, width: int = 32,
                 depth: int = 2, max_mult: int = 4) -> None:
        super().__init__()
        if depth < 1 or image_size % (2 ** depth) or image_size // (2 ** depth) < 1:
            raise ValueError(f"a U-Net with {depth} downsamplings needs an image size divisible by {2 ** depth}, "
                             f"got {image_size}")
        self.depth = depth
        ch = [width * min(2 ** i, max_mult) for i in range(depth + 1)]
        self.inp = ConvBlock(in_channels, ch[0])
        self.downs = nn.ModuleList(nn.Conv2d(ch[i], ch[i], 3, stride=2, padding=1) for i in range(depth))
        self.enc = nn.ModuleList(ConvBlock(ch[i], ch[i + 1]) for i in range(depth))
        self.ups = nn.ModuleList(nn.Conv2d(ch[i + 1], ch[i], 3, padding=1) for i in range(depth))
        self.dec = nn.ModuleList(ConvBlock(2 * ch[i], ch[i]) for i in range(depth))
        self.out = nn.Conv2d(ch[0], out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        skips = [h]
        for i in range(self.depth):
            h = self.enc[i](self.downs[i](h))
            skips.append(h)
        skips.pop()  # the bottom map is h itself
        for i in reversed(range(self.depth)):
            h = self.ups[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = self.dec[i](torch.cat([skips.pop(), h], dim=1))
        return self.out(h)
