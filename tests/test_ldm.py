"""Latent diffusion: the autoencoder run it loads, the latent scale factor, training and sampling."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from genscale import checkpoints as ckpt
from genscale.config import RunConfig, TrainConfig
from genscale.errors import UserError
from genscale.families.base import DataInfo
from genscale.families.ldm import LDM, Options
from genscale.families.vae import VAE
from genscale.families.vae import Options as VAEOptions
from genscale.metrics.reference import load_split
from genscale.models.autoencoder import diffusion_latent_shape
from tests.conftest import plain_optimize

INFO = DataInfo("digits", 1, 8, 10)
SMALL = {"base_width": 16, "timesteps": 50, "sampling_steps": 5, "scale_samples": 300}


def write_vae_run(folder: Path, model: str = "vae", **vae_options) -> VAE:
    """A vae run folder as train.py leaves it: config.json and a checkpoint with ema.pt."""
    torch.manual_seed(0)
    options = VAEOptions(**{"z_channels": 8, "width": 8, **vae_options})
    fam = VAE(TrainConfig(model="vae"), options, INFO)
    with torch.no_grad():  # move the weights off their init so a wrong load would show
        for p in fam.nets["vae"].parameters():
            p.add_(0.01 * torch.randn_like(p))
    record = {"train": {"model": model, "data": "digits"}, "options": dataclasses.asdict(options),
              "data_info": dataclasses.asdict(INFO)}
    path = ckpt.final_name(ckpt.checkpoint_root(folder), 5)
    path.mkdir(parents=True)
    ckpt.save_ema_weights(path, {"vae": fam.nets["vae"].state_dict()})
    ckpt.write_meta(path, 5)
    (folder / "config.json").write_text(json.dumps(record))
    return fam


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def build(folder: Path, cache: Path, **overrides) -> LDM:
    torch.manual_seed(0)
    options = Options(**{**SMALL, "autoencoder": str(folder), **overrides})
    return LDM(TrainConfig(model="ldm", data="digits", cache_dir=str(cache), lr=1e-3), options, INFO)


def test_latent_folding():
    assert diffusion_latent_shape((4, 2, 2)) == (4, 2, 2)
    assert diffusion_latent_shape((16, 1, 1)) == (4, 2, 2)
    with pytest.raises(ValueError):
        diffusion_latent_shape((6, 1, 1))


@pytest.mark.parametrize("downsample", [8, 4])
def test_scale_factor_gives_unit_variance_latents_and_is_checkpointed(tmp_path, cache, downsample):
    vae = write_vae_run(tmp_path / "vae", downsample=downsample)
    fam = build(tmp_path / "vae", cache)
    model = fam.model
    # the autoencoder holds the vae run's weights, frozen
    for (name, a), b in zip(vae.nets["vae"].state_dict().items(), model.autoencoder.state_dict().values()):
        assert torch.equal(a, b), name
    assert not any(p.requires_grad for p in model.autoencoder.parameters())
    # independent recomputation: the first 300 training digits in key order, noise from seed 0
    _, images, _ = load_split("digits", "train", 8, 1, str(cache), limit=300)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        mean, logvar = vae.nets["vae"].encode(x)
        noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(0))
        z = (mean + (0.5 * logvar).exp() * noise).double()
    assert float(model.latent_scale) == pytest.approx(1 / float(z.std()), rel=1e-5)
    scaled = model.encode(x, noise)
    assert scaled.shape == (300, *model.shape) == (300, *diffusion_latent_shape(vae.vae.latent_shape))
    assert float(scaled.double().std()) == pytest.approx(1.0, abs=1e-4)
    assert "latent_scale" in model.state_dict()  # a buffer: saved, EMA-copied and restored


def test_decode_inverts_the_scaling_and_folding(tmp_path, cache):
    vae = write_vae_run(tmp_path / "vae")
    model = build(tmp_path / "vae", cache).model
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        mean, _ = vae.nets["vae"].encode(x)
        want = vae.nets["vae"].decode(mean)[0].clamp(-1, 1)
    zero_noise = torch.zeros_like(mean)
    torch.testing.assert_close(model.decode(model.encode(x, zero_noise)), want, rtol=1e-5, atol=1e-5)


def test_training_moves_the_unet_only(tmp_path, cache):
    write_vae_run(tmp_path / "vae")
    fam = build(tmp_path / "vae", cache)
    model = fam.model
    frozen = {k: v.clone() for k, v in model.autoencoder.state_dict().items()}
    unet_before = [p.detach().clone() for p in model.unet.parameters()]
    opt_params = {id(p) for g in fam.optimizers["model"].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in model.unet.parameters()}
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(8, 1, 8, 8, generator=g) * 2 - 1, "label": torch.randint(0, 10, (8,), generator=g)}
    losses = []
    for _ in range(3):
        fam.training_step(batch, plain_optimize(fam, losses))
    assert all(np.isfinite(losses))
    assert all(torch.equal(v, model.autoencoder.state_dict()[k]) for k, v in frozen.items())
    assert any(not torch.equal(a, b) for a, b in zip(unet_before, model.unet.parameters()))


def test_samples_decode_and_a_recorded_run_needs_no_autoencoder_folder(tmp_path, cache):
    write_vae_run(tmp_path / "vae")
    fam = build(tmp_path / "vae", cache)
    assert json.loads(fam.opts.autoencoder_config)["model"] == "vae"
    with torch.no_grad():
        fam.model.latent_scale.fill_(0.37)  # something the rebuilt family cannot have measured
    labels = torch.tensor([0, 1, 2, 3])
    a = fam.sample(4, labels=labels, generator=torch.Generator().manual_seed(0))
    assert a.shape == (4, 1, 8, 8) and a.abs().max() <= 1
    assert torch.equal(a, fam.sample(4, labels=labels, generator=torch.Generator().manual_seed(0)))
    # what sample.py does: options from config.json, weights from ema.pt, with the vae run gone
    record = {"train": dataclasses.asdict(TrainConfig(model="ldm", data="digits", cache_dir=str(cache))),
              "options": dataclasses.asdict(fam.opts)}
    state = {k: v.clone() for k, v in fam.nets["model"].state_dict().items()}
    shutil.rmtree(tmp_path / "vae")
    run = RunConfig.from_dict(json.loads(json.dumps(record)))
    again = LDM(run.train, run.options, INFO)
    again.nets["model"].load_state_dict(state)
    assert float(again.model.latent_scale) == pytest.approx(0.37)
    assert torch.equal(again.sample(4, labels=labels, generator=torch.Generator().manual_seed(0)), a)


def test_latents_are_not_clipped_to_one(tmp_path, cache):
    write_vae_run(tmp_path / "vae")
    fam = build(tmp_path / "vae", cache)
    z = fam.sample_latents(16, labels=torch.arange(16) % 10, generator=torch.Generator().manual_seed(0))
    assert z.abs().max() > 1  # an untrained U-Net's x0 estimates spread far past 1


def test_clear_errors(tmp_path, cache):
    Options().validate()  # no --autoencoder: train.py trains one first (tests/test_ldm_end_to_end.py)
    with pytest.raises(UserError, match="pass --autoencoder RUN"):
        LDM(TrainConfig(model="ldm", cache_dir=str(cache)), Options(**SMALL), INFO)
    with pytest.raises(UserError, match="--autoencoder-steps"):
        Options(autoencoder_steps=-1).validate()
    with pytest.raises(UserError, match="not a genscale run"):
        build(tmp_path / "nothing", cache)
    write_vae_run(tmp_path / "gan", model="dcgan")
    with pytest.raises(UserError, match="must be a vae run"):
        build(tmp_path / "gan", cache)
    write_vae_run(tmp_path / "vae")
    with pytest.raises(UserError, match="image-size"):
        LDM(TrainConfig(model="ldm", cache_dir=str(cache)), Options(**SMALL, autoencoder=str(tmp_path / "vae")),
            DataInfo("digits", 1, 16, 10))


def test_snr_gamma_and_grad_checkpointing_reach_the_latent_unet(tmp_path, cache):
    """--snr-gamma changes the loss of the same draws; --grad-checkpointing is set on the U-Net."""
    write_vae_run(tmp_path / "vae")
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(8, 1, 8, 8, generator=g) * 2 - 1, "label": torch.randint(0, 10, (8,), generator=g)}

    def first_loss(**overrides) -> tuple[float, LDM]:
        fam = build(tmp_path / "vae", cache, **overrides)
        torch.nn.init.normal_(fam.model.unet.conv_out.weight, std=0.05)
        torch.manual_seed(3)
        return float(fam.training_step(batch, lambda loss, name: None)["loss"]), fam

    plain, fam = first_loss()
    weighted, _ = first_loss(snr_gamma=5.0)
    assert abs(weighted - plain) > 1e-3 * plain
    assert not fam.model.unet.grad_checkpointing
    assert first_loss(grad_checkpointing=True)[1].model.unet.grad_checkpointing
