"""torch.compile sees the kernels as custom ops: no graph breaks, same numbers, valid op registrations."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import kernels
from kernels import _group_norm_ops, _noise_custom_ops


class Block(nn.Module):
    """conv -> GroupNorm+SiLU -> conv, trained with the fused eps loss on a fused noising step."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(4, 8)
        self.conv2 = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x0: torch.Tensor, t: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
        xt = kernels.q_sample(x0, t, abar, seed=5, offset=1)
        h = kernels.group_norm_silu(self.conv1(xt), self.norm.weight, self.norm.bias, 4)
        return kernels.eps_loss(self.conv2(h), 5, 1)


def _step(model: nn.Module, device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 5, 6, generator=gen).to(device)
    abar = torch.linspace(0.999, 0.01, 50, dtype=torch.float64, device=device)
    loss = model(x0, torch.tensor([3, 40], device=device), abar)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss, list(grads)


@pytest.mark.parametrize("backend, mode", [("triton", "opaque"), ("triton", "reference"), ("eager", "reference")])
def test_fullgraph_compile_has_no_graph_breaks(device, monkeypatch, backend, mode):
    """No graph breaks and the same numbers; GroupNorm reaches the graph as the custom op with
    GENSCALE_COMPILE_KERNELS=opaque, and as PyTorch's own group_norm (for Inductor to fuse) in
    the default ``reference`` mode. The noise steps stay custom ops either way."""
    monkeypatch.setenv("GENSCALE_KERNELS", backend)
    monkeypatch.setenv("GENSCALE_COMPILE_KERNELS", mode)
    torch.manual_seed(0)
    model = Block().to(device)
    loss, grads = _step(model, device)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(*_inputs(device))
    assert explained.graph_break_count == 0
    code = "\n".join(graph.code for graph in explained.graphs)
    custom_group_norm = "genscale_kernels.group_norm_silu_fwd" in code
    assert custom_group_norm == (backend == "triton" and mode == "opaque"), code
    assert ("torch.nn.functional.group_norm" in code) != custom_group_norm
    assert ("genscale_kernels.q_sample" in code) == (backend == "triton")
    # Inductor where the custom ops run (the Triton backend on CUDA). The eager reference under
    # inductor took over 200 s to compile on an H100 machine (the unrolled int64 Philox rounds), so it
    # is traced and run through aot_eager, like the CPU cases (which need no C++ toolchain that way).
    compiler = "inductor" if device.type == "cuda" and backend == "triton" else "aot_eager"
    compiled = torch.compile(model, backend=compiler, fullgraph=True)
    closs, cgrads = _step(compiled, device)
    torch.testing.assert_close(closs, loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(cgrads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _inputs(device):
    x0 = torch.randn(2, 3, 5, 6, device=device)
    return x0, torch.tensor([3, 40], device=device), torch.linspace(0.999, 0.01, 50, dtype=torch.float64, device=device)


def test_custom_op_registrations(device):
    """torch.library.opcheck: schema, fake (meta) kernels, autograd registration, AOT dispatch."""
    x = torch.randn(2, 6, 3, 5, device=device, requires_grad=True)
    w = torch.randn(6, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    torch.library.opcheck(_group_norm_ops.group_norm_silu_fwd, (x, w, b, 3, 1e-5, True))
    torch.library.opcheck(_group_norm_ops.group_norm_silu_fwd, (x.detach(), None, None, 3, 1e-5, False))
    t = torch.tensor([1, 7], device=device)
    abar = torch.linspace(0.99, 0.05, 10, dtype=torch.float64, device=device)
    xd = x.detach()
    torch.library.opcheck(_noise_custom_ops.q_sample_op, (x, None, t, abar, 3, 4))
    torch.library.opcheck(_noise_custom_ops.eps_loss_op, (x, 3, 4, False))
    torch.library.opcheck(_noise_custom_ops.philox_normal_op, (xd, 3, 4, torch.float32))
    torch.library.opcheck(_noise_custom_ops.ddpm_step_op, (xd, xd, xd, 2.0, t, t - 1, abar, True, False, 3, 4))
    torch.library.opcheck(_noise_custom_ops.ddim_step_op, (xd, xd, None, 1.0, t, t - 1, abar, 0.5, False, 3, 4))
    seed = torch.tensor([2**40 + 3], device=device)  # the seed as a tensor (seed_t)
    torch.library.opcheck(_noise_custom_ops.q_sample_op, (x, None, t, abar, 0, 4, seed))
    torch.library.opcheck(_noise_custom_ops.eps_loss_op, (x, 0, 4, True, seed))
    torch.library.opcheck(_noise_custom_ops.eps_loss_op, (x, 0, 4, False, None, torch.rand(2, device=device)))
    torch.library.opcheck(_noise_custom_ops.eps_loss_op, (x, 0, 4, True, seed, torch.rand(2, device=device)))
    torch.library.opcheck(_noise_custom_ops.philox_normal_op, (xd, 0, 4, torch.bfloat16, seed))
    torch.library.opcheck(_noise_custom_ops.ddpm_step_op, (xd, xd, None, 1.0, t, t - 1, abar, False, True, 0, 4, seed))
    torch.library.opcheck(_noise_custom_ops.ddim_step_op, (xd, xd, xd, 2.0, t, t - 1, abar, 1.0, True, 0, 4, seed))


@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_a_seed_tensor_is_a_graph_input(device, monkeypatch, backend, weighted):
    """With the seed in a tensor, one compiled graph serves every seed (no recompiles, no graph
    breaks) and draws what the eager calls draw; also with per-sample loss weights (min-SNR)."""
    monkeypatch.setenv("GENSCALE_KERNELS", backend)
    x0, t, abar = _inputs(device)
    pred = torch.randn_like(x0, requires_grad=True)
    weight = torch.tensor([0.5, 3.0], device=device) if weighted else None

    def noisy_loss(seed):
        xt = kernels.q_sample(x0, t, abar, seed=seed, offset=2)
        return kernels.eps_loss(pred * xt, seed, 2, weight=weight)

    torch._dynamo.reset()
    compiler = "inductor" if device.type == "cuda" and backend == "triton" else "aot_eager"
    compiled = torch.compile(noisy_loss, backend=compiler, fullgraph=True, dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for value in (7, 2**40 + 9, 123):
            seed = torch.tensor([value], device=device)
            got = compiled(seed)
            (grad,) = torch.autograd.grad(got, pred)
            want = noisy_loss(seed)
            (want_grad,) = torch.autograd.grad(want, pred)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
            torch.testing.assert_close(grad, want_grad, rtol=1e-6, atol=1e-9)


def test_inline_triton_ops_under_inductor(device, monkeypatch):
    """GENSCALE_COMPILE_KERNELS=inline: GroupNorm reaches Inductor as a triton op, whose kernels
    Inductor launches from its own code (no custom-op call back into Python); same numbers, no
    graph breaks. Under the interpreter the opaque custom op is kept (and still compiles)."""
    from torch._inductor.utils import run_and_get_code

    from kernels._dispatch import compile_mode

    monkeypatch.setenv("GENSCALE_COMPILE_KERNELS", "inline")
    torch.manual_seed(0)
    model = Block().to(device)
    loss, grads = _step(model, device)
    torch._dynamo.reset()
    if device.type != "cuda":
        assert compile_mode() == "opaque"
        closs, cgrads = _step(torch.compile(model, backend="aot_eager", fullgraph=True), device)
    else:
        assert compile_mode() == "inline"
        compiled = torch.compile(model, fullgraph=True)
        (closs, cgrads), codes = run_and_get_code(lambda: _step(compiled, device))
        code = "\n".join(codes)
        assert "gn_fwd_fused" in code and "gn_bwd_fused" in code  # the kernels, in Inductor's own code
        assert "group_norm_silu_fwd_inline" not in code and "group_norm_silu_fwd(" not in code
    torch.testing.assert_close(closs, loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(cgrads, grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_compile_kernels_setting_is_checked(monkeypatch):
    from kernels._dispatch import compile_mode

    monkeypatch.delenv("GENSCALE_COMPILE_KERNELS", raising=False)
    assert compile_mode() == "reference"
    monkeypatch.setenv("GENSCALE_COMPILE_KERNELS", "fast")
    with pytest.raises(ValueError, match="GENSCALE_COMPILE_KERNELS must be reference, opaque or inline"):
        compile_mode()
