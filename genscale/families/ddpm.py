"""Denoising diffusion (Ho et al. 2020) with DDIM sampling and classifier-free guidance.

The U-Net predicts eps (or v); class labels are dropped to the null label with probability
``cond_drop`` during training so one network gives both the conditional and unconditional
predictions that guidance combines.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from genscale.diffusion.losses import diffusion_loss, min_snr_weights
from genscale.diffusion.dpm_solver import dpm_solver_sample
from genscale.diffusion.samplers import SAMPLERS, ddim_sample, ddpm_sample
from genscale.diffusion.schedule import NoiseSchedule
from genscale.errors import UserError
from genscale.families.base import DataInfo, Family
from genscale.models.unet import UNet
from genscale.optim import adam


@dataclass
class Options:
    schedule: str = "cosine"  # linear | cosine
    timesteps: int = 1000
    prediction: str = "eps"  # eps | v
    loss: str = "l2"  # l2 | l1
    snr_gamma: float = 0.0  # min-SNR-gamma loss weighting (Hang et al. 2023: 5); 0 = off
    base_width: int = 32
    channel_mults: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 2
    attention_res: tuple[int, ...] = (4,)
    dropout: float = 0.0
    grad_checkpointing: bool = False  # recompute U-Net blocks in the backward: less memory, more compute
    cond_drop: float = 0.1  # probability of training on the null label (for guidance)
    sampler: str = "ddim"  # default sampler for grids and sample.py: ddpm | ddim | dpm++2m
    sampling_steps: int = 50  # DDIM's and DPM-Solver++'s model calls (DDPM runs all T unless sample.py asks)
    eta: float = 0.0
    cfg_scale: float = 2.0  # default guidance scale when sampling with labels

    def validate(self) -> None:
        choices = {"schedule": ("linear", "cosine"), "prediction": ("eps", "v"), "loss": ("l2", "l1"),
                   "sampler": SAMPLERS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                f"got {getattr(self, name)!r}")
        if self.timesteps < 2:
            raise UserError(f"--timesteps must be at least 2, got {self.timesteps}")
        # DDIM strides --sampling-steps of the T timesteps: more than T raised from the sampler at
        # the first sample grid (or in sample.py, which takes this default), after the training.
        # Checked whatever --sampler says, since sample.py --sampler ddim uses it on any run.
        if not 1 <= self.sampling_steps <= self.timesteps:
            raise UserError(f"--sampling-steps must be between 1 and --timesteps ({self.timesteps}), "
                            f"got {self.sampling_steps}")
        # A zero or negative width builds empty convolutions, which fail only at the first step,
        # after the run folder is written.
        if self.base_width < 1:
            raise UserError(f"--base-width must be a positive number, got {self.base_width}")
        if not self.channel_mults:
            raise UserError("--channel-mults must list at least one multiplier, e.g. 1,2")
        if any(m < 1 for m in self.channel_mults):
            raise UserError(f"--channel-mults must be positive numbers, got {','.join(map(str, self.channel_mults))}")
        if self.num_res_blocks < 0:  # a negative count silently built levels without decoder blocks
            raise UserError(f"--num-res-blocks must not be negative, got {self.num_res_blocks}")
        if not 0 <= self.dropout < 1:  # 1 zeroes every residual branch; above 1 nn.Dropout raises
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.eta < 0:  # the sampler raises on it, at the first grid
            raise UserError(f"--eta must be a non-negative number, got {self.eta}")
        if not 0 <= self.cond_drop < 1:
            raise UserError(f"--cond-drop must be in [0, 1), got {self.cond_drop}")
        if not 0 <= self.snr_gamma < float("inf"):  # also refuses nan
            raise UserError(f"--snr-gamma must be a non-negative number (0 = off), got {self.snr_gamma}")
        if self.snr_gamma > 0 and self.loss != "l2":  # |eps error| = sqrt(SNR) |x0 error|: other weights
            raise UserError("--snr-gamma weights squared errors: use it with --loss l2")


OPTION_HELP = {
    "schedule": "noise schedule: linear or cosine",
    "prediction": "what the network predicts: eps or v",
    "channel_mults": "U-Net width multipliers per resolution, e.g. 1,2,2",
    "attention_res": "resolutions with self-attention, e.g. 8",
    "cond_drop": "probability of the null label in training (classifier-free guidance)",
    "cfg_scale": "default classifier-free guidance scale for sampling",
    "grad_checkpointing": "keep only each U-Net block's input for the backward pass and recompute the rest "
                          "(less activation memory for ~one more forward pass of compute; same gradients)",
    "snr_gamma": "min-SNR-gamma loss weighting: the x0 error weighted by min(SNR, gamma) (Hang et al. 2023 "
                 "use 5; 0 = off)",
    "sampler": "ddim (default), ddpm (ancestral) or dpm++2m (DPM-Solver++, good in 10-20 steps)",
    "sampling_steps": "model calls of ddim and dpm++2m (ddpm takes all timesteps in training's grids)",
    "eta": "DDIM's noise: 0 deterministic, 1 ancestral (ddpm and dpm++2m ignore it)",
}

# The digits at their native 8x8 (upsampling them adds pixels, not information) on a 2-core CPU
# in under ten minutes; pass a larger --image-size with wider --channel-mults for real data.

# Options a resume may change (genscale/families/__init__.py; train.check_same_options refuses others).
RESUME_MAY_CHANGE = ("loss", "snr_gamma", "grad_checkpointing", "dropout", "cond_drop", "sampler", "sampling_steps", "eta", "cfg_scale")

PRESET = {"data": "digits", "image_size": 8, "steps": 2000, "batch_size": 64, "lr": 1e-3,
          "warmup_steps": 200, "ema_decay": 0.999, "ckpt_every": 500, "sample_every": 1000}


def check_guidance(cond_drop: float, num_classes: int, cfg_scale: float) -> None:
    """Guidance mixes in the network given the null label; with --cond-drop 0 on labelled data that
    embedding is never trained, so any scale but 1 would sample from noise-like predictions."""
    if num_classes and cond_drop == 0 and cfg_scale != 1:
        raise UserError(f"--cfg-scale {cfg_scale:g} needs an unconditional model, which --cond-drop 0 never "
                        "trains: pass --cfg-scale 1 (no guidance) or train with a --cond-drop above 0.")


class DDPM(Family):
    name = "ddpm"
    ema_names = ("model",)

    def __init__(self, train, options: Options, info: DataInfo):
        super().__init__()
        self.opts = options
        self.num_classes = info.num_classes
        check_guidance(options.cond_drop, info.num_classes, options.cfg_scale)
        self.shape = (info.channels, info.image_size, info.image_size)
        self.schedule = NoiseSchedule(options.schedule, options.timesteps)
        self.nets["model"] = UNet(
            in_channels=info.channels, out_channels=info.channels, base_width=options.base_width,
            channel_mults=options.channel_mults, num_res_blocks=options.num_res_blocks,
            attention_resolutions=options.attention_res, image_size=info.image_size,
            num_classes=info.num_classes, dropout=options.dropout, grad_checkpointing=options.grad_checkpointing)
        self.optimizers["model"] = adam(self.nets["model"].parameters(), train.lr, decoupled=True,
                                        weight_decay=train.weight_decay)

    def _model_fn(self, x, t, labels):
        return self.nets["model"](x, t, labels)

    def training_step(self, batch, optimize) -> dict[str, float]:
        x0 = batch["image"]
        labels = None
        if self.num_classes:
            labels = batch["label"].clamp(min=0)
            drop = torch.rand(labels.shape, device=labels.device) < self.opts.cond_drop
            labels = torch.where(drop | (batch["label"] < 0), torch.full_like(labels, self.num_classes), labels)
        if self.opts.prediction == "eps":
            loss = self._fused_eps_loss(x0, labels)
        else:
            loss = diffusion_loss(self._model_fn, x0, labels, self.schedule, prediction="v", loss=self.opts.loss,
                                  snr_gamma=self.opts.snr_gamma)
        optimize(loss, "model")
        return {"loss": loss.detach()}

    def _fused_eps_loss(self, x0: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Forward noising and the eps loss through the fused kernels: eps is drawn from Philox at
        (seed, 0) inside q_sample and regenerated inside eps_loss, never stored. The seed comes
        from torch's RNG, which the trainer re-seeds every step, so resume stays exact."""
        t = torch.randint(0, self.schedule.timesteps, (x0.shape[0],), device=x0.device)
        seed = int(torch.randint(0, 2**62, ()).item())
        abar = self.schedule.table("alphas_cumprod", x0.device, torch.float64)
        x_t = kernels.q_sample(x0, t, abar, seed=seed)
        weight = min_snr_weights(self.schedule, t, self.opts.snr_gamma, "eps") if self.opts.snr_gamma > 0 else None
        return kernels.eps_loss(self._model_fn(x_t, t, labels), seed, kind=self.opts.loss, weight=weight)

    @torch.no_grad()
    def sample(self, n, labels=None, generator=None, cfg_scale=None, sampler=None, sampling_steps=None,
               eta=None, progress=False, **_):
        return reverse_process(self, (n, *self.shape), labels, generator, cfg_scale, sampler, sampling_steps, eta,
                               progress).clamp(-1, 1)


@torch.no_grad()
def reverse_process(family, shape, labels=None, generator=None, cfg_scale=None, sampler=None, sampling_steps=None,
                    eta=None, progress=False, clip_x0: bool = True) -> torch.Tensor:
    """The sampler a diffusion family's options (or the call's overrides) pick, run with the network
    in eval mode; shared by ddpm (pixels) and ldm (latents, ``clip_x0`` False)."""
    opts, net = family.opts, family.nets["model"]
    scale = opts.cfg_scale if cfg_scale is None else cfg_scale
    if labels is not None:
        check_guidance(opts.cond_drop, family.num_classes, scale)
    was_training = net.training
    net.eval()
    common = dict(labels=labels if family.num_classes else None, num_classes=family.num_classes,
                  cfg_scale=scale, prediction=opts.prediction,
                  generator=generator, device=family.device, progress=progress, clip_x0=clip_x0)
    chosen = sampler or opts.sampler
    if chosen == "ddpm":
        # all T steps, unless the call asks for fewer (the respaced process of improved DDPM)
        x = ddpm_sample(family._model_fn, shape, family.schedule, steps=sampling_steps, **common)
    elif chosen == "dpm++2m":
        x = dpm_solver_sample(family._model_fn, shape, family.schedule,
                              steps=sampling_steps or opts.sampling_steps, **common)
    else:
        x = ddim_sample(family._model_fn, shape, family.schedule, steps=sampling_steps or opts.sampling_steps,
                        eta=opts.eta if eta is None else eta, **common)
    net.train(was_training)
    return x

FAMILY = DDPM
