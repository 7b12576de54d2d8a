"""The sampling loops routed through the fused step kernels, against independent references.

Reference: a float64 re-implementation of the same loop with the explicit-noise steps
(genscale.diffusion.samplers.ddpm_step / ddim_step), the guidance combine written out, v -> eps
by its formula, and the step noise taken from kernels.philox_normal at the same (seed, offset)
the loop uses: x_T from the generator, then seed = randint(0, 2**62) from the same generator,
step i at offset i. The kernel loop runs in fp32, so agreement is to fp32 rounding.

The Triton kernels themselves run too: on the CPU under TRITON_INTERPRET=1 (GENSCALE_KERNELS=
triton, tiny shapes) and, marked gpu, compiled on CUDA.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # before the Triton kernels are first imported (kernels does it lazily)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import kernels  # noqa: E402
from genscale.diffusion.samplers import (ddim_sample, ddim_step, ddpm_sample, ddpm_step, draw_seed,  # noqa: E402
                                         randn, strided_timesteps)
from genscale.diffusion.schedule import NoiseSchedule  # noqa: E402
from kernels._dispatch import interpreter_active  # noqa: E402

NUM_CLASSES = 10
SIGMA = 0.25


def class_means(labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample data mean: class k has mean 0.1 (k - 4); the null label (unconditional) has 0."""
    mu = torch.where(labels == NUM_CLASSES, torch.zeros_like(labels), labels - 4).to(like.dtype) * 0.1
    return mu.to(like.device).reshape(-1, 1, 1, 1)


def oracle(sched: NoiseSchedule, prediction: str, gain: float = 1.0):
    """E[eps | x_t] for x0 ~ N(mu_label, SIGMA^2) per pixel (times ``gain``; a gain > 1 overshoots
    so that x0 clipping bites), or the matching v; works in the dtype and on the device of x."""
    def model_fn(x, t, labels):
        a = sched.alphas_cumprod[t.cpu()].to(x.dtype).to(x.device).reshape(-1, 1, 1, 1)
        mu = torch.zeros_like(a) if labels is None else class_means(labels, x)
        eps = gain * (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * SIGMA ** 2 + 1 - a)
        if prediction == "eps":
            return eps
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0
    return model_fn


def reference_loop(model_fn, shape, sched: NoiseSchedule, timesteps: list[int], sampler: str, *, gen_seed: int,
                   eta: float = 1.0, clip_x0: bool = True, labels=None, cfg_scale: float = 1.0,
                   prediction: str = "eps") -> torch.Tensor:
    """The sampling loop in float64 with explicit Philox noise; always on the CPU, eager."""
    gen = torch.Generator().manual_seed(gen_seed)
    x = torch.randn(shape, generator=gen).double()
    seed = int(torch.randint(0, 2**62, (), generator=gen))
    abar = sched.alphas_cumprod
    null = None if labels is None else torch.full_like(labels, NUM_CLASSES)
    guided = labels is not None and cfg_scale not in (0.0, 1.0)
    for i, t in enumerate(timesteps):
        last = i + 1 == len(timesteps)
        a_t, a_n = abar[t], torch.ones((), dtype=torch.float64) if last else abar[timesteps[i + 1]]
        tb = torch.full((shape[0],), t)
        if guided:
            halves = [model_fn(x, tb, labels), model_fn(x, tb, null)]
        else:
            halves = [model_fn(x, tb, null if (labels is not None and cfg_scale == 0.0) else labels)]
        if prediction == "v":
            halves = [(1 - a_t).sqrt() * x + a_t.sqrt() * v for v in halves]
        eps = halves[0] if not guided else halves[1] + cfg_scale * (halves[0] - halves[1])
        noisy = not last and (sampler == "ddpm" or eta > 0)
        noise = kernels.philox_normal(x, seed, i, dtype=torch.float64) if noisy else None
        if sampler == "ddpm":
            x = ddpm_step(x, eps, noise, a_t, a_n, clip_x0=clip_x0)
        else:
            x = ddim_step(x, eps, noise, a_t, a_n, eta=eta, clip_x0=clip_x0)
    return x


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm())


def fp32_tolerance(sched: NoiseSchedule, timesteps: list[int]) -> float:
    """What fp32 allows: x0_hat = (x_t - sqrt(1-abar_t) eps) / sqrt(abar_t) turns the rounding of
    x_t and eps (~1e-7 relative) into an error in x_{t'} amplified by kappa = sqrt(abar_t'/abar_t),
    ~570 on the first step of a strided cosine schedule (abar_{T-1} ~ 6e-8). The pre-kernel fp32
    loop, fed a model that is exact to fp64, misses this file's reference by ~6e-5 there as well."""
    abar = sched.alphas_cumprod
    kappa = max((abar[b] / abar[a]).sqrt().item() for a, b in zip(timesteps, timesteps[1:]))
    return 1e-6 + 1e-7 * kappa


def run_sampler(sampler: str, model_fn, shape, sched, device, gen_seed: int, steps, **kw) -> torch.Tensor:
    gen = torch.Generator().manual_seed(gen_seed)
    if sampler == "ddpm":
        kw.pop("eta", None)
        return ddpm_sample(model_fn, shape, sched, steps=steps, generator=gen, device=device, **kw)
    return ddim_sample(model_fn, shape, sched, steps=steps, generator=gen, device=device, **kw)


# sampler, schedule, T, steps (None: all), eta, prediction, cfg scale (None: no labels), clip, gain
CASES = [
    pytest.param("ddpm", "cosine", 60, None, 1.0, "eps", None, True, 1.0, id="ddpm-full-eps"),
    pytest.param("ddpm", "cosine", 60, None, 1.0, "v", 3.0, True, 1.0, id="ddpm-full-v-cfg"),
    pytest.param("ddpm", "linear", 200, 12, 1.0, "eps", 3.0, True, 1.4, id="ddpm-strided-eps-cfg-clipping"),
    pytest.param("ddpm", "linear", 200, 12, 1.0, "v", None, False, 1.0, id="ddpm-strided-v"),
    pytest.param("ddim", "cosine", 200, 12, 0.0, "eps", 3.0, True, 1.4, id="ddim-eta0-eps-cfg-clipping"),
    pytest.param("ddim", "cosine", 200, 12, 0.0, "v", None, True, 1.0, id="ddim-eta0-v"),
    pytest.param("ddim", "linear", 200, 12, 1.0, "eps", None, False, 1.0, id="ddim-eta1-eps"),
    pytest.param("ddim", "linear", 200, 12, 1.0, "v", 2.5, True, 1.4, id="ddim-eta1-v-cfg-clipping"),
    pytest.param("ddim", "cosine", 200, 12, 0.5, "eps", 0.0, True, 1.0, id="ddim-eta0.5-unconditional-scale0"),
]


@pytest.fixture(params=["eager", pytest.param("interp", id="triton-interp"),
                        pytest.param("cuda", id="triton-cuda", marks=pytest.mark.gpu)])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which implementation the loops' kernel calls hit: the eager reference, the Triton kernels
    on the CPU interpreter, or the Triton kernels compiled on CUDA."""
    if request.param == "eager":
        monkeypatch.setenv("GENSCALE_KERNELS", "eager")
    elif request.param == "interp":
        if not interpreter_active():
            pytest.skip("the Triton interpreter is off (CUDA present); run with TRITON_INTERPRET=1 for these")
        monkeypatch.setenv("GENSCALE_KERNELS", "triton")
    else:
        if not torch.cuda.is_available() or interpreter_active():
            pytest.skip("needs CUDA with TRITON_INTERPRET unset")
        monkeypatch.setenv("GENSCALE_KERNELS", "triton")
    return request.param


@pytest.mark.parametrize("sampler,kind,T,steps,eta,prediction,cfg,clip,gain", CASES)
def test_kernel_loop_equals_float64_reference_with_the_same_philox_noise(
        backend, monkeypatch, sampler, kind, T, steps, eta, prediction, cfg, clip, gain):
    sched = NoiseSchedule(kind, T)
    shape = (3, 2, 5, 7)  # S = 35: the last Philox quad of every row is partial
    labels = None if cfg is None else torch.tensor([1, 8, 4])
    model_fn = oracle(sched, prediction, gain)
    kw = dict(eta=eta, prediction=prediction, clip_x0=clip, labels=labels, cfg_scale=1.0 if cfg is None else cfg)
    timesteps = strided_timesteps(T, steps or T)

    with monkeypatch.context() as m:  # the reference's Philox draws come from the eager path
        m.setenv("GENSCALE_KERNELS", "eager")
        ref = reference_loop(model_fn, shape, sched, timesteps, sampler, gen_seed=11, **kw)
    device = "cuda" if backend == "cuda" else "cpu"
    out = run_sampler(sampler, model_fn, shape, sched, device, 11, steps, num_classes=NUM_CLASSES, **kw)
    assert out.shape == shape and out.dtype == torch.float32 and out.device.type == device
    assert torch.isfinite(out).all()
    err, tol = rel_err(out, ref), fp32_tolerance(sched, timesteps)
    assert err < tol, (err, tol)
    if clip and gain > 1.0:  # the overshooting model really was clipped: the final x0_hat sits at +-1
        assert (ref.abs() == 1.0).any()


def old_ddim_loop(model_fn, shape, sched, steps, gen_seed, labels, cfg_scale) -> torch.Tensor:
    """The pre-kernel DDIM loop (eta = 0) as it was: fp32, guidance combined before the step."""
    gen = torch.Generator().manual_seed(gen_seed)
    x = randn(shape, gen)
    ts = strided_timesteps(sched.timesteps, steps)
    abar = sched.alphas_cumprod
    for i, t in enumerate(ts):
        a_n = abar[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), dtype=torch.float64)
        tb = torch.full((shape[0],), t)
        u, c = model_fn(x, tb, torch.full_like(labels, NUM_CLASSES)), model_fn(x, tb, labels)
        x = ddim_step(x, u + cfg_scale * (c - u), None, abar[t], a_n, eta=0.0, clip_x0=True)
    return x


def test_ddim_eta0_is_unchanged_from_the_old_loop(monkeypatch):
    monkeypatch.setenv("GENSCALE_KERNELS", "eager")
    sched = NoiseSchedule("cosine", 1000)
    labels = torch.tensor([0, 3, 9, 5])
    model_fn = oracle(sched, "eps", gain=1.3)
    old = old_ddim_loop(model_fn, (4, 3, 8, 8), sched, 50, 21, labels, 2.0)
    new = ddim_sample(model_fn, (4, 3, 8, 8), sched, steps=50, labels=labels, num_classes=NUM_CLASSES, cfg_scale=2.0,
                      generator=torch.Generator().manual_seed(21))
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_same_seed_same_samples_other_seed_other_samples(monkeypatch, sampler):
    monkeypatch.setenv("GENSCALE_KERNELS", "eager")
    sched = NoiseSchedule("linear", 100)
    model_fn = oracle(sched, "eps")
    x_T = randn((2, 1, 6, 6), torch.Generator().manual_seed(0))
    run = lambda seed: run_sampler(sampler, model_fn, x_T.shape, sched, "cpu", seed, 20, eta=1.0, x_T=x_T)
    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a, b)
    # x_T is fixed, so only the step noise (its Philox seed comes from the generator) tells c apart.
    assert (a - c).abs().max().item() > 1e-2


def test_draw_seed_is_the_generators_next_value_in_range():
    gen = torch.Generator().manual_seed(3)
    seeds = [draw_seed(gen) for _ in range(200)]
    again = torch.Generator().manual_seed(3)
    assert seeds == [int(torch.randint(0, 2**62, (), generator=again)) for _ in range(200)]
    assert all(0 <= s < 2**62 for s in seeds) and len(set(seeds)) == 200
    assert max(seeds) > 2**61  # drawn from the whole range, not a 32-bit one


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_every_step_draws_fresh_standard_normal_noise(monkeypatch, sampler):
    """Recover each step's noise from consecutive states, z_i = (x_{i+1} - mean_i) / sigma_i, and
    check that it is N(0, 1) and uncorrelated with every other step's (no offset reused)."""
    monkeypatch.setenv("GENSCALE_KERNELS", "eager")
    sched = NoiseSchedule("linear", 300)
    base = oracle(sched, "eps")
    states = []

    def model_fn(x, t, labels):
        states.append(x.clone())
        return base(x, t, labels)

    shape, steps = (4, 3, 16, 16), 30
    out = run_sampler(sampler, model_fn, shape, sched, "cpu", 9, steps, eta=1.0, clip_x0=False)
    states.append(out)
    ts, abar = strided_timesteps(300, steps), sched.alphas_cumprod
    zs = []
    for i in range(steps - 1):  # the last step adds no noise
        x = states[i].double()
        a_t, a_n = abar[ts[i]], abar[ts[i + 1]]
        eps = base(x, torch.full((shape[0],), ts[i]), None)
        mean = ddpm_step(x, eps, None, a_t, a_n, clip_x0=False)
        sigma = ((1 - a_t / a_n) * (1 - a_n) / (1 - a_t)).sqrt()
        zs.append(((states[i + 1].double() - mean) / sigma).flatten())
    z = torch.stack(zs)
    n = z.shape[1]  # 3072 values per step: a correlation's sd under independence is 1/sqrt(n) = 0.018
    assert z.mean(1).abs().max().item() < 5 / n ** 0.5
    assert (z.std(1) - 1).abs().max().item() < 0.06
    corr = torch.corrcoef(z)
    off = corr[~torch.eye(len(zs), dtype=torch.bool)]
    assert off.abs().max().item() < 0.1  # 406 pairs: a reused stream would give a correlation of 1
