"""Samplers, their per-step math and classifier-free guidance, checked against closed forms.

The "oracle" models are the exact posterior-mean predictors for Gaussian data x0 ~ N(mu, s^2):
with them, a correct sampler must reproduce N(mu, s^2).
"""
from __future__ import annotations

import math

import pytest
import torch

from genscale.diffusion.guidance import cfg_combine, drop_labels, guided_halves, guided_prediction
from genscale.diffusion.samplers import (ddim_sample, ddim_step, ddpm_sample, ddpm_step, randn,
                                         strided_timesteps)
from genscale.diffusion.schedule import NoiseSchedule

MU, SIGMA = 0.3, 0.2


def gaussian_oracle(sched: NoiseSchedule, prediction: str = "eps"):
    """E[eps | x_t] for x0 ~ N(MU, SIGMA^2) per pixel (or the matching v)."""
    def model_fn(x, t, labels):
        a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1).to(x.dtype)
        eps = (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * SIGMA ** 2 + 1 - a)
        if prediction == "eps":
            return eps
        return sched.v_target(sched.predict_x0(x, t, eps), t, eps)
    return model_fn


def test_strided_timesteps_hit_the_intended_steps():
    assert strided_timesteps(100, 5) == [99, 74, 50, 25, 0]  # 0, 24.75, 49.5, 74.25, 99 rounded half up
    assert strided_timesteps(10, 10) == list(range(9, -1, -1))
    assert strided_timesteps(1000, 2) == [999, 0]
    assert strided_timesteps(1000, 1) == [999]
    ts = strided_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0
    assert set(a - b for a, b in zip(ts, ts[1:])) <= {20, 21}  # 999/49 = 20.39
    for T, K in [(1000, 999), (37, 36), (1000, 333)]:
        ts = strided_timesteps(T, K)
        assert len(set(ts)) == K and ts == sorted(ts, reverse=True)
    with pytest.raises(ValueError):
        strided_timesteps(10, 11)


def test_cfg_combine():
    u, c = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    assert torch.equal(cfg_combine(u, c, 1.0), c)
    assert torch.equal(cfg_combine(u, c, 0.0), u)
    torch.testing.assert_close(cfg_combine(u, c, 3.0), torch.tensor([7.0, 5.5]))


def test_guided_prediction_runs_one_batched_call_with_the_null_label():
    calls = []

    def model_fn(x, t, labels):
        calls.append((x.shape[0], None if labels is None else labels.tolist()))
        return x * 0 + labels.float().reshape(-1, 1) if labels is not None else x * 0 - 1

    x, t = torch.zeros(3, 2), torch.tensor([5, 5, 5])
    labels = torch.tensor([0, 1, 2])
    out = guided_prediction(model_fn, x, t, labels, num_classes=10, cfg_scale=2.0)
    assert calls == [(6, [0, 1, 2, 10, 10, 10])]
    torch.testing.assert_close(out, (10 + 2.0 * (labels.float() - 10)).reshape(-1, 1).expand(3, 2))
    calls.clear()
    torch.testing.assert_close(guided_prediction(model_fn, x, t, labels, 10, 1.0), labels.float()[:, None].expand(3, 2))
    guided_prediction(model_fn, x, t, None, 10, 4.0)
    assert calls == [(3, [0, 1, 2]), (3, None)]


def test_guided_halves_returns_unconditional_first_from_one_batched_call():
    calls = []

    def model_fn(x, t, labels):
        calls.append(None if labels is None else labels.tolist())
        return x * 0 + (labels.float().reshape(-1, 1) if labels is not None else -1.0)

    x, t, labels = torch.zeros(3, 2), torch.tensor([5, 5, 5]), torch.tensor([0, 1, 2])
    u, c = guided_halves(model_fn, x, t, labels, num_classes=10, cfg_scale=2.0)
    assert calls == [[0, 1, 2, 10, 10, 10]]
    assert torch.equal(u, torch.full((3, 2), 10.0)) and torch.equal(c, labels.float()[:, None].expand(3, 2))
    calls.clear()
    for scale, expected in ((1.0, labels.float()[:, None].expand(3, 2)), (0.0, torch.full((3, 2), 10.0))):
        u, c = guided_halves(model_fn, x, t, labels, 10, scale)
        assert c is None and torch.equal(u, expected)
    u, c = guided_halves(model_fn, x, t, None, 10, 4.0)
    assert c is None and torch.equal(u, torch.full((3, 2), -1.0))
    assert calls == [[0, 1, 2], [10, 10, 10], None]
    with pytest.raises(ValueError, match="num_classes"):
        guided_halves(model_fn, x, t, labels, 0, 2.0)


def test_drop_labels():
    labels = torch.arange(10).repeat(2000) % 10
    labels[:5] = -1
    dropped = drop_labels(labels, 10, p=0.1, generator=torch.Generator().manual_seed(0))
    assert (dropped[:5] == 10).all()
    kept = dropped[5:] == labels[5:]
    assert ((dropped[5:] == 10) | kept).all()
    assert abs((~kept).float().mean().item() - 0.1) < 0.015
    assert torch.equal(dropped, drop_labels(labels, 10, 0.1, torch.Generator().manual_seed(0)))


def test_ddpm_step_is_the_posterior():
    sched = NoiseSchedule("cosine", 100)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 3, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(4, 1, 3, 3, generator=gen, dtype=torch.float64)
    z = torch.randn(4, 1, 3, 3, generator=gen, dtype=torch.float64)
    for step in (1, 40, 99):
        t = torch.full((4,), step)
        xt = sched.q_sample(x0, t, eps)
        a, a_prev = sched.alphas_cumprod[step], sched.alphas_cumprod[step - 1]
        mean, var, _ = sched.posterior(x0, xt, t)
        out = ddpm_step(xt, eps, z, a, a_prev, clip_x0=False)
        torch.testing.assert_close(out, mean + var.sqrt() * z, rtol=1e-9, atol=1e-9)
    # The final step (abar_prev = 1) returns x0_hat itself, here clipped to [-1, 1].
    xt = sched.q_sample(x0, torch.zeros(4, dtype=torch.long), eps)
    out = ddpm_step(xt, eps, None, sched.alphas_cumprod[0], torch.ones((), dtype=torch.float64))
    torch.testing.assert_close(out, x0.clamp(-1, 1), rtol=1e-9, atol=1e-9)


def test_ddim_step_exact_eps_lands_on_the_forward_process_and_eta1_is_ddpm():
    sched = NoiseSchedule("linear", 1000)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 1, 3, 3, generator=gen, dtype=torch.float64) * 2 - 1
    eps = torch.randn(4, 1, 3, 3, generator=gen, dtype=torch.float64)
    z = torch.randn(4, 1, 3, 3, generator=gen, dtype=torch.float64)
    abar = sched.alphas_cumprod
    t, t_next = 800, 500
    xt = sched.q_sample(x0, torch.full((4,), t), eps)
    # eta = 0 with the true eps moves along the same noise: x_{t'} = q_sample(x0, t', eps).
    out = ddim_step(xt, eps, None, abar[t], abar[t_next], eta=0.0)
    torch.testing.assert_close(out, sched.q_sample(x0, torch.full((4,), t_next), eps), rtol=1e-9, atol=1e-9)
    # eta = 1 over one DDPM step is the ancestral step, with or without clipping.
    eps_hat = eps * 1.7  # a poor prediction, so that clipping matters
    for clip in (False, True):
        for step in (1, 300, 999):
            a, ap = abar[step], abar[step - 1]
            torch.testing.assert_close(ddim_step(xt, eps_hat, z, a, ap, eta=1.0, clip_x0=clip),
                                       ddpm_step(xt, eps_hat, z, a, ap, clip_x0=clip), rtol=1e-9, atol=1e-9)


def exact_output_law(sched: NoiseSchedule, timesteps: list[int], eta: float) -> tuple[float, float]:
    """Mean and std of the sampler's output, propagated exactly: with the Gaussian oracle every
    step is affine in x plus independent noise, x' = A x + B + c1 z (float64 scalar recursion)."""
    abar = sched.alphas_cumprod.tolist()
    mean, var = 0.0, 1.0
    for i, t in enumerate(timesteps):
        a = abar[t]
        an = abar[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        k = math.sqrt(1 - a) / (a * SIGMA ** 2 + 1 - a)  # eps_hat = k x - k sqrt(a) MU
        x0_x, x0_1 = (1 - math.sqrt(1 - a) * k) / math.sqrt(a), math.sqrt(1 - a) * k * MU
        c1 = eta * math.sqrt(max((1 - a / an) * (1 - an) / (1 - a), 0.0))
        ce = math.sqrt(max(1 - an - c1 ** 2, 0.0))
        A = math.sqrt(an) * x0_x + ce * k
        B = math.sqrt(an) * x0_1 - ce * k * math.sqrt(a) * MU
        mean, var = A * mean + B, A * A * var + c1 ** 2
    return mean, math.sqrt(var)


@pytest.mark.parametrize("sampler,kind,T,steps,eta,prediction", [
    ("ddpm", "cosine", 100, None, 1.0, "eps"),
    ("ddpm", "cosine", 100, None, 1.0, "v"),
    ("ddpm", "linear", 1000, None, 1.0, "eps"),
    ("ddim", "linear", 1000, 50, 0.0, "eps"),
    ("ddim", "linear", 1000, 50, 1.0, "v"),
    ("ddim", "cosine", 1000, 1000, 0.0, "eps"),
])
def test_sampler_output_law_on_gaussian_data(sampler, kind, T, steps, eta, prediction):
    sched = NoiseSchedule(kind, T)
    gen = torch.Generator().manual_seed(2)
    model_fn, shape = gaussian_oracle(sched, prediction), (64, 1, 16, 16)
    if sampler == "ddpm":
        x = ddpm_sample(model_fn, shape, sched, prediction=prediction, clip_x0=False, generator=gen, steps=steps)
    else:
        x = ddim_sample(model_fn, shape, sched, steps=steps, eta=eta, prediction=prediction, clip_x0=False,
                        generator=gen)
    assert x.shape == shape and x.dtype == torch.float32
    mean, std = exact_output_law(sched, strided_timesteps(T, steps or T), eta)
    # 16384 values: the sample mean is within ~0.002 and the sample std within ~0.6% (1 sd).
    assert x.mean().item() == pytest.approx(mean, abs=0.01)
    assert x.std().item() == pytest.approx(std, rel=0.025)
    if (steps or T) >= 1000:  # many steps: the data law itself (N(MU, SIGMA^2)) is recovered
        assert std == pytest.approx(SIGMA, rel=0.025)


def test_respaced_ddpm_matches_ddim_eta1():
    sched = NoiseSchedule("cosine", 200)
    kwargs = dict(clip_x0=True, steps=20)
    a = ddpm_sample(gaussian_oracle(sched), (2, 1, 4, 4), sched, generator=torch.Generator().manual_seed(4), **kwargs)
    b = ddim_sample(gaussian_oracle(sched), (2, 1, 4, 4), sched, eta=1.0, generator=torch.Generator().manual_seed(4),
                    **kwargs)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_ddim_eta0_is_deterministic_given_start_noise():
    sched = NoiseSchedule("cosine", 1000)
    x_T = randn((3, 1, 8, 8), torch.Generator().manual_seed(5))
    outs = [ddim_sample(gaussian_oracle(sched), x_T.shape, sched, steps=10, x_T=x_T,
                        generator=torch.Generator().manual_seed(seed)) for seed in (0, 1)]
    assert torch.equal(outs[0], outs[1])
    other = ddim_sample(gaussian_oracle(sched), x_T.shape, sched, steps=10, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(outs[0], other)


def test_same_seed_same_samples_and_labels_reach_the_model():
    sched = NoiseSchedule("linear", 50)
    seen = []

    def model_fn(x, t, labels):
        seen.append(labels)
        base = gaussian_oracle(sched)(x, t, labels)
        return base + 0.1 * (labels.float().reshape(-1, 1, 1, 1) - 5)

    labels = torch.tensor([1, 7])
    run = lambda seed: ddpm_sample(model_fn, (2, 1, 4, 4), sched, labels=labels, num_classes=10, cfg_scale=3.0,
                                   generator=torch.Generator().manual_seed(seed), progress=False)
    a, b, c = run(6), run(6), run(7)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(seen) == 3 * 50 and all(s.tolist() == [1, 7, 10, 10] for s in seen)
    assert a.abs().max().item() <= 1.0  # clip_x0 keeps the final x0_hat in range
