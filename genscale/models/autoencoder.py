"""The autoencoder side of latent diffusion (Rombach et al. 2022): a frozen autoencoder, the latent
scale factor, and the denoising U-Net that runs on the scaled latents, in one module.

Latents are posterior samples of the autoencoder times ``latent_scale`` = 1 / std of the
latents of a fixed sample of training images, so the diffusion sees unit-variance data. The
scale is a buffer: it is saved, EMA-copied and restored with the weights. Latents smaller than
2x2 (a flat VAE latent is 1x1) are folded into 2x2 maps with a pixel shuffle so a U-Net can run
on them. ``forward`` is the U-Net alone, so DDP wraps and synchronises exactly the trained part.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from genscale.models.vae import ConvVAE


def diffusion_latent_shape(latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """The shape the U-Net sees: latents below 2x2 folded into 2x2 (channels / 4 each)."""
    c, h, w = latent_shape
    if h >= 2 and w >= 2:
        return latent_shape
    if h != 1 or w != 1 or c % 4:
        raise ValueError(f"latents of shape {latent_shape} are too small for a U-Net; a 1x1 latent needs "
                         "a channel count divisible by 4")
    return (c // 4, 2, 2)


class LatentDiffusionModel(nn.Module):
    def __init__(self, unet: nn.Module, autoencoder: ConvVAE) -> None:
        super().__init__()
        self.unet = unet
        self.autoencoder = autoencoder.requires_grad_(False).eval()
        self.fold = autoencoder.latent_size < 2
        self.register_buffer("latent_scale", torch.ones((), dtype=torch.float32))

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape of one (folded) latent, as the U-Net sees it."""
        return diffusion_latent_shape(self.autoencoder.latent_shape)

    def train(self, mode: bool = True) -> "LatentDiffusionModel":
        super().train(mode)
        self.autoencoder.eval()  # frozen: always in evaluation mode
        return self

    def forward(self, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.unet(z, t, labels)

    @torch.no_grad()
    def raw_latents(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Unscaled, unfolded posterior samples z ~ q(z|x) (noise from torch's global RNG when None)."""
        mean, logvar = self.autoencoder.encode(x)
        if noise is None:
            noise = torch.randn_like(mean)
        return self.autoencoder.reparameterize(mean, logvar, noise)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Images -> scaled (and folded) latents, the diffusion's data."""
        z = self.raw_latents(x, noise) * self.latent_scale
        return F.pixel_shuffle(z, 2) if self.fold else z

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled (folded) latents -> images in [-1, 1] (the decoder's mean)."""
        if self.fold:
            z = F.pixel_unshuffle(z, 2)
        return self.autoencoder.decode(z / self.latent_scale)[0].float().clamp(-1, 1)

    @torch.no_grad()
    def set_scale(self, images: torch.Tensor, generator: torch.Generator | None = None,
                  batch_size: int = 500) -> float:
        """latent_scale = 1 / std of the latents of ``images`` (noise from ``generator``); returns it."""
        chunks = []
        where = generator.device if generator is not None else torch.device("cpu")
        for start in range(0, len(images), batch_size):
            mean, logvar = self.autoencoder.encode(images[start:start + batch_size].to(self.latent_scale.device))
            noise = torch.randn(mean.shape, generator=generator, device=where).to(mean)
            chunks.append(self.autoencoder.reparameterize(mean, logvar, noise).double().flatten())
        std = float(torch.cat(chunks).std())
        if not std > 0:
            raise ValueError("the autoencoder's latents of the training images have no spread")
        self.latent_scale.fill_(1.0 / std)
        return 1.0 / std
