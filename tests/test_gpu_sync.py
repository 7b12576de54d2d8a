"""A training step queues its GPU work without waiting for it (marked gpu; the CPU case checks the
test's own set-up). Any host read of a GPU value (``.item()``, ``float()``, a blocking copy from
ordinary host memory, ``nonzero``) inside a step makes the host wait until the GPU has run
everything queued, and the GPU then idles while the host prepares the next step.
torch.cuda.set_sync_debug_mode("error") turns each such wait into an exception."""
from __future__ import annotations

import pytest
import torch

from genscale.config import TrainConfig
from genscale.families import family_module
from genscale.families.base import DataInfo

SMALL = {
    "ddpm": {"timesteps": 20, "base_width": 8, "channel_mults": (1,), "num_res_blocks": 1, "attention_res": ()},
    "inpaint": {"width": 8},
    "transformer": {"dim": 32, "depth": 2, "heads": 2},
    "vae": {"z_channels": 4, "width": 8},
    "denoiser": {},
    "gan": {"g_hidden": (32,), "d_hidden": (32,)},
    "dcgan": {"g_width": 8, "d_width": 8},
    "cgan": {"g_width": 8, "d_width": 8},
    "pix2pix": {"g_width": 8, "d_width": 8, "patch_layers": 2},
    "gan-inpaint": {"g_width": 8, "d_width": 8},
}
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
               not torch.cuda.is_available(), reason="needs CUDA")])]


def family_on(model: str, device: str):
    module = family_module(model)
    options = module.Options(**SMALL[model])
    torch.manual_seed(0)
    fam = module.FAMILY(TrainConfig(model=model, image_size=16, batch_size=8, lr=1e-3), options,
                        DataInfo("test", 1, 16, 10, paired=model == "pix2pix"))
    for name, net in fam.nets.items():
        net.to(device)
    # Optimizers built on the CPU parameters hold the same tensors: .to() moved them in place.
    return fam


def batch_on(device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(8, 1, 16, 16, generator=g) * 2 - 1, "label": torch.randint(0, 10, (8,), generator=g),
             "source": torch.rand(8, 1, 16, 16, generator=g) * 2 - 1}
    return {k: v.to(device) for k, v in batch.items()}


def optimize_for(fam):
    def optimize(loss: torch.Tensor, name: str) -> None:
        loss.backward()
        fam.optimizers[name].step()
        fam.optimizers[name].zero_grad(set_to_none=True)
    return optimize


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("model", list(SMALL))
def test_a_training_step_never_waits_for_the_gpu(model, device):
    fam = family_on(model, device)
    batch = batch_on(device)
    fam.training_step(dict(batch), optimize_for(fam))  # first step: lazy set-up (kernels, allocator)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        logs = fam.training_step(dict(batch), optimize_for(fam))
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    tensors = {k: v for k, v in logs.items() if torch.is_tensor(v)}
    assert tensors and all(v.dim() == 0 and v.device.type == device for v in tensors.values()), logs
    assert all(torch.isfinite(v) for v in tensors.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_arrive_in_pinned_memory_on_a_gpu_machine():
    """So that the trainer's non_blocking copy is queued instead of waiting for the GPU."""
    from genscale.data import make_loader, resolve_data

    shards = resolve_data("digits", "train", None)
    loader = make_loader(shards, image_size=8, channels=1, batch_size=4, batches_per_epoch=1, seed=0, epoch=0,
                         rank=0, world_size=1, num_workers=0, resampled=True)
    batch = next(iter(loader))
    assert batch["image"].is_pinned()
