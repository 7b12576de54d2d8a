"""The U-Net and its layers: shapes, conditioning, the kernel hook, parameter count, gradients."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import kernels
from genscale.errors import UserError
from genscale.models import layers
from genscale.models.layers import AttentionBlock, GroupNormSiLU, group_count, sinusoidal_embedding
from genscale.models.unet import UNet


def randomise_zero_inits(model: torch.nn.Module, seed: int = 0) -> None:
    """Zero-initialised layers hide the paths behind them; give them random weights for the test."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def small(**kw) -> UNet:
    args = dict(in_channels=1, out_channels=1, base_width=16, channel_mults=(1, 2), num_res_blocks=1,
                attention_resolutions=(8,), image_size=16, num_classes=10)
    args.update(kw)
    torch.manual_seed(0)
    return UNet(**args)


def test_group_count():
    assert [group_count(c) for c in (4, 8, 32, 48, 64, 96, 128, 256)] == [1, 2, 8, 12, 16, 24, 32, 32]
    assert group_count(3) == 1 and group_count(40, max_groups=8) == 8 and group_count(36) == 9


def test_sinusoidal_embedding_values():
    emb = sinusoidal_embedding(torch.tensor([0, 1, 500]), 8)
    assert emb.shape == (3, 8)
    torch.testing.assert_close(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = [10000 ** (-i / 4) for i in range(4)]
    expected = [math.cos(500 * f) for f in freqs] + [math.sin(500 * f) for f in freqs]
    torch.testing.assert_close(emb[2], torch.tensor(expected), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size,mults,attn,in_ch,out_ch", [
    (8, (1, 2), (4,), 1, 1),
    (16, (1, 2, 2), (8,), 3, 6),
    (32, (1, 2, 2, 2), (16, 8), 4, 4),
])
def test_output_shapes(size, mults, attn, in_ch, out_ch):
    model = UNet(in_ch, out_ch, base_width=8, channel_mults=mults, num_res_blocks=1, attention_resolutions=attn,
                 image_size=size)
    x = torch.randn(2, in_ch, size, size)
    out = model(x, torch.tensor([0, 999]))
    assert out.shape == (2, out_ch, size, size)
    assert out.abs().max().item() == 0.0  # the output convolution starts at zero
    assert model(torch.randn(1, in_ch, size, 2 * size), torch.tensor([3])).shape == (1, out_ch, size, 2 * size)


def test_labels_change_the_output_and_the_null_label_path():
    model = small().eval()
    randomise_zero_inits(model)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([10, 500, 900])
    a = model(x, t, torch.tensor([1, 2, 3]))
    b = model(x, t, torch.tensor([4, 2, 3]))
    assert (a[0] - b[0]).abs().max() > 1e-4 and torch.equal(a[1:], b[1:])
    null = model(x, t, torch.full((3,), 10))
    torch.testing.assert_close(model(x, t, None), null)
    torch.testing.assert_close(model(x, t, torch.full((3,), -1)), null)  # -1 = unlabelled
    assert model.class_embed.num_embeddings == 11
    with pytest.raises(ValueError, match="num_classes=0"):
        small(num_classes=0)(x, t, torch.tensor([1, 2, 3]))


def test_timestep_changes_the_output_and_scalar_t():
    model = small(num_classes=0).eval()
    randomise_zero_inits(model)
    x = torch.randn(2, 1, 16, 16)
    assert (model(x, torch.tensor([5, 5])) - model(x, torch.tensor([600, 600]))).abs().max() > 1e-4
    torch.testing.assert_close(model(x, torch.tensor(5)), model(x, torch.tensor([5, 5])))


def test_bad_image_size():
    for size, mults in [(12, (1, 2, 2, 2)), (4, (1, 2, 2)), (17, (1, 2))]:
        with pytest.raises(ValueError, match=str(size)) as info:
            UNet(1, 1, image_size=size, channel_mults=mults)
        assert isinstance(info.value, UserError)
    UNet.check_image_size(8, (1, 2, 2))  # 2x2 at the bottom is allowed
    with pytest.raises(ValueError):
        small()(torch.randn(1, 1, 16, 15), torch.tensor([1]))


def test_every_groupnorm_goes_through_the_kernel(monkeypatch):
    calls = []

    def spy(x, weight, bias, num_groups, eps=1e-5, activation="silu"):
        calls.append((x.shape[1], num_groups, activation))
        return F.group_norm(x, num_groups, weight, bias, eps) if activation is None else \
            F.silu(F.group_norm(x, num_groups, weight, bias, eps))

    monkeypatch.setattr(kernels, "group_norm_silu", spy)
    model = small()
    model(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]))
    norms = [m for m in model.modules() if isinstance(m, GroupNormSiLU)]
    assert len(calls) == len(norms) > 0
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert ("silu" in {a for _, _, a in calls}) and (None in {a for _, _, a in calls})  # attention uses plain GN
    assert layers.kernels is kernels


def test_attention_matches_float64_reference():
    torch.manual_seed(1)
    block = AttentionBlock(16, num_heads=2).double()
    randomise_zero_inits(block)
    x = torch.randn(2, 16, 4, 3, dtype=torch.float64)
    h = F.group_norm(x, group_count(16), block.norm.weight, block.norm.bias, 1e-5)
    qkv = torch.einsum("oc,nchw->nohw", block.qkv.weight[:, :, 0, 0], h) + block.qkv.bias[None, :, None, None]
    q, k, v = qkv.reshape(2, 3, 2, 8, 12).unbind(1)  # [N, heads, head_dim, HW]
    w = torch.softmax(torch.einsum("nhdi,nhdj->nhij", q, k) / math.sqrt(8), dim=-1)
    out = torch.einsum("nhij,nhdj->nhdi", w, v).reshape(2, 16, 4, 3)
    expected = x + torch.einsum("oc,nchw->nohw", block.proj.weight[:, :, 0, 0], out) + block.proj.bias[None, :, None, None]
    torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


def test_parameter_count_by_hand():
    E = 32  # 4 * base_width

    def conv(ci, co, k):
        return ci * co * k * k + co

    def lin(i, o):
        return i * o + o

    def res(ci, co):
        return 2 * ci + conv(ci, co, 3) + lin(E, co) + 2 * co + conv(co, co, 3) + (conv(ci, co, 1) if ci != co else 0)

    def attn(c):
        return 2 * c + conv(c, 3 * c, 1) + conv(c, c, 1)

    expected = (lin(8, E) + lin(E, E) + 4 * E + conv(1, 8, 3)            # embeddings (3 classes + null), conv_in
                + res(8, 8) + conv(8, 8, 3) + res(8, 16) + attn(16)       # down: 8x8 level, downsample, 4x4 level
                + res(16, 16) + attn(16) + res(16, 16)                    # middle
                + res(32, 16) + attn(16) + res(24, 16) + attn(16)         # up at 4x4: skips of 16 and 8 channels
                + conv(16, 16, 3) + res(24, 8) + res(16, 8)               # upsample, up at 8x8
                + 2 * 8 + conv(8, 1, 3))                                  # output norm and conv
    model = UNet(1, 1, base_width=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                 image_size=8, num_classes=3)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_gradient_reaches_every_parameter():
    model = small(dropout=0.1, num_res_blocks=2)
    randomise_zero_inits(model)
    out = model(torch.randn(4, 1, 16, 16), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 10, 9]))
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_channels_last_input_gives_the_same_output():
    model = small(num_heads=2).eval()
    randomise_zero_inits(model)
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 2])
    ref = model(x, t, y)
    model_cl = model.to(memory_format=torch.channels_last)
    out = model_cl(x.to(memory_format=torch.channels_last), t, y)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
