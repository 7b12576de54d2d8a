"""Variational autoencoder (Kingma & Welling 2014) with a convolutional encoder and decoder.

Loss per image = reconstruction (-log p(x|z), discretised Gaussian over 256 levels, z drawn
with the reparameterisation trick) + beta * KL(q(z|x) || N(0, I)), divided by the number of
pixel values so the learning rate does not depend on the image size. beta = 1 is the ELBO;
a small beta makes the KL-regularised autoencoder that latent diffusion (``--model ldm``)
runs on. The reported negative ELBO always uses beta = 1, in nats per image and bits per
dimension; ``test_elbo`` measures it on the held-out split.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from genscale.errors import UserError
from genscale.families.base import Batch, DataInfo, Family, Optimize
from genscale.families.gan_base import eval_mode
from genscale.models.vae import ConvVAE, bits_per_dim, gaussian_kl
from genscale.optim import adam

PREVIEW = 8  # images kept from the first batch for the reconstruction rows of the grid


@dataclass
class Options:
    beta: float = 1.0  # weight of the KL term (1 = the ELBO; small = a KL-regularised autoencoder)
    downsample: int = 0  # spatial downsampling factor of the latent; 0 = the image size (a flat latent)
    z_channels: int = 16
    width: int = 32
    elbo_samples: int = 8  # z samples per image when measuring the negative ELBO

    def validate(self) -> None:
        if self.beta < 0:
            raise UserError(f"--beta must not be negative, got {self.beta}")
        if self.downsample < 0 or self.downsample & (self.downsample - 1):
            raise UserError(f"--downsample must be a power of two (or 0 for a flat latent), got {self.downsample}")
        if self.z_channels < 1 or self.width < 1 or self.elbo_samples < 1:
            raise UserError("--z-channels, --width and --elbo-samples must be positive")


OPTION_HELP = {
    "beta": "KL weight: 1 = the ELBO, small (e.g. 1e-3) = a KL-regularised autoencoder for --model ldm",
    "downsample": "latent resolution = image size / this (a power of two; 0 = a flat 1x1 latent)",
    "z_channels": "latent channels",
    "width": "channels at full resolution (doubling per downsampling, up to 2x)",
    "elbo_samples": "latent samples per image when the negative ELBO is measured",
}

# 8x8 digits, a flat 16-d latent: about 1.5 ms a step on one core, a few minutes in all.

# Options a resume may change (genscale/families/__init__.py; train.check_same_options refuses others).
RESUME_MAY_CHANGE = ("beta", "elbo_samples")

PRESET = {"data": "digits", "image_size": 8, "steps": 6000, "batch_size": 64, "lr": 1e-3, "warmup_steps": 100,
          "ema_decay": 0.999, "ckpt_every": 1000, "sample_every": 2000}


def build_vae(options: Options, info: DataInfo) -> ConvVAE:
    size = info.image_size
    if not options.downsample and size & (size - 1):  # the factor is the image size: say so in its terms
        raise ValueError(f"a flat latent (--downsample 0) needs an image size that is a power of two, got {size}; "
                         "pick another --image-size or a --downsample that divides it")
    return ConvVAE(info.channels, info.image_size, options.downsample or info.image_size, options.z_channels,
                   options.width)


class VAE(Family):
    name = "vae"
    ema_names = ("vae",)

    def __init__(self, train, options: Options, info: DataInfo):
        super().__init__()
        self.opts, self.info, self.train_cfg = options, info, train
        try:
            self.nets["vae"] = build_vae(options, info)
        except ValueError as err:
            raise UserError(str(err)) from None
        self.optimizers["vae"] = adam(self.nets["vae"].parameters(), train.lr, decoupled=False,
                                     weight_decay=train.weight_decay)
        self.preview: torch.Tensor | None = None

    @property
    def vae(self) -> ConvVAE:
        net = self.nets["vae"]
        return getattr(net, "module", net)  # the plain module behind a DDP wrapper

    def training_step(self, batch: Batch, optimize: Optimize) -> dict[str, float]:
        x = batch["image"]
        if self.preview is None:
            self.preview = x[:PREVIEW].detach().clone()
        terms = self.nets["vae"](x)  # through the wrapper: DDP syncs gradients in its backward
        rec, kl = terms["rec"].mean(), terms["kl"].mean()
        dims = x[0].numel()
        loss = (rec + self.opts.beta * kl) / dims
        optimize(loss, "vae")
        nelbo = (rec + kl).detach()
        return {"loss": loss.detach(), "rec_nats": rec.detach(), "kl_nats": kl.detach(),
                "nelbo_nats": nelbo, "bits_per_dim": bits_per_dim(nelbo, dims)}

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, generator: torch.Generator | None = None,
               **options) -> torch.Tensor:
        """Decoder means of z ~ N(0, I) (labels are ignored: the VAE is unconditional)."""
        vae = self.vae
        z = _randn((n, *vae.latent_shape), generator).to(self.device)
        with eval_mode(vae):
            return vae.decode(z)[0].float().clamp(-1, 1)

    @torch.no_grad()
    def evaluate_elbo(self, images: torch.Tensor, generator: torch.Generator | None = None,
                      samples: int | None = None, batch_size: int = 500) -> dict[str, float]:
        """Mean negative ELBO of [-1, 1] images (8-bit values) in nats and bits/dim, with the
        reconstruction term averaged over ``samples`` draws of z per image (the KL is exact)."""
        vae = self.vae
        k = samples or self.opts.elbo_samples
        rec_sum = kl_sum = 0.0
        with eval_mode(vae):
            for start in range(0, len(images), batch_size):
                x = images[start:start + batch_size].to(self.device)
                mean, logvar = vae.encode(x)
                for _ in range(k):
                    noise = _randn(mean.shape, generator).to(mean)
                    rec_sum += float(vae(x, noise)["rec"].double().sum()) / k
                kl_sum += float(gaussian_kl(mean.float(), logvar.float()).double().sum())
        n, dims = len(images), int(images[0].numel())
        rec, kl = rec_sum / n, kl_sum / n
        return {"nelbo_nats": rec + kl, "bits_per_dim": bits_per_dim(rec + kl, dims), "rec_nats": rec,
                "kl_nats": kl, "num": n, "elbo_samples": k}

    def test_elbo(self, split: str = "test", seed: int = 0) -> dict[str, float]:
        """``evaluate_elbo`` on every image of the run's held-out split."""
        from genscale.metrics.reference import load_split

        cfg = self.train_cfg
        _, images, _ = load_split(cfg.data, split, self.info.image_size, self.info.channels, cfg.cache_dir or None)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        return {**self.evaluate_elbo(x, torch.Generator().manual_seed(seed)), "split": split}

    def final_metrics(self) -> dict[str, float | str]:
        """Printed and logged when training finishes: the negative ELBO of the held-out split (a
        note instead when --data has none: the trained run stays whole, and an ldm goes on)."""
        from genscale.data import resolve_data

        try:
            resolve_data(self.train_cfg.data, "test", self.train_cfg.cache_dir or None)
        except UserError:
            return {"test_nelbo": "not measured: --data has no test split"}
        r = self.test_elbo()
        return {"test_nelbo_nats": round(r["nelbo_nats"], 3), "test_bits_per_dim": round(r["bits_per_dim"], 4),
                "test_rec_nats": round(r["rec_nats"], 3), "test_kl_nats": round(r["kl_nats"], 3),
                "test_images": int(r["num"])}

    @torch.no_grad()
    def grid(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        """The periodic grid, 8 per row: 4 rows of prior samples, then rows of input |
        reconstruction pairs, then up to 4 rows of latent interpolations between training images."""
        if self.preview is None:
            raise UserError("no training batch seen yet, so there is nothing to reconstruct")
        vae, x = self.vae, self.preview.to(self.device)
        prior = self.sample(32, generator=generator)
        with eval_mode(vae):
            recon = vae.reconstruct(x)
            pairs = torch.stack([x, recon], 1).flatten(0, 1)
            mean = vae.encode(x)[0]
            k = max(1, len(x) // 2)  # the preview holds up to 8 images: a batch may be smaller
            a, b = mean[:k], mean[-k:]
            w = torch.linspace(0, 1, 8, device=x.device).view(1, 8, 1, 1, 1)
            z = (1 - w) * a[:, None] + w * b[:, None]
            lerp = vae.decode(z.flatten(0, 1))[0].clamp(-1, 1)
        return torch.cat([prior, pairs, lerp.float()]), 8


def _randn(shape, generator: torch.Generator | None) -> torch.Tensor:
    where = generator.device if generator is not None else torch.device("cpu")
    return torch.randn(tuple(shape), generator=generator, device=where)


FAMILY = VAE
