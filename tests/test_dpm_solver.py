"""DPM-Solver++(2M) against the exact probability-flow ODE of a Gaussian prior, in float64.

For data x0 ~ N(mu, s^2) per pixel the ideal eps predictor is closed-form,
E[eps | x_t] = sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2), and the ODE maps noise to data
through the standardised coordinate: x_t = alpha_t mu + sqrt(alpha_t^2 s^2 + sigma_t^2) z for one
z per trajectory. So the exact end point of every sampler run is known, and the error of the
solver can be measured against it; a second-order solver's error falls ~4x per doubling of the
steps, a first-order one's (DDIM) ~2x.
"""
from __future__ import annotations

import math

import pytest
import torch

from genscale.diffusion.dpm_solver import dpm_solver_sample, dpm_solver_step, logsnr_timesteps
from genscale.diffusion.samplers import ddim_sample, ddim_step
from genscale.diffusion.schedule import NoiseSchedule

MU, S = 0.3, 0.2  # a narrow prior: x0_hat moves sharply near SNR 25, which is hard for coarse steps


def exact_eps_model(schedule: NoiseSchedule):
    abar = schedule.alphas_cumprod

    def model(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        a = abar[t].to(x.dtype).view(-1, *[1] * (x.dim() - 1))
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        return sigma * (x - alpha * MU) / (alpha ** 2 * S ** 2 + sigma ** 2)
    return model


def exact_end(schedule: NoiseSchedule, x_T: torch.Tensor) -> torch.Tensor:
    """Where the exact ODE takes x_T at t = 0, then the ideal x0_hat there (every sampler's last output)."""
    a_T, a_0 = float(schedule.alphas_cumprod[-1]), float(schedule.alphas_cumprod[0])
    z = (x_T - math.sqrt(a_T) * MU) / math.sqrt(a_T * S ** 2 + 1 - a_T)
    x_0 = math.sqrt(a_0) * MU + math.sqrt(a_0 * S ** 2 + 1 - a_0) * z
    return MU + math.sqrt(a_0) * S ** 2 / (a_0 * S ** 2 + 1 - a_0) * (x_0 - math.sqrt(a_0) * MU)


def errors(kind: str, steps: list[int]) -> tuple[list[float], list[float]]:
    schedule = NoiseSchedule(kind, 1000)
    x_T = torch.randn(2000, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref, model = exact_end(schedule, x_T), exact_eps_model(schedule)
    dpm = [float((dpm_solver_sample(model, x_T.shape, schedule, steps=k, x_T=x_T, clip_x0=False) - ref).abs().max())
           for k in steps]
    ddim = [float((ddim_sample(model, x_T.shape, schedule, steps=k, x_T=x_T, clip_x0=False).double() - ref).abs().max())
            for k in steps]
    return dpm, ddim


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_second_order_convergence_to_the_exact_ode(kind):
    dpm, ddim = errors(kind, [20, 40, 80])
    assert dpm[0] / dpm[1] > 3.0 and dpm[1] / dpm[2] > 3.0, dpm  # measured 3.7-4.1
    assert ddim[0] / ddim[1] < 2.5 and ddim[1] / ddim[2] < 2.5, ddim  # first order: the measure tells them apart
    assert dpm[0] < ddim[2], (dpm, ddim)  # 20 calls of DPM-Solver++ beat 80 of DDIM


def test_first_order_step_is_the_ddim_step():
    """Without a previous prediction the update is DDIM's eta = 0 step (the paper's Eq. for k = 1)."""
    g = torch.Generator().manual_seed(1)
    x_t, eps = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    for abar_t, abar_next in [(0.01, 0.2), (0.5, 0.9), (0.97, 0.9999)]:
        x0 = (x_t - math.sqrt(1 - abar_t) * eps) / math.sqrt(abar_t)
        ours, h = dpm_solver_step(x_t, x0, None, abar_t, abar_next, None)
        ref = ddim_step(x_t, eps, None, torch.tensor(abar_t, dtype=torch.float64),
                        torch.tensor(abar_next, dtype=torch.float64), clip_x0=False)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
        lam = lambda a: 0.5 * math.log(a / (1 - a))  # noqa: E731
        assert h == pytest.approx(lam(abar_next) - lam(abar_t), rel=1e-12)
    final, h = dpm_solver_step(x_t, x0, x0 + 1, 0.97, 1.0, 0.5)
    assert final is x0 and h is None  # the last step lands on x0_hat, first order


def test_two_steps_equal_ddim_with_the_same_calls():
    """With 2 steps both samplers visit T-1 and 0 and take only first-order steps."""
    schedule = NoiseSchedule("cosine", 1000)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(8, 1, 3, padding=1))
    model = lambda x, t, labels: net(x) * (1 + t.view(-1, 1, 1, 1) / 1000)  # noqa: E731
    assert logsnr_timesteps(schedule, 2) == [999, 0]
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = dpm_solver_sample(model, x_T.shape, schedule, steps=2, x_T=x_T)
        ref = ddim_sample(model, x_T.shape, schedule, steps=2, x_T=x_T)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_guidance_and_v_prediction():
    """Guidance combines the two eps halves (a model that returns the combination gives the same
    samples), and a v-predicting model gives what its eps form gives."""
    schedule = NoiseSchedule("linear", 1000)
    exact = exact_eps_model(schedule)
    shift = torch.tensor([0.0, 0.5, -0.3, 0.2], dtype=torch.float64)  # per-class offsets; class 3 = null

    def conditional(x, t, labels):
        return exact(x, t, None) + shift[labels].view(-1, 1, 1, 1)

    scale = 2.5
    labels = torch.tensor([0, 1, 2, 1])

    def combined(x, t, _):
        u, c = conditional(x, t, torch.full_like(labels, 3)), conditional(x, t, labels)
        return u + scale * (c - u)

    x_T = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    guided = dpm_solver_sample(conditional, x_T.shape, schedule, steps=12, x_T=x_T, labels=labels,
                               num_classes=3, cfg_scale=scale, clip_x0=False)
    direct = dpm_solver_sample(combined, x_T.shape, schedule, steps=12, x_T=x_T, clip_x0=False)
    torch.testing.assert_close(guided, direct, rtol=1e-12, atol=1e-12)
    plain = dpm_solver_sample(exact, x_T.shape, schedule, steps=12, x_T=x_T, clip_x0=False)
    assert (guided - plain).abs().max() > 0.1  # the shifts matter: the comparison above could fail

    def v_model(x, t, labels):  # v = alpha eps - sigma x0 with x0 = (x - sigma eps) / alpha
        a = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = exact(x, t, labels)
        return a.sqrt() * eps - (1 - a).sqrt() * (x - (1 - a).sqrt() * eps) / a.sqrt()

    via_v = dpm_solver_sample(v_model, x_T.shape, schedule, steps=12, x_T=x_T, prediction="v", clip_x0=False)
    torch.testing.assert_close(via_v, plain, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_logsnr_timesteps(kind):
    schedule = NoiseSchedule(kind, 1000)
    abar = schedule.alphas_cumprod
    lam = 0.5 * torch.log(abar / (1 - abar))
    for steps in (1, 2, 3, 10, 50, 300, 1000):
        ts = logsnr_timesteps(schedule, steps)
        assert len(ts) == steps and ts[0] == 999 and (steps == 1 or ts[-1] == 0)
        assert all(a > b for a, b in zip(ts, ts[1:]))
    # No collisions at 10 steps: after the first, the lambda gaps are the grid's to within the
    # rounding to integer timesteps (measured: 0.031 linear, 0.014 cosine; a grid of 11 points
    # instead of 10 moves every gap by ~0.11).
    ts = logsnr_timesteps(schedule, 10)
    gaps = [float(lam[b] - lam[a]) for a, b in zip(ts[1:], ts[2:])]
    step = (float(lam[0]) - max(float(lam[-1]), -5.0)) / 9
    assert all(abs(g - step) < 0.06 for g in gaps), (gaps, step)
    with pytest.raises(ValueError, match="between 1 and 1000"):
        logsnr_timesteps(schedule, 1001)


def test_second_order_on_uneven_steps():
    """On a lambda grid whose steps alternate between two sizes (r = 2, 1/2, 2, ... at every
    resolution), the multistep extrapolation must use r = h_before / h as the paper defines it to
    stay second order: ~4x less error per doubling of the steps (with r inverted: ~2x).
    Continuous abar = sigmoid(2 lambda), exact ODE of the Gaussian prior."""
    z = torch.randn(500, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def exact(abar: float) -> torch.Tensor:
        return math.sqrt(abar) * MU + math.sqrt(abar * S ** 2 + 1 - abar) * z

    def x0_hat(x: torch.Tensor, abar: float) -> torch.Tensor:
        alpha, sigma = math.sqrt(abar), math.sqrt(1 - abar)
        return (x - sigma * sigma * (x - alpha * MU) / (alpha ** 2 * S ** 2 + sigma ** 2)) / alpha

    def solve(n: int) -> float:
        hs = [1.0 + (i % 2) for i in range(n)]
        lams = [-3.0 + 6.0 * sum(hs[:i]) / sum(hs) for i in range(n + 1)]
        abars = [1 / (1 + math.exp(-2 * lam)) for lam in lams]
        x, x0_before, h_before = exact(abars[0]), None, None
        for a, a_next in zip(abars, abars[1:]):
            x0 = x0_hat(x, a)
            x, h_before = dpm_solver_step(x, x0, x0_before, a, a_next, h_before)
            x0_before = x0
        return float((x - exact(abars[-1])).abs().max())

    e40, e80, e160 = solve(40), solve(80), solve(160)  # measured 1.1e-4, 2.8e-5, 7.0e-6
    assert e40 / e80 > 3.0 and e80 / e160 > 3.0, (e40, e80, e160)


def test_the_ddpm_family_samples_with_it():
    """--sampler dpm++2m reaches the solver (its timesteps, --sampling-steps calls)."""
    from genscale.families.ddpm import Options, reverse_process
    from tests.test_applications_support import tiny_ddpm

    fam = tiny_ddpm(timesteps=50)
    seen, model_fn = [], fam._model_fn
    fam._model_fn = lambda x, t, labels: seen.append(int(t[0])) or model_fn(x, t, labels)
    out = reverse_process(fam, (2, 1, 8, 8), sampler="dpm++2m", sampling_steps=6,
                          generator=torch.Generator().manual_seed(0))
    assert seen == logsnr_timesteps(fam.schedule, 6) and out.shape == (2, 1, 8, 8)
    assert out.abs().max() <= 1.0  # pixel space: x0_hat clipped, and the last step returns it
    Options(sampler="dpm++2m").validate()
