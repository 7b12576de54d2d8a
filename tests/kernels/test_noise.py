"""Noise-step kernels against their closed forms (float64), and the kernels' Philox draws against
the reference (the reference itself: test_philox.py)."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels._philox import normal_like_reference

T = 1000


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def abar_table(device) -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0).to(device)


def make(shape, channels_last: bool, device, dtype=torch.float32) -> torch.Tensor:
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    return x.to(device=device, dtype=dtype)


def draws(shape, seed: int, offset: int) -> torch.Tensor:
    return normal_like_reference(shape, seed, offset, torch.float64)


def per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.double().cpu().view(-1, 1, 1, 1)


SHAPE = (3, 5, 6, 7)  # S = 42: quads straddle nothing, the last quad of each row is partial
STEPS = torch.tensor([0, 499, 999])
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


# ----------------------------------------------------------------------------- Philox itself


def test_kernel_draws_equal_the_reference_in_any_layout(device, poison):
    ref = draws(SHAPE, 77, 3)
    nchw = kernels.philox_normal(make(SHAPE, False, device), 77, 3)
    cl = kernels.philox_normal(make(SHAPE, True, device), 77, 3)
    assert rel_err(nchw, ref) <= 5e-6  # fp32 log/cos (approximate on GPUs) against float64
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl.contiguous(), nchw)  # the draw depends on the element, not the layout
    big = kernels.philox_normal(torch.empty(4, 4, 64, 64, device=device), 9, 2**40 + 1).flatten()
    assert abs(big.mean().item()) < 5 / 256 and abs(big.std().item() - 1) < 0.02


# ----------------------------------------------------------------------------- forward noising


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_q_sample_closed_form(device, poison, dtype, channels_last):
    x0 = make(SHAPE, channels_last, device, dtype)
    abar = abar_table(device)
    xt = kernels.q_sample(x0, STEPS.to(device), abar, seed=11, offset=4)
    a = per_sample(abar.cpu()[STEPS])
    expected = a.sqrt() * x0.double().cpu() + (1 - a).sqrt() * draws(SHAPE, 11, 4)
    assert xt.dtype == dtype and xt.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert rel_err(xt, expected) <= TOL[dtype]
    noise = make(SHAPE, not channels_last, device, dtype)  # explicit eps in the other layout
    xt2 = kernels.q_sample(x0, 499, abar, noise)
    a = abar.cpu()[499]
    assert rel_err(xt2, a.sqrt() * x0.double().cpu() + (1 - a).sqrt() * noise.double().cpu()) <= TOL[dtype]


def test_regenerated_eps_is_bit_identical(device):
    """The eps inside x_t, the eps philox_normal returns, and the eps the loss draws are one tensor."""
    x0 = make(SHAPE, False, device)
    abar = abar_table(device)
    eps = kernels.philox_normal(x0, 123, 7)
    assert torch.equal(kernels.q_sample(x0, STEPS.to(device), abar, seed=123, offset=7),
                       kernels.q_sample(x0, STEPS.to(device), abar, eps))
    assert kernels.eps_loss(eps, 123, 7).item() == 0.0
    assert kernels.eps_loss(eps.to(memory_format=torch.channels_last), 123, 7, kind="l1").item() == 0.0
    assert kernels.eps_loss(eps, 123, 8).item() > 1.0  # another stream is another draw


# ----------------------------------------------------------------------------- fused loss


@pytest.mark.parametrize("kind", ["l2", "l1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_eps_loss_and_gradient(device, poison, kind, dtype, channels_last):
    pred = make(SHAPE, channels_last, device, dtype).requires_grad_()
    loss = kernels.eps_loss(pred, 5, 9, kind=kind)
    (3.0 * loss).backward()
    d = pred.detach().double().cpu() - draws(SHAPE, 5, 9)
    expected = (d * d).mean() if kind == "l2" else d.abs().mean()
    grad = 3.0 * (2.0 * d if kind == "l2" else torch.sign(d)) / d.numel()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - expected.item()) <= 1e-6 * expected.item()
    assert pred.grad.dtype == dtype
    assert pred.grad.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert rel_err(pred.grad, grad) <= TOL[dtype]


# ----------------------------------------------------------------------------- reverse steps


def guided(eps, eps_cond, scale):
    e = eps.double().cpu()
    return e if eps_cond is None else e + scale * (eps_cond.double().cpu() - e)


@pytest.mark.parametrize("respaced", [False, True], ids=["t-1", "strided"])
@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "cfg"])
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("variance", ["posterior", "beta"])
def test_ddpm_step_closed_form(device, poison, cfg, clip, variance, respaced):
    x = make(SHAPE, False, device)
    eps, eps_cond = make(SHAPE, False, device), make(SHAPE, True, device) if cfg else None
    abar = abar_table(device)
    t = STEPS
    t_prev = torch.tensor([-1, 449, 979]) if respaced else t - 1
    out = kernels.ddpm_step(x, eps, t.to(device), abar, t_prev=t_prev.to(device) if respaced else None,
                            eps_cond=eps_cond, guidance_scale=2.5, clip_x0=clip, variance=variance, seed=3, offset=17)
    # Ho et al. eq. 7 with x0 predicted from eps (respaced: beta = 1 - abar_t / abar_t'); no noise
    # on the last step.
    a_t = per_sample(abar.cpu()[t])
    a_prev = per_sample(torch.where(t_prev >= 0, abar.cpu()[t_prev.clamp(min=0)], torch.ones(3, dtype=torch.float64)))
    beta = 1 - a_t / a_prev
    e = guided(eps, eps_cond, 2.5)
    xd = x.double().cpu()
    x0 = (xd - (1 - a_t).sqrt() * e) / a_t.sqrt()
    if clip:
        x0 = x0.clamp(-1, 1)
    mean = beta * a_prev.sqrt() / (1 - a_t) * x0 + (1 - a_prev) * (1 - beta).sqrt() / (1 - a_t) * xd
    var = beta if variance == "beta" else beta * (1 - a_prev) / (1 - a_t)
    sigma = var.sqrt() * (per_sample(t_prev) >= 0)
    expected = mean + sigma * draws(SHAPE, 3, 17)
    assert rel_err(out, expected) <= 1e-5
    assert torch.isfinite(out).all()
    assert rel_err(out[0], mean[0]) <= 1e-5  # t = 0: the mean alone


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("cfg", [False, True], ids=["plain", "cfg"])
@pytest.mark.parametrize("clip", [False, True], ids=["noclip", "clip"])
def test_ddim_step_closed_form(device, poison, eta, cfg, clip):
    x = make(SHAPE, True, device)
    eps, eps_cond = make(SHAPE, True, device), make(SHAPE, False, device) if cfg else None
    abar = abar_table(device)
    t, t_prev = STEPS.clone(), torch.tensor([-1, 449, 979])  # t_prev = -1: the final step, abar = 1
    t[0] = 20
    out = kernels.ddim_step(x, eps, t.to(device), t_prev.to(device), abar, eps_cond=eps_cond,
                            guidance_scale=4.0, eta=eta, clip_x0=clip, seed=8, offset=1)
    a_t = per_sample(abar.cpu()[t])
    a_p = per_sample(torch.where(t_prev >= 0, abar.cpu()[t_prev.clamp(min=0)], torch.ones(3, dtype=torch.float64)))
    e = guided(eps, eps_cond, 4.0)
    x0 = (x.double().cpu() - (1 - a_t).sqrt() * e) / a_t.sqrt()
    if clip:  # eps follows the clamped x0 (guided-diffusion's convention)
        x0 = x0.clamp(-1, 1)
        e = (x.double().cpu() - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    c1 = eta * ((1 - a_t / a_p) * (1 - a_p) / (1 - a_t)).sqrt()
    expected = a_p.sqrt() * x0 + (1 - a_p - c1**2).clamp(min=0).sqrt() * e + c1 * draws(SHAPE, 8, 1)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, expected) <= 1e-5
    assert rel_err(out[0], x0[0]) <= 1e-5  # the final step returns x0_hat


# ----------------------------------------------------------------------------- several tiles per sample

# Shapes whose launch has more than one tile along each grid axis (SHAPE above fits in one tile):
# (1,3,40,40) NCHW: 2 spatial tiles x 2 channel blocks; (2,70,2,3) channels_last: 2 channel blocks
# of 64; (1,3,33,33) channels_last: 3 spatial tiles of 512. Each tile must draw its own quads.
MULTI_TILE = [((1, 3, 40, 40), False), ((2, 70, 2, 3), True), ((1, 3, 33, 33), True)]


@pytest.mark.parametrize("shape, channels_last", MULTI_TILE, ids=["nchw-2x2", "cl-2c", "cl-3s"])
def test_multi_tile_launches_match_the_reference(device, poison, shape, channels_last):
    x = make(shape, channels_last, device)
    ref = draws(shape, 21, 6)
    assert rel_err(kernels.philox_normal(x, 21, 6), ref) <= 5e-6
    abar = abar_table(device)
    t = torch.arange(shape[0]) * 300 + 100
    a = per_sample(abar.cpu()[t])
    expected = a.sqrt() * x.double().cpu() + (1 - a).sqrt() * ref
    assert rel_err(kernels.q_sample(x, t.to(device), abar, seed=21, offset=6), expected) <= 1e-5
    pred = x.clone().requires_grad_()
    loss = kernels.eps_loss(pred, 21, 6)
    loss.backward()
    d = x.double().cpu() - ref
    assert abs(loss.item() - (d * d).mean().item()) <= 1e-6 * (d * d).mean().item()
    assert rel_err(pred.grad, 2 * d / d.numel()) <= 1e-5


def test_out_of_range_timesteps_fail_loudly(device):
    """Host-visible timesteps raise; timesteps already on the GPU poison only their sample with NaN."""
    from kernels import _noise_ops

    x = make(SHAPE, False, device)
    abar = abar_table(device)
    for bad in (T, -1, torch.tensor([0, 5, T])):
        with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
            kernels.q_sample(x, bad, abar)
    with pytest.raises(ValueError, match=r"t_prev must lie"):
        kernels.ddim_step(x, x, 10, T, abar)
    # The kernels themselves, given what a GPU-resident t could hold (no host check there):
    t = torch.tensor([T, 5, -3], device=device)
    out = _noise_ops.q_sample(x, None, t, abar, 0, 0)
    assert out[0].isnan().all() and out[2].isnan().all()
    a = abar.cpu()[5]
    assert rel_err(out[1], a.sqrt() * x[1].double().cpu() + (1 - a).sqrt() * draws(SHAPE, 0, 0)[1]) <= 1e-5
    steps = _noise_ops.ddim_step(x, x, None, 1.0, torch.tensor([10, 10, 10], device=device),
                                 torch.tensor([T, 5, -1], device=device), abar, 0.0, False, 0, 0)
    assert steps[0].isnan().all() and not steps[1:].isnan().any()


def test_float64_inputs_keep_float64_arithmetic(device):
    """float64 tensors take the float64 reference even when the Triton kernels are forced."""
    x = make(SHAPE, False, device, torch.float64)
    abar = abar_table(device)
    # float64 log/cos on a GPU and in the CPU's libm may differ in the last bits; fp32 arithmetic would
    # be ~1e-7 off.
    assert rel_err(kernels.philox_normal(x, 4, 2, dtype=torch.float64), draws(SHAPE, 4, 2)) <= 1e-14
    a = per_sample(abar.cpu()[STEPS])
    expected = a.sqrt() * x.cpu() + (1 - a).sqrt() * draws(SHAPE, 4, 2)
    assert rel_err(kernels.q_sample(x, STEPS.to(device), abar, seed=4, offset=2), expected) <= 1e-14


def test_grid_limits_give_a_clear_error(device):
    with pytest.raises(ValueError, match="at most 65535 samples"):
        kernels.q_sample(torch.zeros(65536, 1, 1, 1, device=device), 0, abar_table(device))


# ----------------------------------------------------------------------------- both backends, errors


def test_eager_fallback_matches_the_kernels(device, monkeypatch):
    x = make(SHAPE, False, device)
    eps, eps_cond = make(SHAPE, False, device), make(SHAPE, False, device)
    abar = abar_table(device)
    t = STEPS.to(device)
    calls = {
        "q_sample": lambda: kernels.q_sample(x, t, abar, seed=1, offset=2),
        "loss": lambda: kernels.eps_loss(x, 1, 2, kind="l1"),
        "ddpm": lambda: kernels.ddpm_step(x, eps, t, abar, eps_cond=eps_cond, guidance_scale=3.0, seed=1, offset=2),
        "ddim": lambda: kernels.ddim_step(x, eps, t, t - 100, abar, eta=1.0, seed=1, offset=2),
    }
    for name, call in calls.items():
        monkeypatch.setenv("GENSCALE_KERNELS", "triton")
        fast = call()
        monkeypatch.setenv("GENSCALE_KERNELS", "eager")
        assert rel_err(fast, call()) <= 1e-6, name


def test_invalid_arguments():
    x = torch.randn(2, 3, 4, 4)
    abar = abar_table("cpu")
    with pytest.raises(ValueError, match="seed"):
        kernels.q_sample(x, 3, abar, seed=-1)
    with pytest.raises(ValueError, match="shape"):
        kernels.q_sample(x, 3, abar, torch.randn(2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"t must be"):
        kernels.q_sample(x, torch.tensor([1, 2, 3]), abar)
    with pytest.raises(ValueError, match="kind"):
        kernels.eps_loss(x, 0, 0, kind="huber")
    with pytest.raises(ValueError, match="variance"):
        kernels.ddpm_step(x, x, 3, abar, variance="learned")


def test_draws_do_not_depend_on_the_tile(device, monkeypatch):
    """Kernels that draw use bigger tiles on large tensors (kernels._noise_ops._make_layout): the
    eps of an element must not change with the tile, or the loss would not regenerate q_sample's
    eps when the two launch differently (e.g. q_sample with explicit eps uses the smaller tile)."""
    shape = (2, 3, 24, 20)
    x0 = make(shape, False, device)
    abar = abar_table(device)
    t = STEPS[:2].to(device)
    results = {}
    for tile, warps in ((64, 1), (256, 2), (8192, 8)):
        monkeypatch.setenv("GENSCALE_NOISE_TILE", str(tile))
        monkeypatch.setenv("GENSCALE_NOISE_WARPS", str(warps))
        results[tile] = (kernels.philox_normal(x0, 9, 3), kernels.q_sample(x0, t, abar, seed=9, offset=3))
    monkeypatch.setenv("GENSCALE_NOISE_TILE", "64")
    eps_small_tile = results[64][0]
    monkeypatch.setenv("GENSCALE_NOISE_TILE", "8192")
    assert kernels.eps_loss(eps_small_tile, 9, 3).item() == 0.0  # regenerated with another tile
    for eps, xt in results.values():
        assert torch.equal(eps, results[64][0]) and torch.equal(xt, results[64][1])
    assert rel_err(eps_small_tile, draws(shape, 9, 3)) <= 5e-6


# ----------------------------------------------------------------------------- seeds held in tensors

BIG_SEED = 2**40 + 123  # both key words matter


def _every_draw(x, abar, seed):
    """Everything that draws, for one seed (int or tensor): draws, x_t, loss and its gradient, steps."""
    t = STEPS.to(x.device)
    pred = x.detach().clone().requires_grad_()
    loss = kernels.eps_loss(pred, seed, 5)
    loss.backward()
    return {
        "philox_normal": kernels.philox_normal(x, seed, 5),
        "q_sample": kernels.q_sample(x, t, abar, seed=seed, offset=5),
        "eps_loss": loss.detach(),
        "eps_loss grad": pred.grad,
        "ddpm": kernels.ddpm_step(x, x, t, abar, eps_cond=x.flip(0), guidance_scale=2.0, seed=seed, offset=5),
        "ddim": kernels.ddim_step(x, x, t, t - 1, abar, eta=0.5, seed=seed, offset=5),
    }


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_a_seed_tensor_draws_what_its_value_draws(device, poison, monkeypatch, backend):
    """A seed given as a tensor (int64 [1] or int32 0-d) draws bit for bit what the int draws."""
    monkeypatch.setenv("GENSCALE_KERNELS", backend)
    x = make(SHAPE, True, device)
    abar = abar_table(device)
    expected = _every_draw(x, abar, BIG_SEED)
    for seed in (torch.tensor([BIG_SEED], device=device), torch.tensor(77, dtype=torch.int32, device=device)):
        got = _every_draw(x, abar, seed)
        wanted = expected if int(seed) == BIG_SEED else _every_draw(x, abar, 77)
        for name in expected:
            assert torch.equal(got[name], wanted[name]), name
    assert rel_err(expected["philox_normal"], draws(SHAPE, BIG_SEED, 5)) <= 5e-6


def test_a_seed_tensor_changed_before_the_backward_is_refused(device):
    """The loss draws eps again from the seed tensor in its backward: a seed changed in between
    would give the gradient of another draw, so autograd refuses it."""
    pred = make(SHAPE, False, device).requires_grad_()
    seed = torch.tensor([9], device=device)
    loss = kernels.eps_loss(pred, seed, 0)
    seed.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_seed_tensors_are_checked():
    x = torch.randn(2, 3, 4, 4)
    abar = abar_table("cpu")
    for bad in (torch.tensor([1.0]), torch.tensor([1, 2]), torch.tensor([True])):
        with pytest.raises(ValueError, match="a seed tensor must hold one integer"):
            kernels.q_sample(x, 3, abar, seed=bad)
    with pytest.raises(ValueError, match=r"seed must lie in \[0, 2\*\*63\)"):
        kernels.eps_loss(x, torch.tensor([-1]))


def test_cuda_graph_replays_draw_from_the_seed_tensor(device):
    """A captured training-step fragment (noising, loss, backward) replays with whatever the seed
    tensor holds, and each replay equals the uncaptured calls with that seed."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    x0 = make((4, 3, 16, 16), True, device, torch.bfloat16)
    abar = abar_table(device)
    t = torch.tensor([0, 10, 500, 999], device=device)
    weight = torch.full((1,), 0.5, device=device, requires_grad=True)
    seed = torch.zeros(1, dtype=torch.int64, device=device)

    def fragment():
        xt = kernels.q_sample(x0, t, abar, seed=seed, offset=3)
        loss = kernels.eps_loss(xt * weight, seed, 3)
        loss.backward()
        return xt, loss

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up (compiles the kernels) outside the capture
        fragment()
    torch.cuda.current_stream(device).wait_stream(side)
    weight.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        xt_out, loss_out = fragment()
    results = []
    for value in (11, BIG_SEED):
        seed.fill_(value)
        weight.grad.zero_()
        graph.replay()
        torch.cuda.synchronize(device)
        results.append((xt_out.clone(), loss_out.clone(), weight.grad.clone()))
    for value, (xt, loss, grad) in zip((11, BIG_SEED), results):
        w = weight.detach().clone().requires_grad_()
        ref_xt = kernels.q_sample(x0, t, abar, seed=value, offset=3)
        ref_loss = kernels.eps_loss(ref_xt * w, value, 3)
        ref_loss.backward()
        assert torch.equal(xt, ref_xt) and torch.equal(loss, ref_loss) and torch.equal(grad, w.grad)
    assert not torch.equal(results[0][0], results[1][0])
