"""Tiny untrained diffusion runs for the applications' tests (no trained run needed)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from genscale.config import RunConfig, TrainConfig
from genscale.families import family_module
from genscale.families.base import DataInfo

INFO = DataInfo("digits", 1, 8, 10)


def tiny_ddpm(timesteps: int = 20, seed: int = 0):
    """A DDPM family with a small U-Net whose output layer is not zero (so eps_hat varies)."""
    from genscale.families.ddpm import DDPM, Options

    torch.manual_seed(seed)
    opts = Options(timesteps=timesteps, base_width=8, channel_mults=(1,), num_res_blocks=1, attention_res=())
    family = DDPM(TrainConfig(model="ddpm"), opts, INFO)
    torch.nn.init.normal_(family.nets["model"].conv_out.weight, std=0.3)
    family.nets["model"].eval()
    return family


def write_run(folder: Path, family, model: str, options, info: DataInfo = INFO) -> Path:
    """A run folder sample.py can load: config.json and one checkpoint holding the EMA weights."""
    folder.mkdir(parents=True, exist_ok=True)
    record = RunConfig(TrainConfig(model=model, data="digits", image_size=8), options).to_dict()
    record["data_info"] = dataclasses.asdict(info)
    (folder / "config.json").write_text(json.dumps(record))
    ckpt = folder / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    torch.save({name: family.nets[name].state_dict() for name in family.ema_names}, ckpt / "ema.pt")
    (ckpt / "meta.json").write_text(json.dumps({"step": 1}))
    return folder


def tiny_run(folder: Path, model: str = "ddpm", info: DataInfo = INFO, **options) -> Path:
    """A tiny untrained run of ``model``; ``info`` DataInfo("digits", 1, 8, 0) makes it unconditional."""
    module = family_module(model)
    opts = module.Options(**options)
    if model == "ddpm":
        opts = module.Options(**{**dict(timesteps=20, base_width=8, channel_mults=(1,), num_res_blocks=1,
                                        attention_res=()), **options})
    torch.manual_seed(0)
    family = module.FAMILY(TrainConfig(model=model), opts, info)
    return write_run(folder, family, model, opts, info)
