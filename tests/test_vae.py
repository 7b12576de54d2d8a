"""The VAE: KL and discretised likelihood against closed forms, the ELBO, shapes, the family."""
from __future__ import annotations

import math

import pytest
import torch

from genscale.config import TrainConfig
from genscale.errors import UserError
from genscale.families.base import DataInfo
from genscale.families.vae import VAE, Options
from genscale.models.vae import ConvVAE, discretized_gaussian_log_likelihood, gaussian_kl


def build(size: int = 8, channels: int = 1, **overrides) -> VAE:
    torch.manual_seed(0)
    options = Options(**{"z_channels": 4, "width": 8, **overrides})
    return VAE(TrainConfig(model="vae", lr=1e-3), options, DataInfo("test", channels, size, 10))


def levels(n: int = 256) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float64) / 127.5 - 1


def bin_probability(x: float, mean: float, scale: float) -> float:
    """Independent float64 reference: Gaussian mass of x's bin, end bins open to infinity.

    Lower and upper tail probabilities come from math.erfc, each on the side of the mean where
    it is small, so the difference keeps float64's relative precision far into the tails."""
    lo = -math.inf if x <= -1 + 1e-9 else x - 1 / 255
    hi = math.inf if x >= 1 - 1e-9 else x + 1 / 255
    below = lambda v: 0.5 * math.erfc(-(v - mean) / (scale * math.sqrt(2)))  # noqa: E731  P(X < v)
    above = lambda v: 0.5 * math.erfc((v - mean) / (scale * math.sqrt(2)))  # noqa: E731  P(X > v)
    if lo > mean:
        return above(lo) - above(hi)
    return below(hi) - below(lo)


def test_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(5, 4, 2, 2, generator=g, dtype=torch.float64)
    logvar = torch.randn(5, 4, 2, 2, generator=g, dtype=torch.float64)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_kl(mean, logvar), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(gaussian_kl(torch.zeros(3, 7), torch.zeros(3, 7)), torch.zeros(3))


@pytest.mark.parametrize("mean, log_scale", [(0.0, -2.0), (-1.3, -0.5), (0.9, -4.0), (0.1, 1.0), (0.5, -6.5)])
def test_discretized_likelihood_is_a_distribution_over_the_256_levels(mean, log_scale):
    x = levels()[:, None]
    logp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
    assert abs(float(logp.exp().sum()) - 1.0) < 1e-9


def test_discretized_likelihood_matches_erf_reference():
    cases = [(-1.0, -0.8, 0.3), (1.0, 0.7, 0.2), (0.0039215686, 0.0, 0.05), (-0.2549019608, 0.1, 0.4),
             (0.5058823529, 0.5, 0.01)]
    x = torch.tensor([c[0] for c in cases], dtype=torch.float64)[:, None]
    mean = torch.tensor([c[1] for c in cases], dtype=torch.float64)[:, None]
    scale = torch.tensor([c[2] for c in cases], dtype=torch.float64)[:, None]
    got = discretized_gaussian_log_likelihood(x, mean, scale.log())
    want = torch.tensor([math.log(bin_probability(*c)) for c in cases], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mean, log_scale", [(0.2, -1.5), (0.9, -3.0), (-0.5, -4.0), (0.0, 0.0)])
def test_discretized_likelihood_keeps_float32_precision_in_the_tails(mean, log_scale):
    x = levels().float()[:, None]
    got = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale)).double()
    want = torch.tensor([math.log(max(bin_probability(float(v), mean, math.exp(log_scale)), 1e-300))
                         for v in levels()], dtype=torch.float64)
    fine = want > -60  # below ~1e-26 the bin mass is approximated by density times width
    assert fine.sum() > 20
    torch.testing.assert_close(got[fine], want[fine], rtol=1e-4, atol=1e-4)


def test_discretized_likelihood_stays_finite_far_in_the_tail():
    x = torch.tensor([[0.0]])
    logp = discretized_gaussian_log_likelihood(x, torch.tensor([[0.9]]), torch.tensor([[-6.0]]))
    z = 0.9 / math.exp(-6.0)  # ~363 standard deviations: the density times the bin width
    expected = -0.5 * z * z - 0.5 * math.log(2 * math.pi) + 6.0 + math.log(2 / 255)
    assert math.isfinite(float(logp)) and abs(float(logp) - expected) / abs(expected) < 1e-4


@pytest.mark.parametrize("size, factor, channels", [(8, 8, 1), (8, 4, 1), (16, 4, 3), (16, 2, 1)])
def test_autoencoder_round_trip_shapes(size, factor, channels):
    vae = ConvVAE(channels, size, downsample=factor, z_channels=3, width=8)
    x = torch.rand(2, channels, size, size) * 2 - 1
    mean, logvar = vae.encode(x)
    assert mean.shape == logvar.shape == (2, 3, size // factor, size // factor) == (2, *vae.latent_shape)
    x_mean, log_scale = vae.decode(mean)
    assert x_mean.shape == log_scale.shape == x.shape
    assert vae.reconstruct(x).shape == x.shape


def test_bad_downsampling_is_refused():
    with pytest.raises(ValueError):
        ConvVAE(1, 8, downsample=3)
    with pytest.raises(ValueError):
        ConvVAE(1, 8, downsample=16)
    with pytest.raises(UserError):
        build(size=8, downsample=16)


def test_reparameterisation_passes_gradients_to_mean_and_variance():
    mean = torch.zeros(4, requires_grad=True)
    logvar = torch.zeros(4, requires_grad=True)
    noise = torch.tensor([1.0, -2.0, 0.5, 0.0])
    z = ConvVAE.reparameterize(mean, logvar, noise)
    z.sum().backward()
    assert torch.equal(mean.grad, torch.ones(4))
    torch.testing.assert_close(logvar.grad, 0.5 * noise)


def test_negative_elbo_of_a_constant_decoder_is_closed_form():
    """With the decoder's last layer zeroed, p(x|z) no longer depends on z: the reconstruction
    term is exact for every z sample and the negative ELBO is -log p(x) + KL in closed form."""
    fam = build()
    vae = fam.vae
    last = vae.decoder[-1]
    torch.nn.init.zeros_(last.weight)
    with torch.no_grad():
        last.bias.copy_(torch.tensor([0.2, -1.5]))  # mean 0.2, log-scale about -1.5
    with torch.no_grad():
        x_mean, log_scale = vae.decode(torch.randn(3, *vae.latent_shape))
    assert (x_mean == 0.2).all() and (log_scale == log_scale.flatten()[0]).all()  # constant in z
    scale = math.exp(float(log_scale.flatten()[0]))
    g = torch.Generator().manual_seed(1)
    x = (torch.randint(0, 256, (6, 1, 8, 8), generator=g).double() / 127.5 - 1).float()
    rec = sum(-math.log(bin_probability(float(v), 0.2, scale)) for v in x.double().flatten()) / 6
    with torch.no_grad():
        mean, logvar = vae.encode(x)
    m, lv = mean.double(), logvar.double()
    kl = float((0.5 * (m ** 2 + lv.exp() - 1 - lv)).sum()) / 6
    got = fam.evaluate_elbo(x, torch.Generator().manual_seed(0), samples=3)
    assert got["rec_nats"] == pytest.approx(rec, rel=1e-5)
    assert got["kl_nats"] == pytest.approx(kl, rel=1e-5)
    assert got["nelbo_nats"] == pytest.approx(rec + kl, rel=1e-5)
    assert got["bits_per_dim"] == pytest.approx((rec + kl) / (64 * math.log(2)), rel=1e-5)


def recording_optimize(fam, losses):
    def optimize(loss, name):
        losses.append(float(loss.detach()))
        loss.backward()
        fam.optimizers[name].step()
        fam.optimizers[name].zero_grad(set_to_none=True)
    return optimize


@pytest.mark.parametrize("beta", [0.0, 0.25, 1.0])
def test_training_loss_is_reconstruction_plus_beta_kl_per_dimension(beta):
    fam = build(beta=beta)
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    losses = []
    torch.manual_seed(3)
    logs = fam.training_step({"image": x, "label": torch.zeros(8, dtype=torch.long)}, recording_optimize(fam, losses))
    logs = {k: float(v) for k, v in logs.items()}  # 0-dim tensors: the trainer reads them in batches
    assert losses[0] == pytest.approx((logs["rec_nats"] + beta * logs["kl_nats"]) / 64, rel=1e-5)
    assert logs["nelbo_nats"] == pytest.approx(logs["rec_nats"] + logs["kl_nats"], rel=1e-6)


def test_training_lowers_the_negative_elbo():
    fam = build(width=16)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(32, 1, 8, 8, generator=g) > 0.6).float() * 2 - 1  # binary pictures
    before = fam.evaluate_elbo(x, torch.Generator().manual_seed(0))["nelbo_nats"]
    opt = recording_optimize(fam, [])
    for _ in range(60):
        fam.training_step({"image": x}, opt)
    after = fam.evaluate_elbo(x, torch.Generator().manual_seed(0))["nelbo_nats"]
    assert after < 0.6 * before


def test_samples_and_grid():
    fam = build()
    a = fam.sample(5, generator=torch.Generator().manual_seed(2))
    b = fam.sample(5, generator=torch.Generator().manual_seed(2))
    assert a.shape == (5, 1, 8, 8) and torch.equal(a, b) and a.abs().max() <= 1
    with pytest.raises(UserError):
        fam.grid()  # no images seen yet to reconstruct
    fam.training_step({"image": torch.rand(8, 1, 8, 8) * 2 - 1}, recording_optimize(fam, []))
    images, per_row = fam.grid(torch.Generator().manual_seed(0))
    assert per_row == 8 and images.shape == (32 + 16 + 32, 1, 8, 8)
    # the interpolation rows start and end at the decoded posterior means of kept images
    recon = fam.vae.reconstruct(fam.preview)
    torch.testing.assert_close(images[48], recon[0])
    torch.testing.assert_close(images[55], recon[4])


def test_test_elbo_reads_the_held_out_split(tmp_path):
    torch.manual_seed(0)
    cfg = TrainConfig(model="vae", data="digits", cache_dir=str(tmp_path))
    fam = VAE(cfg, Options(z_channels=4, width=8, elbo_samples=1), DataInfo("digits", 1, 8, 10))
    result = fam.test_elbo()
    assert result["split"] == "test" and 300 < result["num"] < 400  # a fifth of the 1,797 digits
    assert result["nelbo_nats"] > 0 and result["bits_per_dim"] == pytest.approx(
        result["nelbo_nats"] / (64 * math.log(2)))


def test_posterior_log_variance_has_a_smooth_ceiling():
    vae = ConvVAE(1, 8, downsample=8, z_channels=4, width=8)
    with torch.no_grad():
        vae.encoder[-1].weight.zero_()
        vae.encoder[-1].bias[4:].fill_(12.0)  # raw log-variances far above any sensible value (e^12)
    x = (torch.rand(2, 1, 8, 8) * 2 - 1).requires_grad_(False)
    _, logvar = vae.encode(x)
    assert (logvar < 2.0).all() and (logvar > 1.999).all()
    logvar.sum().backward()
    assert vae.encoder[-1].bias.grad[4:].abs().min() > 0  # still a gradient to bring it back


@pytest.mark.parametrize("batch", [1, 3, 6])
def test_grid_with_a_batch_smaller_than_the_preview(batch):
    """The preview keeps up to 8 images of the first batch; smaller batches crashed the grid."""
    fam = build()
    fam.training_step({"image": torch.rand(batch, 1, 8, 8) * 2 - 1}, recording_optimize(fam, []))
    images, per_row = fam.grid(torch.Generator().manual_seed(0))
    assert per_row == 8 and len(images) == 32 + 2 * batch + 8 * max(1, batch // 2)
