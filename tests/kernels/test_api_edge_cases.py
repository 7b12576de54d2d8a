"""The public kernels at the edges of their input domain: layouts of the parameters and the schedule,
NaN, invalid arguments, second-order gradients, empty tensors. Both backends give the same answer
(or the same error), checked against float64 formulas where there is an answer.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kernels

T = 20
BACKENDS = ["triton", "eager"]


def abar_table(device="cpu") -> torch.Tensor:
    return torch.cumprod(1.0 - torch.linspace(1e-2, 0.2, T, dtype=torch.float64), 0).to(device)


def randn(*shape, device="cpu", requires_grad=False) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64).float().to(device).requires_grad_(requires_grad)


# ----------------------------------------------------------------------------- GroupNorm parameters


def test_strided_and_expanded_weight_and_bias_match_float64(device):
    """Columns of a [C, 2] matrix (stride 2) and an expanded scalar (stride 0) as weight and bias:
    the kernels used to read them as dense vectors."""
    x = randn(2, 4, 3, 3, device=device, requires_grad=True)
    wb = randn(4, 2, device=device, requires_grad=True)
    dy = randn(2, 4, 3, 3, device=device)
    y = kernels.group_norm_silu(x, wb[:, 0], wb[:, 1], 2)
    y.backward(dy)
    x64, wb64 = x.detach().double().requires_grad_(), wb.detach().double().requires_grad_()
    ref = F.silu(F.group_norm(x64, 2, wb64[:, 0], wb64[:, 1], 1e-5))
    ref.backward(dy.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wb.grad.double(), wb64.grad, rtol=1e-5, atol=1e-6)

    scale = torch.tensor(0.5, device=device)
    y = kernels.group_norm_silu(x.detach(), scale.expand(4), None, 2, activation=None)
    torch.testing.assert_close(y.double(), 0.5 * F.group_norm(x.detach().double(), 2), rtol=1e-5, atol=1e-6)


def test_group_norm_argument_types_are_checked():
    x = torch.randn(2, 4, 3, 3)
    for groups in (True, 2.0, torch.tensor(2)):
        with pytest.raises(TypeError, match="num_groups must be an integer"):
            kernels.group_norm_silu(x, None, None, groups)
    for eps in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            kernels.group_norm_silu(x, None, None, 2, eps=eps)
    assert kernels.group_norm_silu(x, None, None, np.int64(2), eps=0).shape == x.shape
    with pytest.raises(ValueError, match="weight must be a floating tensor"):
        kernels.group_norm_silu(x, torch.ones(4, dtype=torch.int64), None, 2)
    with pytest.raises(ValueError, match="bias is on meta but the input is on cpu"):
        kernels.group_norm_silu(x, None, torch.zeros(4, device="meta"), 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs_give_empty_outputs(device, monkeypatch, backend):
    monkeypatch.setenv("GENSCALE_KERNELS", backend)
    for shape, groups in (((2, 0, 3, 3), 1), ((2, 4, 0, 3), 2), ((0, 4, 3, 3), 2)):
        x = torch.zeros(shape, device=device)
        assert kernels.group_norm_silu(x, None, None, groups).shape == shape
    assert math.isnan(float(kernels.eps_loss(torch.zeros(0, 2, 2, 2, device=device), 1)))


# ----------------------------------------------------------------------------- the schedule


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_strided_schedule_is_read_as_its_values(device, monkeypatch, backend):
    """A respaced schedule as a view (abar[::2], float64 on the device: what the README asks for)."""
    monkeypatch.setenv("GENSCALE_KERNELS", backend)
    sub = abar_table(device)[::2]
    x0, noise = randn(2, 2, 3, 3, device=device), randn(2, 2, 3, 3, device=device)
    t = torch.tensor([3, 7])
    a = sub.cpu()[t].view(-1, 1, 1, 1)
    expected = a.sqrt() * x0.double().cpu() + (1 - a).sqrt() * noise.double().cpu()
    torch.testing.assert_close(kernels.q_sample(x0, t, sub, noise).double().cpu(), expected, rtol=1e-5, atol=1e-6)
    dense = sub.contiguous()
    for step in (lambda table: kernels.ddim_step(x0, noise, t, t - 2, table, eta=0.5, seed=3),
                 lambda table: kernels.ddpm_step(x0, noise, t, table, seed=3)):
        assert torch.equal(step(sub), step(dense))


def test_schedule_values_and_dtypes_are_checked():
    x = torch.randn(2, 2, 3, 3)
    abar = abar_table()
    for bad in (abar * 2, -abar, torch.full((T,), math.nan, dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"alphas_cumprod must lie in \[0, 1\]"):
            kernels.q_sample(x, 3, bad)
    with pytest.raises(ValueError, match="alphas_cumprod must be a 1-D floating tensor"):
        kernels.q_sample(x, 3, torch.ones(T, dtype=torch.int64))


# ----------------------------------------------------------------------------- reverse steps


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipping_keeps_a_nan_prediction(device, monkeypatch, backend):
    """torch.clamp keeps NaN; Triton's min/max drop it by default, which turned a diverged model's
    NaN into a plausible pixel."""
    monkeypatch.setenv("GENSCALE_KERNELS", backend)
    x, eps = randn(1, 2, 2, 2, device=device), randn(1, 2, 2, 2, device=device)
    eps[0, 0, 0, 0] = math.nan
    abar = abar_table(device)
    for out in (kernels.ddim_step(x, eps, 5, 3, abar, clip_x0=True),
                kernels.ddpm_step(x, eps, 5, abar, clip_x0=True, seed=1)):
        assert out[0, 0, 0, 0].isnan() and out.flatten()[1:].isfinite().all()


def test_step_scalars_must_be_finite():
    x, abar = torch.randn(1, 2, 2, 2), abar_table()
    for eta in (math.nan, math.inf, -0.5):
        with pytest.raises(ValueError, match="eta must be a finite number and >= 0"):
            kernels.ddim_step(x, x, 5, 3, abar, eta=eta)
    with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
        kernels.ddpm_step(x, x, 5, abar, eps_cond=x, guidance_scale=math.nan)


def test_a_step_towards_more_noise_is_refused():
    x, abar = torch.randn(2, 2, 2, 2), abar_table()
    with pytest.raises(ValueError, match=r"t_prev must not exceed t .* got t=2, t_prev=7 for sample 1"):
        kernels.ddim_step(x, x, torch.tensor([9, 2]), 7, abar)
    with pytest.raises(ValueError, match="t_prev must not exceed t"):
        kernels.ddpm_step(x, x, 2, abar, t_prev=7)
    same = kernels.ddim_step(x, x, 4, 4, abar)  # t_prev == t: the identity step
    torch.testing.assert_close(same, x, rtol=1e-5, atol=1e-6)


def test_unchecked_timesteps_give_nan_in_both_backends(device, monkeypatch):
    """Where the host cannot check t (on the GPU, or while torch.compile traces), a sample whose t is
    outside the table, or whose t_prev lies after t, comes out NaN; the reference used to index
    abar[-1] from the end of the table."""
    from kernels import _noise_ops

    x, eps = randn(3, 2, 2, 2, device=device), randn(3, 2, 2, 2, device=device)
    abar = abar_table(device)
    t, t_prev = torch.tensor([-1, 9, 9], device=device), torch.tensor([-1, 12, 4], device=device)
    outs = {"triton q_sample": _noise_ops.q_sample(x, None, t, abar, 0, 0),
            "triton ddim": _noise_ops.ddim_step(x, eps, None, 1.0, t, t_prev, abar, 0.0, False, 0, 0),
            "triton ddpm": _noise_ops.ddpm_step(x, eps, None, 1.0, t, t_prev, abar, False, False, 0, 0)}
    monkeypatch.setenv("GENSCALE_KERNELS", "eager")
    traced = {"q_sample": lambda x, t: kernels.q_sample(x, t, abar, seed=0),
              "ddim": lambda x, t: kernels.ddim_step(x, eps, t, t_prev, abar),
              "ddpm": lambda x, t: kernels.ddpm_step(x, eps, t, abar, t_prev=t_prev)}
    for name, fn in traced.items():
        outs["eager " + name] = torch.compile(fn, backend="eager", fullgraph=True)(x, t)
    torch._dynamo.reset()
    for name, out in outs.items():
        assert out[0].isnan().all(), name  # t = -1
        if "q_sample" in name:
            assert out[1:].isfinite().all(), name
        else:  # t_prev = 12 lies after t = 9; t_prev = 4 is an ordinary step
            assert out[1].isnan().all() and out[2].isfinite().all(), name


def test_steps_that_need_gradients_take_the_differentiable_reference(device):
    """The Triton steps have no backward: a call whose inputs require grad is computed by the
    reference, so d out / d eps is the closed form (DDIM, eta = 0: sqrt(1 - a') - sqrt(a') sqrt(1 - a) / sqrt(a))."""
    x, abar = randn(2, 2, 2, 2, device=device), abar_table(device)
    eps = randn(2, 2, 2, 2, device=device, requires_grad=True)
    t, t_prev = torch.tensor([9, 5]), torch.tensor([4, -1])
    out = kernels.ddim_step(x, eps, t, t_prev, abar)
    out.sum().backward()
    a, a_p = abar.cpu()[t], torch.where(t_prev >= 0, abar.cpu()[t_prev.clamp(min=0)], torch.ones(2, dtype=torch.float64))
    slope = (1 - a_p).sqrt() - a_p.sqrt() * (1 - a).sqrt() / a.sqrt()
    torch.testing.assert_close(eps.grad.double().cpu(), slope.view(-1, 1, 1, 1).expand(2, 2, 2, 2), rtol=1e-5, atol=1e-6)

    table = abar.clone().requires_grad_()
    x0, noise = randn(2, 2, 2, 2, device=device), randn(2, 2, 2, 2, device=device)
    kernels.q_sample(x0, t, table, noise).sum().backward()
    a4 = a.view(-1, 1, 1, 1)
    d_at = (x0.double().cpu() / (2 * a4.sqrt()) - noise.double().cpu() / (2 * (1 - a4).sqrt())).sum((1, 2, 3))
    torch.testing.assert_close(table.grad.cpu()[t], d_at, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- gradients, seeds, dtypes


def test_second_order_gradients_are_refused_not_dropped(device):
    """The kernels' backward passes are not differentiable themselves; a gradient penalty built on
    them used to get a constant (silently wrong) instead of an error."""
    x = randn(2, 4, 3, 3, device=device, requires_grad=True)
    (g,) = torch.autograd.grad(kernels.group_norm_silu(x, None, None, 2).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="second-order gradients through genscale's Triton kernels"):
        g.square().sum().backward()
    p = randn(1, 2, 2, 2, device=device, requires_grad=True)
    (g,) = torch.autograd.grad(kernels.eps_loss(p, 3), p, create_graph=True)
    with pytest.raises(RuntimeError, match="second-order gradients through genscale's Triton kernels"):
        g.square().sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeds_and_offsets_must_be_integers(device, monkeypatch, backend):
    monkeypatch.setenv("GENSCALE_KERNELS", backend)
    like = torch.zeros(1, 2, 2, 2, device=device)
    for seed in (1.7, "5", True):
        with pytest.raises(TypeError, match="seed must be an integer"):
            kernels.philox_normal(like, seed)
    for offset in (2.5, torch.tensor(2)):
        with pytest.raises(TypeError, match="offset must be an integer"):
            kernels.philox_normal(like, 1, offset)
    assert torch.equal(kernels.philox_normal(like, np.int64(5), np.int32(2)), kernels.philox_normal(like, 5, 2))


def test_noise_inputs_must_be_floating_tensors_on_the_same_device():
    x, abar = torch.randn(1, 2, 2, 2), abar_table()
    with pytest.raises(ValueError, match="noise must be a floating tensor"):
        kernels.q_sample(x, 3, abar, torch.ones(1, 2, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="eps_cond is on meta but the input is on cpu"):
        kernels.ddpm_step(x, x, 3, abar, eps_cond=torch.zeros(1, 2, 2, 2, device="meta"))
    with pytest.raises(ValueError, match="t must be an int or an integer tensor"):
        kernels.q_sample(x, torch.tensor([True]), abar)
    with pytest.raises(ValueError, match="philox_normal draws floating-point numbers"):
        kernels.philox_normal(x, 1, dtype=torch.int32)


def test_tuning_overrides_name_the_bad_variable(device, monkeypatch):
    x = torch.randn(2, 4, 3, 3, device=device)
    monkeypatch.setenv("GENSCALE_GN_GROUP_BLOCK", "3")
    with pytest.raises(ValueError, match="GENSCALE_GN_GROUP_BLOCK must be a positive power of two; got 3"):
        kernels.group_norm_silu(x, None, None, 2)
    monkeypatch.delenv("GENSCALE_GN_GROUP_BLOCK")
    monkeypatch.setenv("GENSCALE_GN_PATH", "split")
    monkeypatch.setenv("GENSCALE_GN_SPLIT", "abc")
    with pytest.raises(ValueError, match="GENSCALE_GN_SPLIT must be an integer; got 'abc'"):
        kernels.group_norm_silu(x, None, None, 2)


def test_int_timesteps_are_made_on_the_device_without_a_copy(monkeypatch):
    """A copy from host memory to the GPU waits for the stream: a sampler passing t_prev as an int
    synchronised with the GPU at every step. Ints are now filled on the device (no Tensor.to)."""
    from kernels import noise

    def no_copies(self, *args, **kwargs):
        raise AssertionError("an int timestep was copied to the device")

    monkeypatch.setattr(torch.Tensor, "to", no_copies)
    t = noise._steps(7, 3, torch.device("meta"), T, "t_prev", final_ok=True)
    assert t.device.type == "meta" and t.shape == (3,) and t.dtype == torch.int64
    assert torch.equal(noise._steps(-1, 2, torch.device("cpu"), T, "t_prev", final_ok=True), torch.tensor([-1, -1]))
