"""The masked-patch transformer: patches, exact masking, the loss, inpainting and MaskGIT generation."""
from __future__ import annotations

import math

import pytest
import torch

from genscale.config import TrainConfig
from genscale.data.masks import random_masks
from genscale.errors import UserError
from genscale.families.base import DataInfo
from genscale.families.transformer import (Options, Transformer, mask_counts, masked_patch_mse,
                                           random_token_mask)
from genscale.models.masked_transformer import MaskedTransformer, patch_mask, patchify, unpatchify
from tests.conftest import plain_optimize


def build(size: int = 8, channels: int = 1, classes: int = 10, **overrides) -> Transformer:
    torch.manual_seed(0)
    options = Options(**{"dim": 32, "depth": 2, "heads": 2, **overrides})
    return Transformer(TrainConfig(model="transformer", lr=1e-3), options, DataInfo("test", channels, size, classes))


def batch(n: int = 8, size: int = 8, channels: int = 1, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, channels, size, size, generator=g) * 2 - 1,
            "label": torch.randint(0, 10, (n,), generator=g)}


def test_patchify_orders_patches_row_major_and_inverts():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 6, 12)
    for row in range(2):
        for col in range(3):
            assert torch.equal(tokens[1, row * 3 + col], x[1, :, 2 * row:2 * row + 2, 2 * col:2 * col + 2].flatten())
    assert torch.equal(unpatchify(tokens, 2, 3, 4, 6), x)


def test_a_patch_with_one_hole_pixel_is_masked():
    m = torch.ones(1, 1, 4, 4)
    m[0, 0, 0, 1] = 0  # top-left patch
    m[0, 0, 3, 3] = 0  # bottom-right patch
    assert patch_mask(m, 2).tolist() == [[True, False, False, True]]
    assert patch_mask(m, 1).sum() == 2


@pytest.mark.parametrize("ratio, tokens", [(0.75, 64), (0.5, 16), (0.1, 7), (1.0, 9), (0.01, 16)])
def test_fixed_ratio_masks_exactly_ceil_ratio_tokens(ratio, tokens):
    counts = mask_counts(50, tokens, "fixed", ratio)
    expected = min(tokens, max(1, math.ceil(ratio * tokens)))
    mask = random_token_mask(counts, tokens, torch.Generator().manual_seed(0))
    assert mask.shape == (50, tokens) and mask.sum(1).tolist() == [expected] * 50


def test_cosine_ratios_follow_the_maskgit_schedule():
    counts = mask_counts(20000, 64, "cosine", 0.0, torch.Generator().manual_seed(0)).double()
    assert counts.min() >= 1 and counts.max() <= 64
    # E[ceil(64 cos(pi u / 2))] is 64 * 2/pi plus a rounding-up of about one half
    assert abs(counts.mean().item() - (64 * 2 / math.pi + 0.5)) < 0.4
    # P(count <= 32) = P(cos(pi u / 2) <= 1/2) = 1/3
    assert abs((counts <= 32).double().mean().item() - 1 / 3) < 0.02


def test_token_masks_are_uniform_over_positions():
    counts = torch.full((4000,), 16)
    mask = random_token_mask(counts, 64, torch.Generator().manual_seed(1))
    per_token = mask.double().mean(0)
    assert (per_token - 0.25).abs().max() < 0.04  # 4000 draws: sd 0.007


def test_loss_counts_masked_patches_only():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    masked = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 0, 0, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    want = ((pred - target) ** 2)[masked].mean()
    assert float(masked_patch_mse(pred, target, masked)) == pytest.approx(float(want), rel=1e-6)
    other_pred = torch.where(masked[..., None], pred, torch.randn(3, 5, 4, generator=g))
    other_target = torch.where(masked[..., None], target, torch.randn(3, 5, 4, generator=g))
    assert float(masked_patch_mse(other_pred, other_target, masked)) == float(masked_patch_mse(pred, target, masked))


def test_visible_tokens_get_no_gradient_from_the_loss():
    pred = torch.randn(2, 6, 3, requires_grad=True)
    masked = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    masked_patch_mse(pred, torch.zeros(2, 6, 3), masked).backward()
    assert (pred.grad[~masked] == 0).all() and (pred.grad[masked] != 0).all()


def test_masked_content_never_reaches_the_network():
    net = MaskedTransformer(1, 8, patch_size=2, dim=32, depth=2, heads=2, num_classes=10)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    masked = random_token_mask(torch.tensor([5, 9, 16]), 16, torch.Generator().manual_seed(0))
    pixel_masked = unpatchify(masked[..., None].float().expand(-1, -1, 4), 2, 1, 8, 8) > 0.5
    y = torch.tensor([1, 2, 10])
    out = net(x, masked, y)
    assert torch.equal(net(torch.where(pixel_masked, torch.randn_like(x), x), masked, y), out)
    assert not torch.equal(net(torch.where(pixel_masked, x, torch.randn_like(x)), masked, y), out)


@pytest.mark.parametrize("inpaint_masks", [0.0, 1.0])
def test_training_step_loss_is_the_masked_patch_mse_of_the_network(inpaint_masks):
    options = dict(patch_size=2, mask_schedule="fixed", mask_ratio=0.5, inpaint_masks=inpaint_masks)
    fam = build(**options)
    b = batch()
    torch.manual_seed(7)
    losses = []
    fam.training_step(b, plain_optimize(fam, losses))
    fam2 = build(**options)  # the same initial weights
    torch.manual_seed(7)  # replay the family's draws: random patches, inpainting holes, label drops
    masked = random_token_mask(mask_counts(8, 16, "fixed", 0.5), 16)
    if inpaint_masks:
        torch.rand(8)  # the family's draw choosing which samples get holes: replayed, not used
        masked = patch_mask(random_masks("mixed", 8, (8, 8)), 2)
        assert 0 < masked.sum() < masked.numel()
    else:
        assert masked.sum(1).tolist() == [8] * 8
    drop = torch.rand(8) < fam.opts.cond_drop
    labels = torch.where(drop, 10, b["label"])
    with torch.no_grad():
        pred = fam2.nets["transformer"](b["image"], masked, labels)
    want = ((pred - patchify(b["image"], 2)) ** 2)[masked].mean()
    assert losses[0] == pytest.approx(float(want), rel=1e-5)


def test_training_lowers_the_masked_loss():
    fam = build(dim=64)
    b = batch(n=16)
    b["image"] = torch.where(torch.arange(8)[None, None, None, :] % 2 == 0, 1.0, -1.0).expand(16, 1, 8, 8)
    losses = []
    for _ in range(80):
        fam.training_step(b, plain_optimize(fam, losses))
    assert sum(losses[-10:]) < 0.2 * sum(losses[:10])


def test_inpaint_keeps_known_pixels_and_ignores_hole_content():
    fam = build(patch_size=2)
    fam.training_step(batch(), plain_optimize(fam))
    x = batch(seed=3)["image"]
    mask = random_masks("mixed", 8, 8, generator=torch.Generator().manual_seed(0))
    out = fam.inpaint(x, mask)
    known = mask.expand_as(x) > 0.5
    assert torch.equal(out[known], x[known]) and not torch.equal(out[~known], x[~known])
    assert torch.equal(fam.inpaint(torch.where(known, x, torch.rand_like(x)), mask), out)
    with pytest.raises(UserError):
        fam.inpaint(x, mask[:, 0])


def test_generation_reveals_every_token_once_on_the_cosine_schedule():
    fam = build(temperature=0.0)
    net = fam.nets["transformer"]
    seen = []
    hook = net.register_forward_pre_hook(lambda m, args: seen.append(int(args[1][0].sum())))
    out = fam.sample(3, labels=torch.tensor([1, 2, 3]), generator=torch.Generator().manual_seed(0), sampling_steps=8)
    hook.remove()
    assert seen == [64] + [math.floor(64 * math.cos(math.pi / 2 * k / 8)) for k in range(1, 8)]
    assert out.shape == (3, 1, 8, 8) and out.abs().max() <= 1
    again = fam.sample(3, labels=torch.tensor([1, 2, 3]), generator=torch.Generator().manual_seed(0), sampling_steps=8)
    assert torch.equal(out, again)


def test_generation_noise_and_labels_change_the_samples():
    fam = build()
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = fam.sample(4, labels=torch.tensor([0, 1, 2, 3]), generator=gen())
    assert not torch.equal(a, fam.sample(4, labels=torch.tensor([4, 5, 6, 7]), generator=gen()))
    assert not torch.equal(a, fam.sample(4, labels=torch.tensor([0, 1, 2, 3]), generator=gen(), temperature=0.5))


def test_unconditional_when_cond_drop_is_one():
    fam = build(cond_drop=1.0)
    assert fam.num_classes == 0 and fam.nets["transformer"].label_embed is None
    fam.training_step(batch(), plain_optimize(fam))
    assert fam.sample(2, labels=torch.tensor([3, 4])).shape == (2, 1, 8, 8)


def test_bad_options_are_refused():
    with pytest.raises(UserError):
        Options(mask_schedule="linear").validate()
    with pytest.raises(UserError):
        Options(mask_ratio=0.0).validate()
    with pytest.raises(UserError):
        build(patch_size=3)
