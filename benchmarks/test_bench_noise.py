"""Noise steps: eager PyTorch as one would write it, the same code under torch.compile, the Triton kernels.

Minimum bytes per element (element size e): q_sample with drawn eps 2e (read x0, write x_t); with
explicit eps 3e; the eps loss forward+backward 3e (read pred twice, write its gradient); a DDPM or
DDIM step with classifier-free guidance 4e (read x_t, eps_u, eps_c, write x_prev). The eager
versions precompute the schedule tables once, as diffusers does, and store eps for the loss.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import kernels
from _harness import Record, cache_note, input_sets, measure

T = 1000
ON_GPU = torch.cuda.is_available()
GPU_CASES = [((32, 3, 512, 512), torch.bfloat16), ((32, 3, 512, 512), torch.float32), ((128, 3, 32, 32), torch.float32)]
CPU_CASES = [((8, 3, 32, 32), torch.float32)]
if os.environ.get("BENCH_QUICK"):
    GPU_CASES = GPU_CASES[:1]
BYTES_PER_ELEMENT = {"q_sample": 2, "q_sample_eps": 3, "loss_fwdbwd": 3, "ddpm_cfg": 4, "ddim_cfg": 4}


class Tables:
    """fp32 per-timestep coefficients on the device (what an eager implementation keeps around)."""

    def __init__(self, device: torch.device) -> None:
        abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        beta = 1 - abar / prev
        f32 = dict(device=device, dtype=torch.float32)
        self.abar64 = abar.to(device)
        self.sqrt_abar, self.sqrt_1m = abar.sqrt().to(**f32), (1 - abar).sqrt().to(**f32)
        self.rsqrt_abar, self.sqrt_recipm1 = (1 / abar.sqrt()).to(**f32), (1 / abar - 1).sqrt().to(**f32)
        self.m1 = (beta * prev.sqrt() / (1 - abar)).to(**f32)
        self.m2 = ((1 - prev) * (1 - beta).sqrt() / (1 - abar)).to(**f32)
        self.sigma = (beta * (1 - prev) / (1 - abar)).sqrt().to(**f32)
        self.sqrt_prev, self.sqrt_1m_prev = prev.sqrt().to(**f32), (1 - prev).sqrt().to(**f32)


def _v(table: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return table[t].view(-1, 1, 1, 1)


def eager_ops(tb: Tables) -> dict:
    def q_sample(x0, t):
        eps = torch.randn_like(x0)
        return _v(tb.sqrt_abar, t) * x0 + _v(tb.sqrt_1m, t) * eps, eps

    def q_sample_eps(x0, eps, t):
        return _v(tb.sqrt_abar, t) * x0 + _v(tb.sqrt_1m, t) * eps

    def loss_fwdbwd(pred, eps):
        loss = F.mse_loss(pred.float(), eps.float())
        return torch.autograd.grad(loss, pred)

    def ddpm_cfg(x, eu, ec, t):
        eps = eu + 3.0 * (ec - eu)
        x0 = (_v(tb.rsqrt_abar, t) * x - _v(tb.sqrt_recipm1, t) * eps).clamp(-1, 1)
        return _v(tb.m1, t) * x0 + _v(tb.m2, t) * x + _v(tb.sigma, t) * torch.randn_like(x)

    def ddim_cfg(x, eu, ec, t, t_prev):  # eta = 0, t_prev = t - 1 (tables indexed by t hold abar_{t-1})
        eps = eu + 3.0 * (ec - eu)
        x0 = _v(tb.rsqrt_abar, t) * x - _v(tb.sqrt_recipm1, t) * eps
        return _v(tb.sqrt_prev, t) * x0 + _v(tb.sqrt_1m_prev, t) * eps

    return dict(q_sample=q_sample, q_sample_eps=q_sample_eps, loss_fwdbwd=loss_fwdbwd, ddpm_cfg=ddpm_cfg,
                ddim_cfg=ddim_cfg)


def fused_ops(tb: Tables) -> dict:
    def loss_fwdbwd(pred, eps):
        return torch.autograd.grad(kernels.eps_loss(pred, 7, 1), pred)

    return dict(
        q_sample=lambda x0, t: kernels.q_sample(x0, t, tb.abar64, seed=7, offset=1),
        q_sample_eps=lambda x0, eps, t: kernels.q_sample(x0, t, tb.abar64, eps),
        loss_fwdbwd=loss_fwdbwd,
        ddpm_cfg=lambda x, eu, ec, t: kernels.ddpm_step(x, eu, t, tb.abar64, eps_cond=ec, guidance_scale=3.0,
                                                         clip_x0=True, seed=7, offset=1),
        ddim_cfg=lambda x, eu, ec, t, t_prev: kernels.ddim_step(x, eu, t, t_prev, tb.abar64, eps_cond=ec,
                                                                 guidance_scale=3.0),
    )


def _inputs(op: str, shape, dtype, device):
    n = shape[0]
    t = torch.randint(1, T, (n,), device=device)
    r = lambda: torch.randn(shape, device=device, dtype=dtype)  # noqa: E731
    if op == "q_sample":
        return lambda: (r(), t)
    if op == "q_sample_eps":
        return lambda: (r(), r(), t)
    if op == "loss_fwdbwd":
        return lambda: (r().requires_grad_(), r())
    if op == "ddim_cfg":  # t_prev made here, not inside the timed call (one kernel the others lack)
        return lambda: (r(), r(), r(), t, t - 1)
    return lambda: (r(), r(), r(), t)


@pytest.mark.parametrize("variant", ["eager", "fallback", "compile", "triton"])
@pytest.mark.parametrize("op", list(BYTES_PER_ELEMENT))
@pytest.mark.parametrize("case", GPU_CASES if ON_GPU else CPU_CASES,
                         ids=lambda c: f"{'x'.join(map(str, c[0]))}-{str(c[1])[6:]}")
def test_noise_step(benchmark, device, record, monkeypatch, case, op, variant):
    shape, dtype = case
    tb = Tables(device)
    if variant == "eager":
        fn = eager_ops(tb)[op]
    elif variant == "compile":
        torch._dynamo.reset()
        fn = torch.compile(eager_ops(tb)[op], dynamic=False)
    elif variant == "fallback":
        if device.type == "cuda":
            pytest.skip("the eager fallback serves non-CUDA tensors; on CUDA the baseline is 'eager'")
        monkeypatch.setenv("GENSCALE_KERNELS", "auto")
        fn = fused_ops(tb)[op]
    else:
        if device.type != "cuda":
            pytest.skip("Triton kernels need CUDA (the CPU interpreter checks correctness, it cannot time)")
        monkeypatch.setenv("GENSCALE_KERNELS", "triton")
        fn = fused_ops(tb)[op]
    numel = torch.Size(shape).numel()
    elem = torch.tensor([], dtype=dtype).element_size()
    make = _inputs(op, shape, dtype, device)
    set_bytes = numel * elem * (BYTES_PER_ELEMENT[op] - 1)
    sets = input_sets(make, set_bytes, device)
    per_call, method = measure(benchmark, fn, sets, device)
    name = f"{op} {'x'.join(map(str, shape))} {str(dtype)[6:]}"
    record(Record("noise", name, variant, per_call, numel * elem * BYTES_PER_ELEMENT[op], method,
                  extra=dict(op=op, shape=list(shape), dtype=str(dtype), **cache_note(sets, set_bytes, device))),
           benchmark)
