"""NoiseSchedule against published numbers and independent float64 formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genscale.diffusion.schedule import NoiseSchedule
from genscale.errors import UserError


def test_published_numbers():
    cos = NoiseSchedule("cosine", 1000)
    lin = NoiseSchedule("linear", 1000)
    assert cos.betas[0].item() == pytest.approx(4.128e-5, rel=1e-3)
    assert cos.alphas_cumprod[499].item() == pytest.approx(0.4938, abs=1e-4)
    assert lin.alphas_cumprod[499].item() == pytest.approx(0.0786, abs=1e-4)
    assert lin.betas[0].item() == pytest.approx(1e-4) and lin.betas[-1].item() == pytest.approx(0.02)
    assert cos.betas.max().item() == pytest.approx(0.999)  # the clip is reached at the very end
    assert cos.betas.dtype == torch.float64 and lin.posterior_variance.dtype == torch.float64


def test_cosine_matches_closed_form_abar():
    T, s = 1000, 0.008
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    expected = np.array([f[t + 1] / f[0] for t in range(T)])
    got = NoiseSchedule("cosine", T).alphas_cumprod.numpy()
    # Only the last step's beta is clipped at 0.999; before it abar is exactly f(t+1)/f(0).
    np.testing.assert_allclose(got[:-1], expected[:-1], rtol=1e-10)


def test_linear_scaling_keeps_the_shape_for_other_T():
    a1000 = NoiseSchedule("linear", 1000).alphas_cumprod
    a2000 = NoiseSchedule("linear", 2000).alphas_cumprod
    for frac in (0.1, 0.25, 0.5):
        assert a2000[int(frac * 2000) - 1].item() == pytest.approx(a1000[int(frac * 1000) - 1].item(), rel=0.02)
    small = NoiseSchedule("linear", 10)  # beta_end would be 2.0: clipped, abar stays positive
    assert small.betas.max().item() == pytest.approx(0.999) and (small.alphas_cumprod > 0).all()


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_posterior_matches_bayes_formula(kind):
    T = 50
    sched = NoiseSchedule(kind, T)
    betas = sched.betas.numpy()
    abar = np.cumprod(1.0 - betas)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(T, 3, 4, 4, generator=gen, dtype=torch.float64)
    xt = torch.randn(T, 3, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.arange(T)
    mean, var, logvar = sched.posterior(x0, xt, t)
    for i in range(1, T):
        # q(x_{i-1} | x0) = N(sqrt(abar_{i-1}) x0, 1 - abar_{i-1}); q(x_i | x_{i-1}) = N(sqrt(1-b_i) x_{i-1}, b_i).
        prec = 1.0 / (1.0 - abar[i - 1]) + (1.0 - betas[i]) / betas[i]
        v = 1.0 / prec
        m = v * (math.sqrt(abar[i - 1]) * x0[i] / (1.0 - abar[i - 1]) + math.sqrt(1.0 - betas[i]) * xt[i] / betas[i])
        torch.testing.assert_close(mean[i], m, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(var[i], torch.full_like(xt[i], v), rtol=1e-9, atol=0)
        torch.testing.assert_close(logvar[i], torch.full_like(xt[i], math.log(v)), rtol=1e-9, atol=1e-12)
    # t = 0: x_{-1} is x0 itself; the variance is 0 and its log is clipped to t = 1's.
    torch.testing.assert_close(mean[0], x0[0])
    assert var[0].abs().max().item() == 0.0
    torch.testing.assert_close(logvar[0], logvar[1])


def test_q_sample_statistics():
    sched = NoiseSchedule("cosine", 1000)
    gen = torch.Generator().manual_seed(1)
    n = 200_000
    for step in (0, 250, 700, 999):
        x0 = torch.full((n, 1), 0.7)
        eps = torch.randn(n, 1, generator=gen)
        xt = sched.q_sample(x0, torch.full((n,), step), eps)
        abar = sched.alphas_cumprod[step].item()
        std = math.sqrt(1 - abar)
        assert xt.mean().item() == pytest.approx(0.7 * math.sqrt(abar), abs=5 * std / math.sqrt(n) + 1e-6)
        assert xt.std().item() == pytest.approx(std, rel=0.01, abs=1e-6)


def test_conversions_round_trip_and_match_formulas():
    sched = NoiseSchedule("linear", 1000)
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(8, 2, 5, 5, generator=gen, dtype=torch.float64)
    eps = torch.randn(8, 2, 5, 5, generator=gen, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 100, 400, 700, 900, 999])
    xt = sched.q_sample(x0, t, eps)
    a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(xt, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    torch.testing.assert_close(sched.predict_x0(xt, t, eps), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sched.predict_eps(xt, t, x0), eps, rtol=1e-9, atol=1e-9)
    v = sched.v_target(x0, t, eps)
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0)
    torch.testing.assert_close(sched.x0_from_v(xt, t, v), x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sched.eps_from_v(xt, t, v), eps, rtol=1e-9, atol=1e-9)


def test_coefficients_follow_input_dtype_and_check_t():
    sched = NoiseSchedule("cosine", 100)
    x = torch.randn(3, 4, 2, 2).to(memory_format=torch.channels_last)
    t = torch.tensor([0, 50, 99])
    for dtype in (torch.float32, torch.bfloat16):
        out = sched.q_sample(x.to(dtype), t, x.to(dtype))
        assert out.dtype == dtype and out.shape == x.shape
    assert sched.to("cpu") is sched
    with pytest.raises(ValueError, match="one timestep per sample"):
        sched.q_sample(x, torch.tensor([1, 2]), x)


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="quadratic"):
        NoiseSchedule("quadratic")
    with pytest.raises(UserError):
        NoiseSchedule("linear", 1)


def test_sample_timesteps_uniform_and_seeded():
    sched = NoiseSchedule("linear", 10)
    t1 = sched.sample_timesteps(20_000, generator=torch.Generator().manual_seed(3))
    t2 = sched.sample_timesteps(20_000, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t1, t2) and t1.dtype == torch.long
    counts = torch.bincount(t1, minlength=10).float()
    assert counts.min() > 1800 and counts.max() < 2200  # 2000 expected, sd ~42
