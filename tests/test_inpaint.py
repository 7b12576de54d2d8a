"""U-Net inpainting and the shared inpainting interface (genscale.inpainting)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from genscale.config import TrainConfig
from genscale.data.masks import random_masks
from genscale.errors import UserError
from genscale.families.base import DataInfo
from genscale.families.inpaint import Inpaint, Options, masked_mse
from genscale.inpainting import (call_inpaint, centre_box_masks, composite, load_inpainting_inputs,
                                 run_inpainting)
from genscale.models.inpaint_unet import InpaintUNet
from tests.conftest import plain_optimize


def build(size: int = 8, channels: int = 1, **overrides) -> Inpaint:
    torch.manual_seed(0)
    options = Options(**{"width": 8, **overrides})
    return Inpaint(TrainConfig(model="inpaint", lr=2e-3), options, DataInfo("test", channels, size, 10))


def images(n: int = 8, size: int = 8, channels: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("size, depth, channels", [(8, 2, 1), (16, 3, 3), (8, 3, 2)])
def test_unet_keeps_the_image_shape(size, depth, channels):
    net = InpaintUNet(channels + 1, channels, size, width=8, depth=depth)
    assert net(torch.zeros(2, channels + 1, size, size)).shape == (2, channels, size, size)


def test_unet_refuses_sizes_that_do_not_halve():
    with pytest.raises(ValueError):
        InpaintUNet(2, 1, 12, depth=3)
    with pytest.raises(UserError):
        build(size=8, depth=4)


def test_masked_mse_counts_only_the_region():
    pred, target = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    target[0, :, 0, 0] = 5.0  # a known pixel far off: must not count
    region = torch.zeros(2, 1, 4, 4)
    region[0, 0, 1, 1] = 1
    region[1, 0, 2, :] = 1
    assert float(masked_mse(pred, target, region)) == pytest.approx(1.0)


def test_loss_is_hole_mse_plus_weighted_known_mse():
    fam = build(known_weight=0.3)
    x = images()
    torch.manual_seed(5)
    mask = random_masks("mixed", 8, (8, 8))
    pred = fam.predict(x, mask).detach()
    want = float(masked_mse(pred, x, 1 - mask) + 0.3 * masked_mse(pred, x, mask))
    losses = []
    torch.manual_seed(5)  # the family draws the same masks from the global RNG
    logs = fam.training_step({"image": x}, plain_optimize(fam, losses))
    assert losses[0] == pytest.approx(want, rel=1e-5) and float(logs["loss"]) == pytest.approx(want, rel=1e-5)


def test_the_network_never_sees_hole_content_and_known_pixels_survive():
    fam = build()
    fam.training_step({"image": images()}, plain_optimize(fam))
    x = images(seed=3)
    mask = random_masks("mixed", 8, 8, generator=torch.Generator().manual_seed(0))
    out = fam.inpaint(x, mask)
    known = mask.expand_as(x) > 0.5
    assert torch.equal(out[known], x[known])
    assert not torch.equal(out[~known], x[~known])
    scribbled = torch.where(known, x, torch.rand_like(x))  # other content in the holes
    assert torch.equal(fam.inpaint(scribbled, mask), out)


def test_training_learns_to_fill_holes():
    """A fixed image set: the hole MSE falls far below that of filling with the mean."""
    fam = build(width=16)
    x = torch.zeros(16, 1, 8, 8) - 1
    x[:, :, :, 3:5] = 1  # vertical bars
    losses = []
    for _ in range(150):
        fam.training_step({"image": x}, plain_optimize(fam, losses))
    assert np.mean(losses[-10:]) < 0.1 * np.mean(losses[:3])


def test_inpaint_checks_mask_shapes():
    fam = build()
    with pytest.raises(UserError):
        fam.inpaint(images(), torch.ones(8, 8, 8))
    with pytest.raises(UserError):
        fam.inpaint(images(), torch.ones(4, 1, 8, 8))


def test_sample_and_grid_show_masked_input_filled_original():
    fam = build()
    # No training images kept yet and none given (a run loaded from disk): held-out images of the
    # run's data (the digits' test split) are filled, picked by the generator like the masks.
    from genscale.families.gan_reference import load_reference, pick

    before = fam.sample(4, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    held_out = pick(load_reference(fam.train_cfg, fam.info), 4, gen)["image"]
    known = random_masks(fam.opts.mask, 4, (8, 8), generator=gen).expand_as(before) > 0.5
    assert before.shape == (4, 1, 8, 8) and torch.equal(before[known], held_out[known])
    x = images()
    fam.training_step({"image": x}, plain_optimize(fam))
    a = fam.sample(10, generator=torch.Generator().manual_seed(1))
    assert a.shape == (10, 1, 8, 8) and torch.equal(a, fam.sample(10, generator=torch.Generator().manual_seed(1)))
    grid, per_row = fam.grid(torch.Generator().manual_seed(0))
    assert per_row == 3 and grid.shape == (24, 1, 8, 8)
    assert torch.equal(grid[2], x[0])


def test_centre_box_masks():
    m = centre_box_masks(3, 8)
    assert m.shape == (3, 1, 8, 8) and int((m == 0).sum()) == 3 * 16
    assert torch.equal(m[0, 0, 2:6, 2:6], torch.zeros(4, 4)) and int(m[0, 0].sum()) == 48
    odd = centre_box_masks(1, (9, 7), frac=0.4)
    holes = (odd[0, 0] == 0).nonzero()
    assert holes[:, 0].tolist() == sorted(holes[:, 0].tolist()) and int((odd == 0).sum()) == 4 * 3
    assert holes[:, 0].min() == 2 and holes[:, 1].min() == 2  # (9-4)//2, (7-3)//2


def test_composite_is_exact_on_known_pixels():
    x = images()
    mask = random_masks("pixel", 8, 8, generator=torch.Generator().manual_seed(2))
    out = composite(x, torch.full_like(x, 0.123), mask)
    assert torch.equal(out[mask.expand_as(x) > 0.5], x[mask.expand_as(x) > 0.5])
    assert (out[mask.expand_as(x) < 0.5] == 0.123).all()


def test_run_inpainting_copies_known_bytes(tmp_path):
    fam = build(channels=3)
    fam.training_step({"image": images(channels=3)}, plain_optimize(fam))
    rng = np.random.default_rng(0)
    uint8 = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    masks = (rng.random((5, 8, 8)) > 0.5).astype(np.uint8)
    np.savez(tmp_path / "x.npz", uint8)
    np.savez(tmp_path / "m.npz", masks)
    x, m = load_inpainting_inputs(str(tmp_path / "x.npz"), str(tmp_path / "m.npz"))
    out = run_inpainting(fam, x, m, 8, 3, batch_size=2)
    assert out.dtype == np.uint8 and out.shape == uint8.shape
    assert np.array_equal(out[m == 1], uint8[m == 1])
    # run_inpainting copies the known bytes itself: also require that the holes hold the model's output
    assert np.mean(out[m == 0] != uint8[m == 0]) > 0.5
    with pytest.raises(UserError):
        run_inpainting(fam, x[:, :4], m[:, :4], 8, 3)  # the wrong image size for the run


def test_inpainting_inputs_are_checked(tmp_path):
    np.savez(tmp_path / "x.npz", np.zeros((2, 8, 8), np.uint8))  # grey N x H x W is fine
    np.savez(tmp_path / "m3.npz", np.ones((2, 8, 7), np.uint8))
    np.savez(tmp_path / "m2.npz", np.full((2, 8, 8), 2, np.uint8))
    np.savez(tmp_path / "f.npz", np.zeros((2, 8, 8, 1), np.float32))
    x, m = load_inpainting_inputs(str(tmp_path / "x.npz"), str(tmp_path / "x.npz"))
    assert x.shape == (2, 8, 8, 1) and m.shape == (2, 8, 8)
    for images_file, masks_file in [("x", "m3"), ("x", "m2"), ("f", "x"), ("missing", "x")]:
        with pytest.raises(UserError):
            load_inpainting_inputs(str(tmp_path / f"{images_file}.npz"), str(tmp_path / f"{masks_file}.npz"))


def test_call_inpaint_refuses_families_without_inpaint():
    class NoInpaint:
        name = "ddpm"

    with pytest.raises(UserError):
        call_inpaint(NoInpaint(), images(), torch.ones(8, 1, 8, 8))
