"""The single-step denoiser family: its loss, its output and the sigma sweep's files."""
from __future__ import annotations

import math

import numpy as np
import torch

from genscale.applications.denoiser_sweep import sigma_sweep
from genscale.config import TrainConfig
from genscale.families.base import DataInfo
from genscale.families.denoiser import Denoiser, Options


def family(sigma=0.5):
    torch.manual_seed(0)
    return Denoiser(TrainConfig(model="denoiser"), Options(sigma=sigma, width=8), DataInfo("digits", 1, 8, 10))


def test_loss_is_mse_to_the_clean_image_at_the_training_sigma():
    f = family(0.3)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    seen = {}
    torch.manual_seed(7)
    f.training_step({"image": x}, lambda loss, name: seen.update(loss=loss.detach(), name=name))
    torch.manual_seed(7)
    ref = (f.nets["unet"](x + 0.3 * torch.randn_like(x)).double() - x.double()).square().mean()
    assert seen["name"] == "unet" and math.isclose(float(seen["loss"]), float(ref), rel_tol=1e-5)


def test_training_reduces_the_denoising_error():
    f = family()
    opt = f.optimizers["unet"]

    def optimize(loss, name):
        loss.backward()
        opt.step()
        opt.zero_grad()

    x = torch.rand(16, 1, 8, 8) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    before = float((f.noisy_pair(x, 0.5, gen)[1] - x).square().mean())
    for _ in range(60):
        f.training_step({"image": x}, optimize)
    after = float((f.noisy_pair(x, 0.5, torch.Generator().manual_seed(0))[1] - x).square().mean())
    assert after < 0.5 * before


def test_sigma_sweep_writes_grid_plot_and_arrays(tmp_path):
    f = family()
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    written = sigma_sweep(f, x, [0.0, 0.5, 1.0], str(tmp_path / "sweep"), torch.Generator().manual_seed(0))
    assert {p.name for p in written} == {"sweep.png", "sweep.npz", "sweep-psnr.png"}
    data = np.load(tmp_path / "sweep.npz")
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (15, 8, 8, 1)
    assert math.isinf(data["psnr_noisy"][0]) and data["psnr_noisy"][1] > data["psnr_noisy"][2]
    assert data["sigmas"].tolist() == [0.0, 0.5, 1.0]
