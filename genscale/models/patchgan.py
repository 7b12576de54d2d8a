"""PatchGAN discriminator (Isola et al. 2017): a map of real/fake logits, one per image patch.

``n_layers`` stride-2 4x4 convolutions (the first without normalisation), then one stride-1
4x4 convolution with normalisation and a final stride-1 4x4 convolution to one channel. The
channel count doubles per layer up to 8x ``width``. Convolutions followed by BatchNorm carry
no bias (BatchNorm's shift makes it redundant): with 6 input channels, width 64 and 3 layers
that is 2,768,705 parameters and each output sees a 70x70 patch of the input.
"""
from __future__ import annotations

import torch
from torch import nn

from genscale.models.dcgan import dcgan_init


def patch_receptive_field(n_layers: int) -> int:
    """Receptive field in pixels of one output of a PatchDiscriminator with ``n_layers``."""
    # From the input side: a 4x4 conv widens the field by 3 x (product of the strides before it).
    field, jump = 1, 1
    for s in [2] * n_layers + [1, 1]:
        field += 3 * jump
        jump *= s
    return field


def patch_output_size(image_size: int, n_layers: int) -> int:
    """Side of the logit map for a square input (padding 1 everywhere)."""
    size = image_size
    for _ in range(n_layers):
        size = (size + 2 - 4) // 2 + 1
    return size - 2  # each of the two stride-1 4x4 convs with padding 1 shrinks by one


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int, width: int = 64, n_layers: int = 3, norm: str = "batch"):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"a PatchGAN needs at least one strided layer, got {n_layers}")
        Norm = {"batch": nn.BatchNorm2d, "instance": nn.InstanceNorm2d}[norm]
        # InstanceNorm without affine parameters has no shift, so the convolution keeps its bias.
        bias = norm == "instance"
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(width * prev, width * mult, 4, stride, 1, bias=bias),
                       Norm(width * mult), nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(width * mult, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        self.n_layers = n_layers
        dcgan_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N x C x H x W -> N x 1 x H' x W' logits."""
        return self.net(x)
