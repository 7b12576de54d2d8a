"""Min-SNR-gamma loss weighting (Hang et al. 2023): whatever the network predicts, the weighted
loss is min(SNR_t, gamma) times the squared x0 error, checked in float64 from the definitions."""
from __future__ import annotations

import pytest
import torch

import kernels
from genscale.config import TrainConfig
from genscale.diffusion.losses import diffusion_loss, min_snr_weights
from genscale.diffusion.schedule import NoiseSchedule
from genscale.errors import UserError
from genscale.families.base import DataInfo
from genscale.families.ddpm import DDPM, Options


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_weights_put_min_snr_on_the_x0_error(kind):
    schedule = NoiseSchedule(kind, 1000)
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 3, 50, 200, 500, 800, 999])
    x0, eps, noise = (torch.randn(7, 2, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    x_t = alpha * x0 + sigma * eps
    snr = (abar / (1 - abar)).flatten()
    gamma = 5.0
    eps_hat = eps + 0.3 * noise  # any prediction: the identity holds sample by sample
    x0_from_eps = (x_t - sigma * eps_hat) / alpha
    v = alpha * eps - sigma * x0
    v_hat = v + 0.3 * noise
    x0_from_v = alpha * x_t - sigma * v_hat
    target = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64))
    per_sample = lambda e: e.square().flatten(1).sum(1)  # noqa: E731
    eps_side = min_snr_weights(schedule, t, gamma, "eps") * per_sample(eps_hat - eps)
    v_side = min_snr_weights(schedule, t, gamma, "v") * per_sample(v_hat - v)
    torch.testing.assert_close(eps_side, target * per_sample(x0_from_eps - x0), rtol=1e-9, atol=0)
    torch.testing.assert_close(v_side, target * per_sample(x0_from_v - x0), rtol=1e-9, atol=0)
    assert snr[0] > gamma > snr[-1]  # both sides of the cap are exercised


def test_the_family_loss_uses_the_weights():
    """The fused training loss with --snr-gamma equals the weighted formula with the same draws."""
    torch.manual_seed(3)
    family = DDPM(TrainConfig(), Options(base_width=16, snr_gamma=5.0), DataInfo("digits", 1, 8, 10))
    net = family.nets["model"]
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)
    x0, labels = torch.rand(6, 1, 8, 8) * 2 - 1, torch.randint(0, 10, (6,))
    torch.manual_seed(11)
    fused = family._fused_eps_loss(x0, labels)

    torch.manual_seed(11)  # the same draws: t, then the Philox seed
    t = torch.randint(0, 1000, (6,))
    seed = int(torch.randint(0, 2**62, ()).item())
    eps = kernels.philox_normal(x0, seed, 0)
    x_t = family.schedule.q_sample(x0, t, eps)
    with torch.no_grad():
        error = (net(x_t, t, labels) - eps).double().square().flatten(1).mean(1)
    abar = family.schedule.alphas_cumprod[t]
    snr = abar / (1 - abar)
    reference = (snr.clamp(max=5.0) / snr * error).mean()
    assert abs(fused.item() - reference.item()) <= 1e-5 * reference.item()
    assert abs(error.mean().item() - reference.item()) > 0.01 * reference.item()  # the weights matter here


def test_v_prediction_loss_is_weighted():
    schedule = NoiseSchedule("cosine", 1000)
    x0 = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([1, 10, 100, 600, 990])
    model = lambda x, tt, labels: torch.zeros_like(x)  # noqa: E731  the v error is then -v
    plain = diffusion_loss(model, x0, None, schedule, prediction="v", t=t,
                           generator=torch.Generator().manual_seed(0))
    weighted = diffusion_loss(model, x0, None, schedule, prediction="v", t=t, snr_gamma=5.0,
                              generator=torch.Generator().manual_seed(0))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=x0.dtype)
    v = schedule.v_target(x0, t, eps)
    per_sample = v.square().flatten(1).mean(1)
    assert plain.item() == pytest.approx(per_sample.mean().item(), rel=1e-6)
    expected = (min_snr_weights(schedule, t, 5.0, "v") * per_sample).mean()
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-6)


def test_v_prediction_training_step_is_weighted():
    """The family's v branch passes --snr-gamma on (same draws, another loss)."""
    def loss(gamma: float) -> float:
        torch.manual_seed(0)
        family = DDPM(TrainConfig(), Options(base_width=8, prediction="v", snr_gamma=gamma),
                      DataInfo("digits", 1, 8, 10))
        torch.nn.init.normal_(family.nets["model"].conv_out.weight, std=0.05)
        batch = {"image": torch.rand(4, 1, 8, 8) * 2 - 1, "label": torch.tensor([1, 2, 3, 4])}
        torch.manual_seed(1)
        return float(family.training_step(batch, lambda value, name: None)["loss"])

    assert abs(loss(5.0) - loss(0.0)) > 1e-3 * loss(0.0)


@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_bad_gamma_is_refused(value):
    with pytest.raises(UserError, match="--snr-gamma must be a non-negative number"):
        Options(snr_gamma=value).validate()


def test_gamma_with_l1_is_refused():
    """|eps error| = sqrt(SNR) |x0 error|: the weights would not put min(SNR, gamma) on the x0 error."""
    with pytest.raises(UserError, match="--snr-gamma weights squared errors"):
        Options(snr_gamma=5.0, loss="l1").validate()
