"""The pix2pix U-Net generator (Isola et al. 2017): an encoder-decoder with skip connections.

``num_downs`` stride-2 4x4 convolutions (LeakyReLU 0.2 before each but the first, BatchNorm
after each but the first and the innermost) take the image down to a 1x1 bottleneck when
``num_downs = log2(size)`` (8 at 256 px, 5 at 32 px); the decoder mirrors them with ReLU +
transposed convolutions + BatchNorm, concatenating the encoder map of the same resolution
before each. Dropout acts in the inner decoder blocks (the pix2pix rule: max(1, num_downs - 5)
blocks next to the innermost, i.e. 3 at 256 px and 2 at 128 px) and is pix2pix's noise source.
Channels: ``width * min(2^i, 8)``. At 256 px, width 64, 3 -> 3 channels: 54,413,955 parameters.
"""
from __future__ import annotations

import torch
from torch import nn

from genscale.models.dcgan import check_power_of_two, dcgan_init


def unet_dropout_blocks(num_downs: int) -> int:
    return max(1, num_downs - 5)


class UNetGenerator(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, image_size: int, width: int = 64,
                 num_downs: int | None = None, dropout: float = 0.5):
        super().__init__()
        most = check_power_of_two(image_size, smallest=4)
        depth = most if num_downs is None else num_downs
        if not 2 <= depth <= most:
            raise ValueError(f"a U-Net on {image_size} px images takes 2 to {most} downsamplings, got {depth}")
        self.num_downs = depth
        ch = [width * min(2 ** i, 8) for i in range(depth)]
        downs: list[nn.Module] = [nn.Conv2d(in_channels, ch[0], 4, 2, 1, bias=False)]
        for i in range(1, depth):
            block: list[nn.Module] = [nn.LeakyReLU(0.2), nn.Conv2d(ch[i - 1], ch[i], 4, 2, 1, bias=False)]
            if i < depth - 1:  # no BatchNorm on the 1x1 bottleneck (it would erase a batch of one)
                block.append(nn.BatchNorm2d(ch[i]))
            downs.append(nn.Sequential(*block))
        self.downs = nn.ModuleList(downs)

        with_dropout = set(range(depth - 2, depth - 2 - unet_dropout_blocks(depth), -1)) if dropout > 0 else set()
        ups: list[nn.Module] = [nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(2 * ch[0], out_channels, 4, 2, 1),
                                              nn.Tanh())]
        for i in range(1, depth):
            c_in = ch[i] if i == depth - 1 else 2 * ch[i]  # the innermost has no skip to concatenate
            block = [nn.ReLU(), nn.ConvTranspose2d(c_in, ch[i - 1], 4, 2, 1, bias=False), nn.BatchNorm2d(ch[i - 1])]
            if i in with_dropout:
                block.append(nn.Dropout(dropout))
            ups.append(nn.Sequential(*block))
        self.ups = nn.ModuleList(ups)
        dcgan_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        h = x
        for down in self.downs:
            h = down(h)
            skips.append(h)
        h = self.ups[-1](skips[-1])
        for i in range(self.num_downs - 2, -1, -1):
            h = self.ups[i](torch.cat([skips[i], h], dim=1))
        return h
