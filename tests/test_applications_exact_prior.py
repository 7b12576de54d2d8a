"""The applications' reverse loop with the exact denoiser of a known prior.

The prior is four of scikit-learn's 8x8 digits, each with probability 1/4. Its posterior given
x_t is known in closed form: p(x0 = y_i | x_t) = w_i ∝ exp(-|x_t - sqrt(abar_t) y_i|^2 / (2 (1 - abar_t))).
A network that returns the exact eps of this prior turns the applications' samplers into
something we can check against that formula, independently of any training.
"""
from __future__ import annotations

import math

import pytest
import torch
from sklearn.datasets import load_digits

from genscale.applications.denoise import denoise
from genscale.applications.model import DiffusionModel, guided_eps_fn
from genscale.diffusion.samplers import strided_timesteps
from tests.test_applications_support import tiny_ddpm


def atoms() -> torch.Tensor:
    digits = load_digits().images[:4]  # values 0..16
    return torch.tensor(digits / 8.0 - 1.0, dtype=torch.float64).reshape(4, 1, 8, 8)


def posterior_weights(x_t: torch.Tensor, abar: float | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """w_i for each row of x_t (N x D) over the atoms y (M x D), float64; abar a number or N x 1."""
    abar = torch.as_tensor(abar, dtype=torch.float64)
    sq = (x_t[:, None, :] - abar.sqrt().view(-1, 1, 1) * y[None]).square().sum(-1)
    return (-sq / (2 * (1 - abar.view(-1, 1)))).softmax(1)


class ExactNet(torch.nn.Module):
    """The eps (or v) prediction of the four-atom prior, computed exactly (float64 inside)."""

    def __init__(self, schedule, prediction: str) -> None:
        super().__init__()
        self.schedule, self.prediction = schedule, prediction
        self.y = torch.nn.Parameter(atoms().flatten(1), requires_grad=False)  # a parameter: the family asks one for its device

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels=None) -> torch.Tensor:
        abar = self.schedule.alphas_cumprod[t].view(-1, 1)
        flat = x.double().flatten(1)
        x0 = posterior_weights(flat, abar, self.y) @ self.y
        eps = (flat - abar.sqrt() * x0) / (1 - abar).sqrt()
        pred = eps if self.prediction == "eps" else abar.sqrt() * eps - (1 - abar).sqrt() * x0
        return pred.view_as(x).to(x.dtype)


def exact_model(prediction: str) -> DiffusionModel:
    family = tiny_ddpm(timesteps=1000)  # the default preset's cosine schedule, T = 1000
    family.opts.prediction = prediction
    family.nets["model"] = ExactNet(family.schedule, prediction)
    return DiffusionModel(family)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ancestral_steps_from_x_t_draw_the_exact_posterior(prediction):
    """Many ancestral chains from ONE noisy image end on the atoms with frequencies w_i(x_t)."""
    dm, y, t, chains = exact_model(prediction), atoms(), 900, 3000
    gen = torch.Generator().manual_seed(0)
    abar = float(dm.abar(t))
    x_t = (math.sqrt(abar) * y[0] + math.sqrt(1 - abar) * torch.randn(y[0].shape, generator=gen,
                                                                       dtype=torch.float64))[None].float()
    w = posterior_weights(x_t.double().flatten(1), abar, y.flatten(1))[0]
    assert w.max() < 0.7 and (w > 0.03).sum() >= 3  # the posterior is genuinely spread over several digits
    x, _ = dm.reverse(x_t.repeat(chains, 1, 1, 1), strided_timesteps(t + 1, 100), guided_eps_fn(dm, None, 1.0),
                      eta=1.0, generator=gen)
    dist = torch.cdist(x.double().flatten(1), y.flatten(1))
    assert float(dist.min(1).values.max()) < 1e-3  # every chain ends on a digit of the prior
    freq = torch.bincount(dist.argmin(1), minlength=4).double() / chains
    # 4.5 standard errors of a frequency, plus 0.01 for the 100-step discretisation of the reverse process
    tolerance = 4.5 * (w * (1 - w) / chains).sqrt() + 0.01
    assert torch.all((freq - w).abs() < tolerance), (freq, w)


def test_exact_denoiser_one_step_is_the_posterior_mean_and_beats_sampling():
    """One-step x0 = E[x0 | x_t]; the squared error of posterior samples is about twice its MSE."""
    dm, y = exact_model("eps"), atoms()
    gen = torch.Generator().manual_seed(1)
    clean = y[torch.randint(0, 4, (400,), generator=gen)].float()
    result = denoise(dm, clean, 850, steps=100, eta=1.0, generator=torch.Generator().manual_seed(2))
    abar = float(dm.abar(850))
    # denoise() draws x_t's noise first from its generator: rebuild x_t from the same seed
    x_t = math.sqrt(abar) * clean.double() + math.sqrt(1 - abar) * torch.randn(
        clean.shape, generator=torch.Generator().manual_seed(2)).double()
    expected = posterior_weights(x_t.flatten(1), abar, y.flatten(1)) @ y.flatten(1)
    assert torch.allclose(result.one_step.double().flatten(1), expected, atol=1e-5)
    mmse = (result.one_step - clean).square().mean()
    sample_mse = (result.iterative - clean).square().mean()
    assert 1.6 < float(sample_mse / mmse) < 2.4  # exactly 2 in expectation for exact posterior samples
