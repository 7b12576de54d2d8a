"""Gaussian diffusion: noise schedules, the training loss, samplers and classifier-free guidance."""
from genscale.diffusion.guidance import ModelFn, cfg_combine, drop_labels, guided_prediction, null_labels
from genscale.diffusion.losses import diffusion_loss
from genscale.diffusion.samplers import (ddim_sample, ddim_step, ddpm_sample, ddpm_step, eps_from_prediction,
                                         randn, strided_timesteps)
from genscale.diffusion.schedule import NoiseSchedule

__all__ = [
    "ModelFn", "NoiseSchedule", "cfg_combine", "ddim_sample", "ddim_step", "ddpm_sample", "ddpm_step",
    "diffusion_loss", "drop_labels", "eps_from_prediction", "guided_prediction", "null_labels", "randn",
    "strided_timesteps",
]
