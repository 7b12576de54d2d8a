"""Second-order gradients on the torch.compile route (the torch.library ops) are refused, never a constant.

The direct route's refusal is tested in test_api_edge_cases.py. Here: the custom ops and the
triton op called eagerly (what torch.compile runs; kernels._dispatch.compiling() only picks them
while tracing) raise the same sentence; under torch.compile, aot_autograd refuses double backward
itself; and with Dynamo tracing torch.autograd.grad (trace_autograd_ops) a penalty through a
kernel fails to compile with the same sentence, while the reference GroupNorm is differentiated
twice exactly. First-order gradients, create_graph or not, match float64 PyTorch throughout.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import _group_norm_inline, _group_norm_ops, _noise_custom_ops

REFUSED = "second-order gradients through genscale's Triton kernels are not supported"
GN_OPS = {"custom_op": _group_norm_ops.group_norm_silu_fwd, "triton_op": _group_norm_inline.group_norm_silu_fwd_inline}


def _gn_inputs(device):
    gen = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 4, 3, 3, generator=gen), torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    return [t.to(device).requires_grad_() for t in (x, w, b)]


def _gn_reference(x, w, b):
    """float64 PyTorch: first-order grads of sum(y^2), and the grads of the penalty sum(dx^2) on them."""
    x64, w64, b64 = [t.detach().cpu().double().requires_grad_() for t in (x, w, b)]
    y = F.silu(F.group_norm(x64, 2, w64, b64, 1e-5))
    first = torch.autograd.grad(y.square().sum(), (x64, w64, b64), create_graph=True)
    second = torch.autograd.grad(first[0].square().sum(), (x64, w64, b64))
    return [g.detach() for g in first], list(second)


def _close(got, want):
    for g, r in zip(got, want):
        torch.testing.assert_close(g.detach().cpu().double(), r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", sorted(GN_OPS))
def test_group_norm_ops_called_eagerly_refuse_second_order(device, op):
    """Before: PyTorch's 'Trying to backward through genscale_kernels.group_norm_silu_bwd.default
    but no autograd formula was registered. Please use register_autograd to add one.'"""
    x, w, b = _gn_inputs(device)
    first, _ = _gn_reference(x, w, b)
    y = GN_OPS[op](x, w, b, 2, 1e-5, True)[0]
    _close(torch.autograd.grad(y.square().sum(), (x, w, b), retain_graph=True), first)
    grads = torch.autograd.grad(y.square().sum(), (x, w, b), create_graph=True)
    _close(grads, first)  # create_graph changes nothing in the first order
    for g in grads:
        with pytest.raises(RuntimeError, match=REFUSED):
            g.square().sum().backward(retain_graph=True)


@pytest.mark.parametrize("l1", [False, True], ids=["l2", "l1"])
@pytest.mark.parametrize("seed_kind", ["int", "tensor"])
def test_eps_loss_op_called_eagerly_refuses_second_order(device, l1, seed_kind):
    pred = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(1)).to(device).requires_grad_()
    seed = 7 if seed_kind == "int" else torch.tensor([7], device=device)
    int_seed, seed_t = _noise_custom_ops._split_seed(seed)
    eps = kernels.philox_normal(pred.detach(), 7, 2).double().cpu()
    diff = pred.detach().double().cpu() - eps
    want = (diff.sign() if l1 else 2 * diff) / pred.numel()
    (g,) = torch.autograd.grad(_noise_custom_ops.eps_loss_op(pred, int_seed, 2, l1, seed_t), pred, create_graph=True)
    torch.testing.assert_close(g.detach().cpu().double(), want, rtol=1e-5, atol=1e-7)
    with pytest.raises(RuntimeError, match=REFUSED):
        g.square().sum().backward()


def test_q_sample_op_second_order_is_exact(device):
    """q_sample's backward is a per-sample scale in plain PyTorch ops: differentiable again, exactly."""
    gen = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 2, 3, 3, generator=gen), torch.randn(2, 2, 3, 3, generator=gen)
    abar = torch.linspace(0.999, 0.01, 50, dtype=torch.float64)
    t = torch.tensor([3, 40])
    a = abar[t].view(-1, 1, 1, 1)
    x64 = x0.double().requires_grad_()
    (g64,) = torch.autograd.grad((a.sqrt() * x64 + (1 - a).sqrt() * noise.double()).square().sum(), x64,
                                 create_graph=True)
    g64.square().sum().backward()
    x = x0.to(device).requires_grad_()
    xt = _noise_custom_ops.q_sample_op(x, noise.to(device), t.to(device), abar.to(device), 0, 0)
    (g,) = torch.autograd.grad(xt.square().sum(), x, create_graph=True)
    g.square().sum().backward()
    torch.testing.assert_close(g.detach().cpu().double(), g64.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.cpu().double(), x64.grad, rtol=1e-5, atol=1e-6)


def _gn(x, w, b):
    return kernels.group_norm_silu(x, w, b, 2)


def _loss(x, w, b):
    return kernels.eps_loss(x, 7, 2)


@pytest.mark.parametrize("fn", [_gn, _loss], ids=["group_norm", "eps_loss"])
def test_compiled_kernels_refuse_double_backward(device, monkeypatch, fn):
    """torch.compile (opaque custom ops): first-order gradients under create_graph=True are right,
    and differentiating them again is aot_autograd's error (torch's own, before our ops'), not zero."""
    monkeypatch.setenv("GENSCALE_COMPILE_KERNELS", "opaque")
    x, w, b = _gn_inputs(device)
    eager = torch.autograd.grad(fn(x, w, b).square().sum(), x)[0]
    if fn is _gn:
        _close([eager], _gn_reference(x, w, b)[0][:1])
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    (g,) = torch.autograd.grad(compiled(x, w, b).square().sum(), x, create_graph=True)
    torch.testing.assert_close(g, eager, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="does not currently support double backward"):
        g.square().sum().backward()
    torch._dynamo.reset()


@pytest.mark.parametrize("fn, mode", [(_gn, "opaque"), (_loss, "reference"), (_gn, "reference")],
                         ids=["group_norm-opaque", "eps_loss", "group_norm-reference"])
def test_penalty_traced_by_dynamo(device, monkeypatch, fn, mode):
    """With Dynamo tracing torch.autograd.grad, aot_autograd differentiates the penalty in the graph:
    through a kernel's backward the compile fails with the sentence (before: PyTorch's 'no autograd
    formula was registered'); the reference GroupNorm (GENSCALE_COMPILE_KERNELS=reference, the
    default) gets the exact second order."""
    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        pytest.skip("this torch's Dynamo cannot trace torch.autograd.grad")
    monkeypatch.setenv("GENSCALE_COMPILE_KERNELS", mode)
    x, w, b = _gn_inputs(device)

    def penalty(x, w, b):
        (g,) = torch.autograd.grad(fn(x, w, b).square().sum(), x, create_graph=True)
        return g.square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(penalty, backend="aot_eager", fullgraph=True)
    try:
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            if fn is _gn and mode == "reference":
                compiled(x, w, b).backward()
                _close([x.grad, w.grad, b.grad], _gn_reference(x, w, b)[1])
            else:
                with pytest.raises(Exception, match=REFUSED):
                    compiled(x, w, b).backward()
    finally:
        torch._dynamo.reset()
