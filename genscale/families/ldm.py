"""Latent diffusion (Rombach et al. 2022): DDPM on the latents of a trained, frozen autoencoder.

The autoencoder is a finished ``--model vae`` run (``--autoencoder RUN``; without it train.py
first trains the KL autoencoder of ``AUTOENCODER_RECIPE`` into OUT/autoencoder; a small ``--beta``
makes it the KL-regularised autoencoder of the paper, ``--downsample 4`` or ``8`` its factor;
on the digits ``--beta 0.1 --downsample 4 --z-channels 4`` gives 4 x 2 x 2 latents that decode
to digits the judge reads 95% right, where the beta = 1 VAE's blurry ones reach 75%): its EMA
weights are loaded and frozen. Latents are posterior samples scaled to unit variance by
``latent_scale`` = 1 / std over the latents of (up to) ``scale_samples`` training images,
computed once when the run starts and kept as a buffer in the checkpoints. The diffusion is the
``ddpm`` family's (same options: schedule, prediction, class-conditional U-Net with classifier-
free guidance), without clipping x0 (latents are not bounded by 1) and predicting v by default;
samples are decoded.

The autoencoder's architecture is recorded in this run's config.json (``autoencoder_config``)
and its weights in this run's checkpoints, so sampling needs only this run's folder.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from genscale.diffusion.losses import diffusion_loss
from genscale.diffusion.schedule import NoiseSchedule
from genscale.errors import UserError
from genscale.families import ddpm
from genscale.families.base import Batch, DataInfo, Family, Optimize
from genscale.families.vae import Options as VAEOptions
from genscale.families.vae import build_vae
from genscale.models.autoencoder import LatentDiffusionModel, diffusion_latent_shape
from genscale.models.unet import UNet
from genscale.optim import adam


# The vae options of the autoencoder train.py trains first when --autoencoder is not given: the
# KL-regularised autoencoder (beta 0.1) with a 4 x 2 x 2 latent on the 8 x 8 digits.
AUTOENCODER_RECIPE = {"beta": "0.1", "downsample": "4", "z-channels": "4"}
AUTOENCODER_FOLDER = "autoencoder"


@dataclass
class Options(ddpm.Options):
    autoencoder: str = ""  # folder of a finished vae run ("" = train one first into OUT/autoencoder)
    autoencoder_steps: int = 0  # steps of the autoencoder trained first (0 = the vae preset's)
    autoencoder_config: str = ""  # filled in by the run: the autoencoder's architecture (JSON)
    scale_samples: int = 2000  # training images whose latents set the scale factor
    # v, not eps: without x0 clipping (latents are unbounded) DDIM's first steps divide eps
    # errors by sqrt(abar_T) ~ 0 and the x0 estimates explode; v stays well-posed at t ~ T.
    # On the digits' KL autoencoder: judge accuracy 0.82 with eps, 1.0 with v (same budget).
    prediction: str = "v"
    base_width: int = 64
    channel_mults: tuple[int, ...] = (1,)
    attention_res: tuple[int, ...] = (2,)

    def validate(self) -> None:
        super().validate()
        if self.autoencoder_steps < 0:
            raise UserError(f"--autoencoder-steps must be 0 (the vae preset's) or positive, got {self.autoencoder_steps}")
        if self.scale_samples < 2:
            raise UserError(f"--scale-samples must be at least 2, got {self.scale_samples}")


OPTION_HELP = {**ddpm.OPTION_HELP,
               "autoencoder": "run folder of a finished vae run whose (frozen) autoencoder defines the latents "
                              "(default: train a KL autoencoder first into OUT/autoencoder)",
               "autoencoder_steps": "training steps of the autoencoder trained first when --autoencoder is not given "
                                    "(0: the vae preset's)",
               "autoencoder_config": "set by the run itself: the autoencoder's architecture as JSON",
               "scale_samples": "training images whose latents' std sets the latent scale factor"}

# A 16-d latent (a flat VAE latent folded to 4 x 2 x 2) is far cheaper than 8x8 pixels.

# Options a resume may change (genscale/families/__init__.py; train.check_same_options refuses others).
# autoencoder and autoencoder_config are filled in by the run itself (the autoencoder trained first);
# scale_samples only matters before the first checkpoint, which holds the latent scale.
RESUME_MAY_CHANGE = (*ddpm.RESUME_MAY_CHANGE, "autoencoder", "autoencoder_config", "scale_samples")

PRESET = {"data": "digits", "image_size": 8, "steps": 3000, "batch_size": 64, "lr": 1e-3, "warmup_steps": 200,
          "ema_decay": 0.999, "ckpt_every": 1000, "sample_every": 1000}


def read_autoencoder_run(run_dir: str) -> tuple[dict, dict]:
    """(spec, weights) of a vae run: spec = its options, data info, folder and step."""
    from genscale.checkpoints import load_ema_weights

    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"--autoencoder {run_dir} is not a genscale run (no config.json)")
    try:
        record = json.loads(path.read_text())
        model, options, info = record["train"]["model"], record["options"], record["data_info"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is damaged and cannot be read") from None
    if model != "vae":
        raise UserError(f"--autoencoder must be a vae run, but {run_dir} holds a {model} run")
    weights, step = load_ema_weights(run_dir)
    spec = {"model": model, "options": options, "data_info": info, "run": str(Path(run_dir).resolve()),
            "step": step, "data": record["train"].get("data")}
    return spec, weights


class LDM(Family):
    name = "ldm"
    ema_names = ("model",)

    def __init__(self, train, options: Options, info: DataInfo):
        super().__init__()
        self.opts, self.info = options, info
        self.num_classes = info.num_classes
        ddpm.check_guidance(options.cond_drop, info.num_classes, options.cfg_scale)
        self.schedule = NoiseSchedule(options.schedule, options.timesteps)
        if options.autoencoder_config:  # a recorded run: the weights come with its checkpoint
            spec, weights = json.loads(options.autoencoder_config), None
        elif not options.autoencoder:
            raise UserError("ldm needs a trained autoencoder: pass --autoencoder RUN (a vae run folder)")
        else:
            spec, weights = read_autoencoder_run(options.autoencoder)
        ae_info = DataInfo(**spec["data_info"])
        if (ae_info.channels, ae_info.image_size) != (info.channels, info.image_size):
            raise UserError(f"the autoencoder works on {ae_info.image_size}px images with {ae_info.channels} "
                            f"channel(s), this run on {info.image_size}px with {info.channels}: pass the same "
                            "--image-size")
        try:
            autoencoder = build_vae(VAEOptions(**spec["options"]), ae_info)
            if weights is not None:
                autoencoder.load_state_dict(weights["vae"])
            c, s, _ = diffusion_latent_shape(autoencoder.latent_shape)
            unet = UNet(in_channels=c, out_channels=c, base_width=options.base_width,
                        channel_mults=options.channel_mults, num_res_blocks=options.num_res_blocks,
                        attention_resolutions=options.attention_res, image_size=s,
                        num_classes=info.num_classes, dropout=options.dropout,
                        grad_checkpointing=options.grad_checkpointing)
        except (ValueError, KeyError, RuntimeError) as err:
            raise UserError(f"the autoencoder of this ldm run cannot be used: {err}".splitlines()[0]) from None
        self.nets["model"] = LatentDiffusionModel(unet, autoencoder)
        if weights is not None:
            self.latent_scale = self._measure_scale(train)
            options.autoencoder_config = json.dumps(spec)  # recorded in config.json by train.py
        self.optimizers["model"] = adam(unet.parameters(), train.lr, decoupled=True, weight_decay=train.weight_decay)

    @property
    def model(self) -> LatentDiffusionModel:
        net = self.nets["model"]
        return getattr(net, "module", net)  # the plain module behind a DDP wrapper

    def _measure_scale(self, train) -> float:
        """1 / std of the latents of the first ``scale_samples`` training images (in key order),
        with the posterior noise from a fixed seed: every rank and every re-run gets the same."""
        from genscale.metrics.reference import load_split

        _, images, _ = load_split(train.data, "train", self.info.image_size, self.info.channels,
                                  train.cache_dir or None, limit=self.opts.scale_samples)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        return self.model.set_scale(x, torch.Generator().manual_seed(0))

    def _model_fn(self, z, t, labels):
        return self.nets["model"](z, t, labels)

    def training_step(self, batch: Batch, optimize: Optimize) -> dict[str, float]:
        z0 = self.model.encode(batch["image"])  # frozen: no graph through the autoencoder
        labels = None
        if self.num_classes:
            labels = batch["label"].clamp(min=0)
            drop = torch.rand(labels.shape, device=labels.device) < self.opts.cond_drop
            labels = torch.where(drop | (batch["label"] < 0), torch.full_like(labels, self.num_classes), labels)
        loss = diffusion_loss(self._model_fn, z0, labels, self.schedule, prediction=self.opts.prediction,
                              loss=self.opts.loss, snr_gamma=self.opts.snr_gamma)
        optimize(loss, "model")
        return {"loss": loss.detach()}

    @torch.no_grad()
    def sample_latents(self, n, labels=None, generator=None, cfg_scale=None, sampler=None, sampling_steps=None,
                       eta=None, progress=False) -> torch.Tensor:
        """Scaled (folded) latents from the reverse process, x0 unclipped."""
        return ddpm.reverse_process(self, (n, *self.model.shape), labels, generator, cfg_scale, sampler,
                                    sampling_steps, eta, progress, clip_x0=False)

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, cfg_scale=None, sampler=None, sampling_steps=None,
               eta=None, progress=False, **_) -> torch.Tensor:
        """Images in [-1, 1]: latents from the diffusion, through the frozen decoder."""
        z = self.sample_latents(n, labels, generator, cfg_scale, sampler, sampling_steps, eta, progress)
        return self.model.decode(z)


FAMILY = LDM
