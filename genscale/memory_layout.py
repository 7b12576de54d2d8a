"""The memory layout training runs in: channels_last (NHWC) networks and image batches, or NCHW.

cuDNN's bf16 tensor-core convolutions run NHWC natively (NCHW tensors may be transposed around
them) and the fused GroupNorm+SiLU and noising kernels (kernels/) read channels_last without a
copy, so ``--channels-last`` may well be the faster layout on CUDA; it is off unless asked for
until benchmarks/test_bench_unet.py's "-nchw" variants have measured the U-Net step in both
layouts on a GPU (CPU convolutions take either layout; the tests force it on a CPU).

The layout is not part of the model: a checkpoint holds values, not strides, and any run may
resume any checkpoint. Loading copies values into the tensors of the run that loads them, and
the one thing that keeps the saved strides, the optimizer's state, is put back into its
parameters' layout here, because the fused Adam step pairs the elements of a parameter and its
moments in memory order: with mixed layouts it silently updates the wrong elements (seen on the
CPU: errors the size of the learning rate).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from genscale.config import TrainConfig
    from genscale.families.base import Family


def resolve(requested: bool | None, device: torch.device) -> bool:
    """``--channels-last`` as given; when not given (None), off for now. The layout's gain on CUDA
    is not measured yet, and the fused GroupNorm measured slower on channels_last than on NCHW at
    C = 128 (benchmarks/results/2026-11-22-h100): the U-Net benchmark's "-nchw" variants decide
    whether None should mean ``device.type == "cuda"``."""
    return False if requested is None else bool(requested)


def _has_image_weights(nets: dict[str, nn.Module]) -> bool:
    return any(p.dim() == 4 for net in nets.values() for p in net.parameters())


def match_state_to_params(optimizer: torch.optim.Optimizer) -> None:
    """Give every tensor of the optimizer's state that has its parameter's shape the parameter's
    strides (a checkpoint saved in the other layout brings its own)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def setup(cfg: "TrainConfig", family: "Family", device: torch.device) -> torch.memory_format | None:
    """Put ``family``'s networks in the run's layout; call it before ``accelerator.prepare`` (DDP lays
    its gradient buckets out for the strides it finds) and before the EMA copies are made.

    ``cfg.channels_last`` (a TrainConfig) is resolved in place, so that config.json records the
    layout the run used. Returns the memory format for the batches' image tensors: channels_last
    when it is on and some network has 4-D weights (``Module.to(memory_format=...)`` changes only
    4-D tensors: an MLP or a transformer without convolutions stays as it is, and so do its
    batches), else None."""
    cfg.channels_last = resolve(cfg.channels_last, device)
    for optimizer in family.optimizers.values():  # in either layout: a checkpoint may come from the other
        optimizer.register_load_state_dict_post_hook(match_state_to_params)
    if not (cfg.channels_last and _has_image_weights(family.nets)):
        return None
    for net in family.nets.values():
        # in place: the parameters stay the objects the family's optimizers hold
        net.to(memory_format=torch.channels_last)
    return torch.channels_last


def batch_to(batch: dict, device: torch.device, memory_format: torch.memory_format | None) -> dict:
    """A batch's tensors on ``device``; its 4-D floating-point ones (images) in ``memory_format``.

    Random draws shaped like a channels_last tensor (``randn_like``, dropout) fill it in memory
    order: a family that draws so (the denoiser's noise, dropout in the networks) trains on other,
    equally random draws than an NCHW run with the same seed. DDPM's noise is drawn in NCHW."""
    def move(v):
        if not torch.is_tensor(v):
            return v
        if memory_format is not None and v.dim() == 4 and v.is_floating_point():
            return v.to(device, memory_format=memory_format, non_blocking=True)
        return v.to(device, non_blocking=True)

    return {k: move(v) for k, v in batch.items()}
