"""The GAN families through the family contract: alternation, accumulation, conditioning, sampling."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from genscale.config import TrainConfig, parse_train_args
from genscale.errors import UserError
from genscale.families import family_module
from genscale.families.base import DataInfo
from genscale.families.gan_monitor import GanMonitor
from tests.conftest import plain_optimize

SMALL = {
    "gan": {"g_hidden": (32,), "d_hidden": (32,)},
    "dcgan": {"g_width": 8, "d_width": 8},
    "cgan": {"g_width": 8, "d_width": 8},
    "cgan-binary": {"g_width": 8, "d_width": 8, "discriminator": "binary"},
    "pix2pix": {"g_width": 8, "d_width": 8, "patch_layers": 2},
    "pix2pix-residual": {"g_width": 8, "d_width": 8, "patch_layers": 2, "residual": True},
    "gan-inpaint": {"g_width": 8, "d_width": 8},
}
CASES = list(SMALL)


def build(case: str, size: int = 16, channels: int = 1, classes: int = 10, **overrides):
    model = case.replace("-binary", "").replace("-residual", "")
    module = family_module(model)
    options = module.Options(**{**SMALL[case], **overrides})
    cfg = TrainConfig(model=model, image_size=size, batch_size=8, lr=1e-3)
    torch.manual_seed(0)
    return module.FAMILY(cfg, options, DataInfo("test", channels, size, classes, paired=model == "pix2pix"))


def make_batch(n: int = 8, size: int = 16, channels: int = 1, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, channels, size, size, generator=g) * 2 - 1,
            "label": torch.randint(0, 10, (n,), generator=g),
            "source": torch.rand(n, 1, size, size, generator=g) * 2 - 1}


def params(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("case", CASES)
def test_d_step_leaves_g_untouched_and_g_step_leaves_d_untouched(case):
    fam = build(case)
    seen = []

    def optimize(loss, name):
        other = "generator" if name == "discriminator" else "discriminator"
        before = {n: params(fam.nets[n]) for n in fam.nets}
        loss.backward()
        if name == "discriminator":  # the fakes were detached: no gradient reaches G at all
            assert all(p.grad is None for p in fam.nets["generator"].parameters())
        fam.optimizers[name].step()
        fam.optimizers[name].zero_grad(set_to_none=True)
        assert same(before[other], params(fam.nets[other])), f"the {name} step changed the {other}"
        assert not same(before[name], params(fam.nets[name])), f"the {name} step changed nothing"
        seen.append(name)

    logs = fam.training_step(make_batch(), optimize)
    assert seen == ["discriminator", "generator"]  # D first, then G, once each
    for key in ("d_loss", "g_loss", "d_real", "d_fake", "diversity"):  # 0-dim tensors: read later, no sync
        assert torch.is_tensor(logs[key]) and logs[key].dim() == 0 and torch.isfinite(logs[key])
        assert not logs[key].requires_grad  # a graph kept alive until the log step would pin its memory
    assert 0 <= logs["d_real"] <= 1 and 0 <= logs["d_fake"] <= 1


def accumulate_two(fam, generator_step=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two micro-batches, stepping only on the second; returns (D's grads at its step, reference)."""
    if generator_step is not None:
        fam.generator_step = generator_step
    d_params = list(fam.nets["discriminator"].parameters())
    reference = [torch.zeros_like(p) for p in d_params]
    at_step: list[torch.Tensor] = []
    micro = {"i": 0}

    def optimize(loss, name):
        if name == "discriminator":  # D's loss alone, by autograd, as the reference
            grads = torch.autograd.grad(loss, d_params, retain_graph=True, allow_unused=True)
            for r, g in zip(reference, grads):
                r += 0 if g is None else g
        loss.backward()
        if micro["i"] == 1:  # the last micro-batch: step and zero
            if name == "discriminator":
                at_step.extend(p.grad.clone() for p in d_params)
            fam.optimizers[name].step()
            fam.optimizers[name].zero_grad(set_to_none=True)

    for i in range(2):
        micro["i"] = i
        fam.training_step(make_batch(seed=i), optimize)
    return at_step, reference


@pytest.mark.parametrize("case", ["dcgan", "cgan", "pix2pix", "gan-inpaint"])
def test_under_accumulation_d_steps_on_its_own_gradients_only(case):
    at_step, reference = accumulate_two(build(case))
    for g, r in zip(at_step, reference):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_the_accumulation_check_catches_a_leaking_generator_step():
    fam = build("dcgan")
    at_step, reference = accumulate_two(fam, generator_step=lambda loss, opt: opt(loss, "generator"))
    assert any(not torch.allclose(g, r, rtol=1e-5, atol=1e-7) for g, r in zip(at_step, reference))


@pytest.mark.parametrize("case", ["cgan", "cgan-binary"])
def test_label_conditioning_changes_the_sample_and_z_is_fixed_per_seed(case):
    fam = build(case)
    fam.training_step(make_batch(), plain_optimize(fam))  # BatchNorm statistics that are not the init's
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    a = fam.sample(4, labels=torch.tensor([3, 3, 5, 5]), generator=gen())
    b = fam.sample(4, labels=torch.tensor([3, 3, 3, 3]), generator=gen())
    assert torch.equal(a, fam.sample(4, labels=torch.tensor([3, 3, 5, 5]), generator=gen()))
    assert torch.equal(a[:2], b[:2])  # same z, same label: same image, whatever the batch holds
    assert (a[2:] - b[2:]).abs().amax((1, 2, 3)).min() > 1e-3  # same z, other label: other image
    assert a.shape == (4, 1, 16, 16) and a.abs().max() <= 1
    default = fam.sample(20, generator=gen())  # no labels: cycles through the classes
    assert torch.equal(default[:4], fam.sample(4, labels=torch.arange(4), generator=gen()))
    with pytest.raises(UserError):
        fam.sample(2, labels=torch.tensor([0, 10]))


@pytest.mark.parametrize("case", ["gan", "dcgan"])
def test_unconditional_sampling_is_seeded_and_ignores_labels(case):
    fam = build(case)
    assert not fam.conditional
    a = fam.sample(6, generator=torch.Generator().manual_seed(1))
    b = fam.sample(6, labels=torch.arange(6), generator=torch.Generator().manual_seed(1))
    c = fam.sample(6, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert fam.nets["generator"].training  # sampling restored the training mode


def test_sampling_options_a_gan_does_not_take_are_refused():
    fam = build("dcgan")
    fam.sample(2, progress=True, cfg_scale=None)
    with pytest.raises(UserError):
        fam.sample(2, cfg_scale=3.0)


def reference(n: int = 10, channels: int = 1, seed: int = 7) -> dict:
    """Stands in for the held-out images a family would read from its data."""
    b = make_batch(n, channels=channels, seed=seed)
    return {"image": b["image"], "source": b["source"].expand(-1, channels, -1, -1).clone()}


def test_inpainting_keeps_known_pixels_exactly():
    fam = build("gan-inpaint")
    fam.training_step(make_batch(), plain_optimize(fam))
    x = make_batch(seed=3)["image"]
    from genscale.data.masks import random_masks

    mask = random_masks("mixed", 8, 16, generator=torch.Generator().manual_seed(0))
    out = fam.inpaint(x, mask)
    known = mask.expand_as(x) > 0.5
    assert torch.equal(out[known], x[known])
    assert not torch.equal(out[~known], x[~known])
    fam._reference = reference()
    a = fam.sample(8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, fam.sample(8, generator=torch.Generator().manual_seed(4)))
    assert not torch.equal(a, fam.sample(8, generator=torch.Generator().manual_seed(5)))
    images, per_row = fam.grid(torch.Generator().manual_seed(0))
    assert per_row == 3 and images.shape == (24, 1, 16, 16)
    torch.testing.assert_close(images[2::3], fam._reference["image"][:8])  # originals, third in a row


def test_pix2pix_translates_and_grids_input_output_target():
    fam = build("pix2pix", channels=3)
    batch = make_batch(channels=3)
    fam.training_step(batch, plain_optimize(fam))  # a 1-channel source feeds a 3-channel model
    out = fam.sample(3, source=batch["source"][:3])
    assert out.shape == (3, 3, 16, 16)
    fam._reference = reference(channels=3)
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    drawn = fam.sample(4, generator=gen())  # held-out sources picked by the seed
    chosen = torch.randperm(10, generator=gen())[:4]
    torch.testing.assert_close(drawn, fam.translate(fam._reference["source"][chosen]))
    images, per_row = fam.grid()
    assert per_row == 3 and images.shape == (24, 3, 16, 16)
    torch.testing.assert_close(images[0], fam._reference["source"][0])  # input | output | target
    torch.testing.assert_close(images[2], fam._reference["image"][0])


def test_reference_images_come_from_the_run_data_test_split_or_else_train(tmp_path):
    import numpy as np

    from genscale.data.writer import encode_png, write_split
    from genscale.families.gan_reference import load_reference

    rng = np.random.default_rng(0)
    pairs = [{"__key__": f"k{i}", "src.png": encode_png(rng.integers(0, 256, (8, 8), dtype=np.uint8)),
              "tgt.png": encode_png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))} for i in range(6)]
    write_split(pairs, str(tmp_path / "pairs"))  # shards only, no train/test folders
    cfg = TrainConfig(model="pix2pix", data=str(tmp_path / "pairs"), image_size=8)
    ref = load_reference(cfg, DataInfo("pairs", 3, 8, 0, paired=True))
    assert ref["image"].shape == (6, 3, 8, 8) and ref["source"].shape == (6, 3, 8, 8)
    # a grey source arrives as three equal channels; values are the PNGs' in [-1, 1]
    assert torch.equal(ref["source"][:, 0], ref["source"][:, 1])
    assert ref["image"].min() >= -1 and ref["image"].max() <= 1
    with pytest.raises(UserError, match="cannot be read"):
        load_reference(TrainConfig(data=str(tmp_path / "missing")), DataInfo("x", 1, 8, 0))


def test_pix2pix_residual_starts_from_the_identity():
    fam = build("pix2pix-residual", channels=3)
    last = fam.nets["generator"].ups[0][1]  # the outermost transposed convolution
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.zeros_(last.bias)
    source = make_batch()["source"]
    torch.testing.assert_close(fam.translate(source), source.expand(-1, 3, -1, -1))
    # ... and any target in [-1, 1] stays reachable: a change of 2 takes -1 to 1
    torch.nn.init.constant_(last.bias, 10.0)
    assert torch.equal(fam.translate(-torch.ones(1, 3, 16, 16)), torch.ones(1, 3, 16, 16))


def recording_optimize(fam, record):
    def optimize(loss, name):
        record[name] = loss.item()
        plain_optimize(fam)(loss, name)
    return optimize


def test_pix2pix_losses_are_half_bce_for_d_and_gan_plus_100_l1_for_g():
    fam = build("pix2pix", channels=3, dropout=0.0)
    for opt in fam.optimizers.values():  # lr 0: the networks stay as they are, to recompute the losses
        for group in opt.param_groups:
            group["lr"] = 0.0
    batch = make_batch(channels=3)
    record = {}
    fam.training_step(batch, recording_optimize(fam, record))
    a, b = batch["source"].expand(-1, 3, -1, -1), batch["image"]
    g, d = fam.nets["generator"], fam.nets["discriminator"]
    with torch.no_grad():
        fake = g(a)
        real_l, fake_l = d(torch.cat([a, b], 1)), d(torch.cat([a, fake], 1))
        bce = F.binary_cross_entropy_with_logits
        d_ref = 0.5 * (bce(real_l, torch.ones_like(real_l)) + bce(fake_l, torch.zeros_like(fake_l)))
        g_ref = bce(fake_l, torch.ones_like(fake_l)) + 100.0 * F.l1_loss(fake, b)
    assert record["discriminator"] == pytest.approx(d_ref.item(), rel=1e-4)
    assert record["generator"] == pytest.approx(g_ref.item(), rel=1e-4)


def test_inpaint_generator_loss_is_hole_mse_minus_lambda_log_d():
    fam = build("gan-inpaint", adv_weight=0.5, mask="box")
    for opt in fam.optimizers.values():
        for group in opt.param_groups:
            group["lr"] = 0.0
    x = make_batch()["image"]
    record = {}
    torch.manual_seed(9)
    fam.training_step({"image": x}, recording_optimize(fam, record))
    from genscale.data.masks import random_masks

    torch.manual_seed(9)  # the same global draws give the same masks
    mask = random_masks("box", 8, (16, 16))
    with torch.no_grad():
        pred = fam.nets["generator"](torch.cat([x * mask, mask], 1))
        filled = mask * x + (1 - mask) * pred
        hole = (1 - mask).bool().expand_as(x)
        mse = ((pred - x)[hole] ** 2).mean()
        d_out = torch.sigmoid(fam.nets["discriminator"](filled)).double()
        g_ref = mse.double() - 0.5 * torch.log(d_out).mean()
    assert record["generator"] == pytest.approx(g_ref.item(), rel=1e-4)


def test_training_step_reports_a_warning_when_the_monitor_fires():
    fam = build("dcgan")
    fam.monitor = GanMonitor(warmup=0, patience=1, collapse_threshold=10.0)  # everything is "collapsed"
    logs = fam.training_step(make_batch(), plain_optimize(fam))
    assert "warning" not in logs  # the monitor runs when the trainer reads the values, not per step
    rows = [{k: float(logs[k]) for k in ("d_real", "d_fake", "diversity")}]
    assert "collapsed" in fam.observe_logs(rows)


def test_configuration_errors_are_one_sentence():
    with pytest.raises(UserError, match="labelled"):
        build("cgan", classes=0)
    with pytest.raises(UserError, match="paired"):
        family_module("pix2pix").FAMILY(TrainConfig(), family_module("pix2pix").Options(),
                                        DataInfo("digits", 1, 16, 10, paired=False))
    with pytest.raises(UserError, match="too deep"):
        build("pix2pix", patch_layers=3)  # 16 px cannot take the 70x70 PatchGAN
    run = parse_train_args(["--model", "cgan", "--discriminator", "binary", "--out", "x"])
    assert run.options.discriminator == "binary" and run.train.lr == 2e-4
    with pytest.raises(UserError):
        parse_train_args(["--model", "cgan", "--discriminator", "wrong", "--out", "x"])
    with pytest.raises(UserError):
        parse_train_args(["--model", "gan-inpaint", "--mask", "circle", "--out", "x"])


@pytest.mark.parametrize("model", ["gan", "dcgan", "cgan", "pix2pix", "gan-inpaint"])
def test_adam_settings_and_presets(model):
    module = family_module(model)
    run = parse_train_args(["--model", model, "--out", "x"])
    assert run.train.lr == module.PRESET["lr"] and run.train.data == module.PRESET["data"]
    if model in ("gan", "dcgan", "cgan", "gan-inpaint"):
        assert run.train.lr == 2e-4  # the DCGAN setting; pix2pix's batches of 16 take 5e-4
    case = model
    fam = build(case, channels=3 if model == "pix2pix" else 1)
    for opt in fam.optimizers.values():
        assert opt.param_groups[0]["betas"] == (0.5, 0.999)
    assert set(fam.optimizers) == {"generator", "discriminator"} and fam.ema_names == ("generator",)
