"""Registry of model families: `--model NAME` -> the module that defines it.

A family module defines ``Options`` (a dataclass of its own flags), ``PRESET`` (defaults for the
common training flags that suit it on its default data), ``RESUME_MAY_CHANGE`` (the options a
resumed run may change, training and sampling settings; a change to any other would give the
saved weights another meaning, so train.py refuses it) and ``FAMILY`` (its Family
subclass, built as ``FAMILY(train_config, options, data_info)``). Adding a family = one file + one
line here.
"""
from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES: dict[str, str] = {
    "ddpm": "genscale.families.ddpm",
    "gan": "genscale.families.gan",
    "dcgan": "genscale.families.dcgan",
    "cgan": "genscale.families.cgan",
    "pix2pix": "genscale.families.pix2pix",
    "gan-inpaint": "genscale.families.gan_inpaint",
    "vae": "genscale.families.vae",
    "inpaint": "genscale.families.inpaint",
    "transformer": "genscale.families.transformer",
    "ldm": "genscale.families.ldm",
    "denoiser": "genscale.families.denoiser",
}

DESCRIPTIONS: dict[str, str] = {
    "ddpm": "denoising diffusion (DDPM, DDIM and DPM-Solver++ samplers, classifier-free guidance)",
    "gan": "MLP GAN on flattened images (BCE, Adam 2e-4, betas 0.5/0.999)",
    "dcgan": "DCGAN: convolutional GAN sized from the image size",
    "cgan": "class-conditional GAN (N+1-way discriminator, or --discriminator binary)",
    "pix2pix": "paired image-to-image translation: U-Net + PatchGAN, GAN + 100 L1",
    "gan-inpaint": "adversarial inpainting: U-Net on (masked image, mask) + PatchGAN",
    "vae": "convolutional VAE: reconstruction + beta * KL, negative ELBO in nats and bits/dim",
    "inpaint": "U-Net inpainting: (masked image, mask) -> image, MSE on the holes",
    "transformer": "encoder-only transformer on patches: masked-patch MSE, inpainting, MaskGIT-style generation",
    "ldm": "latent diffusion: DDPM on the scaled latents of a trained vae run (--autoencoder RUN)",
    "denoiser": "single-step U-Net denoiser trained at one noise level (--sigma 0.5); sample.py --task denoise sweeps sigma",
}


def family_module(name: str) -> ModuleType:
    """Import the module of family ``name`` (the caller has checked that it exists)."""
    return importlib.import_module(FAMILIES[name])
