"""GAN networks: parameter counts against the papers' reference models, shapes, init, receptive field."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from genscale.models.dcgan import DCGANDiscriminator, DCGANGenerator
from genscale.models.mlp_gan import MLPDiscriminator, MLPGenerator
from genscale.models.patchgan import PatchDiscriminator, patch_output_size, patch_receptive_field
from genscale.models.pix2pix_unet import UNetGenerator


def count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_dcgan_matches_the_reference_parameter_counts():
    # PyTorch's DCGAN example (64 px, RGB, nz 100, ngf = ndf = 64, bias-free convs).
    assert count(DCGANGenerator(100, 3, 64, width=64)) == 3_576_704
    assert count(DCGANDiscriminator(3, 64, width=64)) == 2_765_568


def test_patchgan_70x70_parameter_count_and_receptive_field_formula():
    # pix2pix's 70x70 PatchGAN on (A, B) = 6 channels, ndf 64, no bias before BatchNorm.
    assert count(PatchDiscriminator(6, width=64, n_layers=3)) == 2_768_705
    assert [patch_receptive_field(n) for n in (1, 2, 3)] == [16, 34, 70]
    assert patch_output_size(256, 3) == 30


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_patchgan_receptive_field_measured_by_gradient(n_layers):
    torch.manual_seed(0)
    d = PatchDiscriminator(2, width=8, n_layers=n_layers).eval()
    x = torch.randn(1, 2, 96, 96, requires_grad=True)
    out = d(x)
    out[0, 0, out.shape[2] // 2, out.shape[3] // 2].backward()
    touched = x.grad.abs().sum((0, 1)) > 0
    rows = touched.any(1).nonzero().flatten()
    cols = touched.any(0).nonzero().flatten()
    assert rows.max() - rows.min() + 1 == patch_receptive_field(n_layers)
    assert cols.max() - cols.min() + 1 == patch_receptive_field(n_layers)


def test_unet_256_has_8_downsamplings_3_dropout_blocks_and_the_pix2pix_size():
    with torch.device("meta"):
        g = UNetGenerator(3, 3, 256, width=64)
    assert g.num_downs == 8
    assert sum(isinstance(m, nn.Dropout) for m in g.modules()) == 3
    # pix2pix prints 54.414 M for unet_256; the exact count by hand is 54,413,955
    assert count(g) == 54_413_955


@pytest.mark.parametrize("size,downs", [(16, 4), (32, 5), (64, 6)])
def test_unet_depth_follows_the_image_size(size, downs):
    g = UNetGenerator(1, 3, size, width=8).eval()
    assert g.num_downs == downs
    assert g(torch.randn(2, 1, size, size)).shape == (2, 3, size, size)


def test_unet_skip_connections_carry_fine_detail():
    # With skips, a one-pixel change of the input changes the output near that pixel.
    torch.manual_seed(0)
    g = UNetGenerator(1, 1, 16, width=8, dropout=0.0).eval()
    x = torch.zeros(1, 1, 16, 16)
    y = x.clone()
    y[0, 0, 3, 3] = 1.0
    diff = (g(x) - g(y)).abs()[0, 0]
    assert diff[:8, :8].sum() > diff[8:, 8:].sum()


@pytest.mark.parametrize("size", [8, 16, 32, 64])
def test_dcgan_shapes_for_each_size(size):
    g = DCGANGenerator(10, 3, size, width=8)
    d = DCGANDiscriminator(3, size, width=8)
    x = g(torch.randn(4, 10))
    assert x.shape == (4, 3, size, size) and x.abs().max() <= 1
    assert d(x).shape == (4,)
    assert DCGANDiscriminator(3, size, width=8, out_dim=11)(x).shape == (4, 11)


def test_dcgan_rejects_sizes_it_cannot_build():
    for size in (12, 4, 48):
        with pytest.raises(ValueError):
            DCGANGenerator(10, 1, size)


def test_dcgan_init_statistics():
    torch.manual_seed(0)
    g = DCGANGenerator(100, 3, 64, width=64)
    convs = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, nn.ConvTranspose2d)])
    bns = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(convs.mean().item()) < 1e-3 and abs(convs.std().item() - 0.02) < 1e-3
    assert abs(bns.mean().item() - 1.0) < 5e-3 and abs(bns.std().item() - 0.02) < 5e-3


def test_conditional_networks_use_the_label():
    torch.manual_seed(0)
    g = DCGANGenerator(8, 1, 16, width=8, num_classes=10, embed_dim=4).eval()
    z = torch.randn(2, 8)
    assert not torch.allclose(g(z, torch.tensor([1, 1])), g(z, torch.tensor([2, 2])))
    d = DCGANDiscriminator(1, 16, width=8, label_channels=10).eval()
    x = torch.randn(2, 1, 16, 16)
    assert not torch.allclose(d(x, torch.tensor([1, 1])), d(x, torch.tensor([2, 2])))
    with pytest.raises(ValueError):
        g(z)


def test_mlp_shapes():
    g = MLPGenerator(16, (1, 16, 16), hidden=(32, 64))
    d = MLPDiscriminator((1, 16, 16), hidden=(64, 32))
    x = g(torch.randn(5, 16))
    assert x.shape == (5, 1, 16, 16) and x.abs().max() <= 1
    assert d(x).shape == (5,)
    assert count(d) == 256 * 64 + 64 + 64 * 32 + 32 + 32 + 1
