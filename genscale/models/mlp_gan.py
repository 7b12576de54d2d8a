"""The original GAN's networks: multilayer perceptrons on flattened images (Goodfellow et al. 2014).

The generator maps a noise vector through Linear + BatchNorm + LeakyReLU blocks to a tanh
image; the discriminator maps the flattened image through Linear + LeakyReLU blocks to one
real/fake logit (the sigmoid lives in the loss, which is numerically safer).
"""
from __future__ import annotations

import math

import torch
from torch import nn


class MLPGenerator(nn.Module):
    def __init__(self, z_dim: int, out_shape: tuple[int, int, int], hidden: tuple[int, ...] = (256, 512)):
        super().__init__()
        if not hidden:
            raise ValueError("the MLP generator needs at least one hidden layer")
        self.z_dim = z_dim
        self.out_shape = tuple(out_shape)
        layers: list[nn.Module] = []
        width = z_dim
        for i, h in enumerate(hidden):
            layers.append(nn.Linear(width, h))
            # No BatchNorm right after the noise: normalising z itself would discard its scale.
            if i > 0:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.LeakyReLU(0.2))
            width = h
        layers += [nn.Linear(width, math.prod(self.out_shape)), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(z.shape[0], *self.out_shape)


class MLPDiscriminator(nn.Module):
    """``dropout`` after each hidden layer, as in the original GAN's discriminator: it keeps the
    discriminator from memorising the data and overpowering the generator, which then drops modes."""

    def __init__(self, in_shape: tuple[int, int, int], hidden: tuple[int, ...] = (512, 256),
                 dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = math.prod(in_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LeakyReLU(0.2)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images N x C x H x W -> one logit per image, shape N."""
        return self.net(x.flatten(1)).squeeze(1)
