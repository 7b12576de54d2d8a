"""Host time per call: what the kernels' Python wrappers cost before any GPU work starts.

The first H100 run showed the U-Net step with the fused kernels bound by the host issuing kernels
(results/2026-11-22-h100), so the host side has its own numbers. Tiny tensors (the GPU work is
negligible), no synchronisation inside the timed loop. Variants:

* ``wrapper``: the public call with every Triton launch replaced by a no-op: planning, checks,
  allocations and autograd only. Runs on the CPU too (tensors on the CPU, the Triton path forced).
* ``triton``: the real launches (GPU only): wrapper plus Triton's launcher, GroupNorm's kernels
  launched directly after the first call (kernels/_launch.py);
* ``triton jit``: the same with every launch through the jit function (GENSCALE_TRITON_LAUNCH=jit),
  which is what the direct launches save.
* ``eager``: the same computation in plain PyTorch ops, as eager code would write it.
* ``autograd floor``: an autograd.Function that only allocates its outputs: the least any
  Python-level op with a backward costs.

Gradients are taken with ``torch.autograd.grad`` (``.backward()`` would also add into the leaves'
``.grad`` on every call after the first: extra ops in every variant; numbers measured before
2026-11-23 include them).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from _harness import Record

CALLS = 300
N, C, G, HW = 4, 128, 32, 8


def _stub_launches(monkeypatch) -> None:
    """Replace every jit kernel by an object whose launch does nothing."""
    from kernels import _group_norm_triton, _noise_triton

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for module in (_group_norm_triton, _noise_triton):
        for name, obj in vars(module).copy().items():
            if type(obj).__name__ in ("JITFunction", "InterpretedFunction"):
                monkeypatch.setattr(module, name, NoLaunch())


class _Floor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w, b)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        x, w, b = ctx.saved_tensors
        return torch.empty_like(x), torch.empty_like(w), torch.empty_like(b)


def _cases(device: torch.device) -> dict:
    x = torch.randn(N, C, HW, HW, device=device).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.ones(C, device=device, requires_grad=True)
    b = torch.zeros(C, device=device, requires_grad=True)
    dy = torch.randn_like(x)
    x0 = torch.randn(N, 3, 32, 32, device=device)
    pred = torch.randn(N, 3, 32, 32, device=device, requires_grad=True)
    t = torch.randint(0, 1000, (N,), device=device)
    abar = torch.linspace(0.999, 0.001, 1000, dtype=torch.float64, device=device)

    def gn_fwd():
        with torch.no_grad():
            kernels.group_norm_silu(x, w, b, G)

    def gn_fwdbwd():
        torch.autograd.grad(kernels.group_norm_silu(x, w, b, G), (x, w, b), dy)

    def eager_gn_fwd():
        with torch.no_grad():
            F.silu(F.group_norm(x, G, w, b))

    def eager_gn_fwdbwd():
        torch.autograd.grad(F.silu(F.group_norm(x, G, w, b)), (x, w, b), dy)

    def q_sample():
        kernels.q_sample(x0, t, abar, seed=5)

    def eager_q_sample():
        a = abar[t].float().view(-1, 1, 1, 1)
        a.sqrt() * x0 + (1 - a).sqrt() * torch.randn_like(x0)

    def loss():
        torch.autograd.grad(kernels.eps_loss(pred, 5), pred)

    def eager_loss():
        torch.autograd.grad(F.mse_loss(pred, torch.randn_like(pred)), pred)

    return {
        f"gn fwd {N}x{C}x{HW}x{HW} cl": {"wrapper": gn_fwd, "triton": gn_fwd, "triton jit": gn_fwd,
                                         "eager": eager_gn_fwd},
        f"gn fwd+bwd {N}x{C}x{HW}x{HW} cl": {"wrapper": gn_fwdbwd, "triton": gn_fwdbwd, "triton jit": gn_fwdbwd,
                                             "eager": eager_gn_fwdbwd,
                                             "autograd floor": lambda: torch.autograd.grad(_Floor.apply(x, w, b), (x, w, b), dy)},
        f"q_sample {N}x3x32x32": {"wrapper": q_sample, "triton": q_sample, "eager": eager_q_sample},
        f"eps_loss fwd+bwd {N}x3x32x32": {"wrapper": loss, "triton": loss, "eager": eager_loss},
    }


CASE_NAMES = list(_cases(torch.device("cpu")))
VARIANTS = ["wrapper", "triton", "triton jit", "eager", "autograd floor"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASE_NAMES)
def test_host_cost(benchmark, device, record, monkeypatch, case, variant):
    fns = _cases(device)[case]
    if variant not in fns:
        pytest.skip(f"no {variant} variant for {case}")
    if variant.startswith("triton") and device.type != "cuda":
        pytest.skip("real Triton launches need a CUDA GPU (the wrapper variant stubs them)")
    if variant == "triton jit":
        monkeypatch.setenv("GENSCALE_TRITON_LAUNCH", "jit")
    if variant in ("wrapper", "triton", "triton jit"):
        monkeypatch.setenv("GENSCALE_KERNELS", "triton")
        if device.type != "cuda":
            monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the forced Triton path accept CPU tensors
    if variant == "wrapper":
        _stub_launches(monkeypatch)
    fn = fns[variant]
    for _ in range(20):  # compile, caches, allocator
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)

    def round_() -> None:
        for _ in range(CALLS):
            fn()

    benchmark.pedantic(round_, rounds=5, iterations=1, warmup_rounds=1)
    per_call = benchmark.stats.stats.min / CALLS
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the launched work finishes before the next case starts
    benchmark.extra_info.update(calls_per_round=CALLS)
    record(Record("host", case, variant, per_call, 0, "host"), benchmark)
