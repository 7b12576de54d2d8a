"""Convolutional VAE / KL-regularised autoencoder and the likelihood pieces of its ELBO.

The encoder halves the resolution ``log2(downsample)`` times with stride-2 4x4 convolutions and
ends in a 1x1 convolution to the posterior mean and log-variance of a spatial latent of
``z_channels`` x (H / downsample) x (W / downsample); ``downsample = image size`` gives a flat
latent (a 1x1 map). The decoder mirrors it with stride-2 transposed convolutions and outputs,
per pixel, the mean and log-scale of a discretised Gaussian over the 256 levels of an 8-bit
image (DDPM's decoder, Ho et al. 2020, sec. 3.3), so the negative ELBO is an honest upper bound
of -log p(x) in nats for 8-bit data. With a small KL weight (beta) the same network is the
KL-regularised autoencoder of latent diffusion (Rombach et al. 2022).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LEVELS = 256  # 8-bit images: x = k / 127.5 - 1 for k = 0..255
MIN_LOG_SCALE = -7.0  # keeps the bin probabilities finite in float32
MAX_LOGVAR = 2.0  # posterior log-variances saturate smoothly below this


def gaussian_kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample, summed over all but the first dimension:
    0.5 * sum(mean^2 + var - 1 - logvar)."""
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1)


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    # erfc keeps the left tail's relative precision (1 + erf(x) cancels to zero in float32).
    return 0.5 * torch.erfc(-x / math.sqrt(2.0))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                                        levels: int = LEVELS) -> torch.Tensor:
    """log P(x) per sample (summed over all but the first dimension) of ``x`` in [-1, 1] on the grid of
    ``levels`` values, under a Gaussian N(mean, exp(log_scale)^2) integrated over each value's bin.

    Bins have half-width 1 / (levels - 1); the two end bins reach to -inf and +inf, so the
    probabilities of all levels sum to one. Differences of CDFs are taken on the side of the
    mean where they do not cancel; a bin whose probability underflows falls back on the density
    at its centre times its width.
    """
    half = 1.0 / (levels - 1)
    log_scale = log_scale.clamp(min=MIN_LOG_SCALE)
    inv = torch.exp(-log_scale)
    centred = x - mean
    upper, lower = (centred + half) * inv, (centred - half) * inv
    # On the right of the mean use 1 - cdf(-.) to keep the difference accurate in the tail.
    right = lower > 0
    p_mid = torch.where(right, _std_normal_cdf(-lower) - _std_normal_cdf(-upper),
                        _std_normal_cdf(upper) - _std_normal_cdf(lower))
    log_mid = torch.where(p_mid > 1e-30, p_mid.clamp(min=1e-30).log(),
                          -0.5 * (centred * inv).square() - 0.5 * math.log(2 * math.pi)
                          - log_scale + math.log(2 * half))
    log_low = torch.special.log_ndtr(upper)  # x = -1: everything below the first bin's top
    log_high = torch.special.log_ndtr(-lower)  # x = +1: everything above the last bin's bottom
    edge = 1.0 - half / 2  # halfway inside the end bins, robust to float32 rounding of x
    logp = torch.where(x < -edge, log_low, torch.where(x > edge, log_high, log_mid))
    return logp.flatten(1).sum(1)


def _levels(downsample: int, image_size: int) -> int:
    if downsample < 1 or downsample & (downsample - 1):
        raise ValueError(f"the autoencoder's downsampling factor must be a power of two, got {downsample}")
    if image_size % downsample:
        raise ValueError(f"image size {image_size} is not a multiple of the downsampling factor {downsample}")
    return downsample.bit_length() - 1


class ConvVAE(nn.Module):
    """encode(x) -> (mean, logvar) of q(z|x); decode(z) -> (mean, log_scale) of p(x|z)."""

    def __init__(self, channels: int, image_size: int, downsample: int = 8, z_channels: int = 16,
                 width: int = 32, max_mult: int = 2) -> None:
        super().__init__()
        levels = _levels(downsample, image_size)
        self.channels, self.image_size, self.z_channels = channels, image_size, z_channels
        self.latent_size = image_size // downsample
        widths = [width * min(2 ** i, max_mult) for i in range(levels + 1)]

        enc: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, padding=1), nn.SiLU()]
        for i in range(levels):
            enc += [nn.Conv2d(widths[i], widths[i + 1], 4, 2, 1), nn.SiLU(),
                    nn.Conv2d(widths[i + 1], widths[i + 1], 3, padding=1), nn.SiLU()]
        enc.append(nn.Conv2d(widths[-1], 2 * z_channels, 1))
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [nn.Conv2d(z_channels, widths[-1], 1), nn.SiLU()]
        for i in range(levels, 0, -1):
            dec += [nn.ConvTranspose2d(widths[i], widths[i - 1], 4, 2, 1), nn.SiLU(),
                    nn.Conv2d(widths[i - 1], widths[i - 1], 3, padding=1), nn.SiLU()]
        dec.append(nn.Conv2d(widths[0], 2 * channels, 3, padding=1))
        self.decoder = nn.Sequential(*dec)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.z_channels, self.latent_size, self.latent_size)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        # A smooth ceiling: one outlier batch pushing a posterior variance to e^15 feeds the
        # decoder enormous z and the loss overflows; a posterior wider than e^MAX_LOGVAR is of
        # no use anyway (the KL pulls it back to 1), and the gradient never vanishes.
        return mean, MAX_LOGVAR - F.softplus(MAX_LOGVAR - logvar)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_scale = self.decoder(z).chunk(2, dim=1)
        return mean, MIN_LOG_SCALE + F.softplus(log_scale - MIN_LOG_SCALE)  # a smooth floor

    @staticmethod
    def reparameterize(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z = mean + sigma * noise: a sample of q(z|x) that gradients flow through."""
        return mean + torch.exp(0.5 * logvar) * noise

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The per-sample ELBO terms of x in nats: {"rec": -log p(x|z), "kl": KL(q||p), "mean", "z"}.

        ``noise`` ~ N(0, I) in the latent's shape (drawn from torch's global RNG when None).
        """
        mean, logvar = self.encode(x)
        if noise is None:
            noise = torch.randn_like(mean)
        z = self.reparameterize(mean, logvar, noise)
        x_mean, x_log_scale = self.decode(z)
        rec = -discretized_gaussian_log_likelihood(x.float(), x_mean.float(), x_log_scale.float())
        return {"rec": rec, "kl": gaussian_kl(mean.float(), logvar.float()), "mean": x_mean, "z": z}

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Decoder mean at the posterior mean, clamped to [-1, 1]."""
        return self.decode(self.encode(x)[0])[0].clamp(-1, 1)


def bits_per_dim(nats: torch.Tensor | float, dims: int) -> torch.Tensor | float:
    """Per-image nats -> bits per dimension (a tensor stays a tensor, on its device)."""
    return nats / (dims * math.log(2.0))


def num_dims(x: torch.Tensor) -> int:
    return int(x[0].numel())

