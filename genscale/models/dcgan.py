"""DCGAN networks (Radford et al. 2015), sized from the image size, optionally label-conditioned.

Generator: the noise (plus a label embedding) is a 1x1 map, a 4x4 transposed convolution makes a
4x4 map of ``width * 2^(k-1)`` channels, and k = log2(size) - 2 stride-2 transposed convolutions
double the resolution while halving the channels, ending in tanh. Discriminator: the mirror
image with strided convolutions and LeakyReLU(0.2), no BatchNorm on the first layer, and a final
4x4 convolution to ``out_dim`` logits. As in the paper's reference code no convolution has a
bias: at 64 px, 3 channels, width 64 and z 100 that gives 3,576,704 and 2,765,568 parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def check_power_of_two(image_size: int, smallest: int = 8) -> int:
    """log2 of ``image_size``; ValueError unless it is a power of two >= ``smallest``."""
    if image_size < smallest or image_size & (image_size - 1):
        raise ValueError(f"image size {image_size} is not supported: DCGAN networks need a power of two "
                         f">= {smallest} (e.g. 16, 32, 64)")
    return image_size.bit_length() - 1


def dcgan_init(module: nn.Module) -> None:
    """The DCGAN initialisation: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02), biases 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


class DCGANGenerator(nn.Module):
    def __init__(self, z_dim: int, channels: int, image_size: int, width: int = 64,
                 num_classes: int = 0, embed_dim: int = 0):
        super().__init__()
        ups = check_power_of_two(image_size) - 2
        self.z_dim, self.num_classes = z_dim, num_classes
        if num_classes and not embed_dim:
            raise ValueError("a label-conditioned generator needs embed_dim > 0")
        self.embed = nn.Embedding(num_classes, embed_dim) if num_classes else None
        ch = width * 2 ** (ups - 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(z_dim + (embed_dim if num_classes else 0), ch, 4, 1, 0,
                                                      bias=False),
                                   nn.BatchNorm2d(ch), nn.ReLU()]
        for _ in range(ups - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU()]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = z
        if self.embed is not None:
            if labels is None:
                raise ValueError("this generator is label-conditioned: pass labels")
            h = torch.cat([z, self.embed(labels).to(z.dtype)], dim=1)
        return self.net(h[:, :, None, None])


class DCGANDiscriminator(nn.Module):
    """Logits N x ``out_dim`` (squeezed to N when ``out_dim`` is 1).

    ``label_channels`` > 0 makes it a conditional discriminator in the style of Mirza & Osindero:
    the one-hot label is broadcast to that many constant planes concatenated to the image.
    """

    def __init__(self, channels: int, image_size: int, width: int = 64, out_dim: int = 1,
                 label_channels: int = 0):
        super().__init__()
        downs = check_power_of_two(image_size) - 2
        self.out_dim, self.label_channels = out_dim, label_channels
        layers: list[nn.Module] = [nn.Conv2d(channels + label_channels, width, 4, 2, 1, bias=False),
                                   nn.LeakyReLU(0.2)]
        ch = width
        for _ in range(downs - 1):
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch * 2), nn.LeakyReLU(0.2)]
            ch *= 2
        layers.append(nn.Conv2d(ch, out_dim, 4, 1, 0, bias=False))
        self.net = nn.Sequential(*layers)
        dcgan_init(self)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.label_channels:
            if labels is None:
                raise ValueError("this discriminator is label-conditioned: pass labels")
            planes = F.one_hot(labels, self.label_channels).to(x.dtype)[:, :, None, None]
            x = torch.cat([x, planes.expand(-1, -1, *x.shape[2:])], dim=1)
        out = self.net(x).flatten(1)
        return out.squeeze(1) if self.out_dim == 1 else out
