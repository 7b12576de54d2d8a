"""Backend dispatch: GENSCALE_KERNELS, the CPU fallback, and the errors a wrong setting gives."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import _dispatch, _group_norm_ops, _noise_custom_ops, _noise_ops
from kernels._dispatch import use_triton


def _forbid_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("the Triton path was taken")

    monkeypatch.setattr(_group_norm_ops, "forward", boom)  # the launchers, custom op or not
    monkeypatch.setattr(_noise_ops, "q_sample", boom)


@pytest.mark.parametrize("mode", ["", "auto", "eager"])
def test_cpu_tensors_use_the_eager_reference(monkeypatch, mode):
    monkeypatch.setenv("GENSCALE_KERNELS", mode)
    _forbid_triton(monkeypatch)
    x = torch.randn(2, 4, 3, 3)
    assert not use_triton(x)
    kernels.group_norm_silu(x, None, None, 2)
    kernels.q_sample(x, 0, torch.linspace(0.99, 0.01, 10, dtype=torch.float64), seed=1)


class _CudaTensorStandIn:
    """What use_triton reads of a CUDA tensor, for a machine without one."""
    is_cuda = True


def test_eager_mode_wins_even_on_cuda(monkeypatch):
    monkeypatch.setattr(_dispatch, "triton_importable", lambda: True)
    cuda_like = _CudaTensorStandIn()
    monkeypatch.setenv("GENSCALE_KERNELS", "auto")
    assert use_triton(cuda_like)  # the control: without the setting this call goes to Triton
    monkeypatch.setenv("GENSCALE_KERNELS", "eager")
    assert not use_triton(cuda_like)


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("GENSCALE_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels.group_norm_silu(torch.randn(1, 4, 2, 2), None, None, 2)


def test_unknown_mode_is_rejected(monkeypatch):
    monkeypatch.setenv("GENSCALE_KERNELS", "cuda")
    with pytest.raises(ValueError, match="GENSCALE_KERNELS"):
        kernels.group_norm_silu(torch.randn(1, 4, 2, 2), None, None, 2)


def test_forced_triton_takes_the_triton_launcher(device, monkeypatch):
    calls = []
    real = _group_norm_ops.forward

    def spy(*args):
        calls.append(args[3])
        return real(*args)

    monkeypatch.setattr(_group_norm_ops, "forward", spy)
    kernels.group_norm_silu(torch.randn(1, 4, 2, 2, device=device), None, None, 2)
    assert calls == [2]


def test_direct_calls_equal_the_custom_ops(device):
    """Eager calls skip the custom-op dispatch (host time); values and gradients must not change."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 3, device=device).contiguous(memory_format=torch.channels_last)
    w, b, dy = torch.randn(6, device=device), torch.randn(6, device=device), torch.randn_like(x)
    results = []
    for direct in (True, False):
        xs, ws, bs = (v.detach().requires_grad_() for v in (x, w, b))
        if direct:
            y = kernels.group_norm_silu(xs, ws, bs, 3)
        else:
            y = _group_norm_ops.group_norm_silu_fwd(xs, ws, bs, 3, 1e-5, True)[0]
        y.backward(dy)
        abar = torch.linspace(0.999, 0.01, 50, dtype=torch.float64, device=device)
        t = torch.tensor([3, 40], device=device)
        x0 = x.detach().requires_grad_()
        if direct:
            xt = kernels.q_sample(x0, t, abar, seed=4, offset=5)
            loss = kernels.eps_loss(xt, 4, 5)
            step = kernels.ddpm_step(x, dy, t, abar, seed=1, offset=2)
        else:
            xt = _noise_custom_ops.q_sample_op(x0, None, t, abar, 4, 5)
            loss = _noise_custom_ops.eps_loss_op(xt, 4, 5, False)
            step = _noise_custom_ops.ddpm_step_op(x, dy, None, 1.0, t, t - 1, abar, False, False, 1, 2)
        loss.backward()
        results.append([y, xs.grad, ws.grad, bs.grad, xt, loss, x0.grad, step])
    for direct, op in zip(*results):
        assert torch.equal(direct, op)
    assert results[0][0].is_contiguous(memory_format=torch.channels_last)


_LATE_INTERPRETER = r"""
import os, sys
import torch._dynamo  # imports triton before TRITON_INTERPRET is set, as a test runner may
assert "triton" in sys.modules
os.environ.update(TRITON_INTERPRET="1", GENSCALE_KERNELS="triton", GENSCALE_GN_BLOCK_S="4", GENSCALE_GN_SPLIT="2")
import torch, torch.nn.functional as F
import kernels
x = torch.randn(2, 8, 3, 5, requires_grad=True)
ref = F.silu(F.group_norm(x.double(), 4))
for path in ("fused", "looped", "split"):
    os.environ["GENSCALE_GN_PATH"] = path
    y = kernels.group_norm_silu(x, None, None, 4)
    y.sum().backward()
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-5, path
eps = kernels.philox_normal(x.detach(), 1, 2)
assert kernels.eps_loss(eps, 1, 2).item() == 0.0
print("ok")
"""


def test_kernels_run_when_triton_was_imported_before_the_interpreter_flag():
    """triton.language's own jit helpers (tl.sum, tl.zeros) break in that order; ours avoid them."""
    if torch.cuda.is_available():
        pytest.skip("checks the CPU interpreter")
    out = subprocess.run([sys.executable, "-c", _LATE_INTERPRETER], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[2],
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_env_values_follow_os_environ(monkeypatch):
    """The cheap environment read behind the per-call keys sees what os.environ sees: unset, set,
    changed, deleted and non-ASCII values."""
    from kernels._dispatch import env_values

    names = ("GENSCALE_TEST_A", "GENSCALE_TEST_B")
    monkeypatch.delenv("GENSCALE_TEST_A", raising=False)
    monkeypatch.delenv("GENSCALE_TEST_B", raising=False)
    assert env_values(names) == (None, None)
    monkeypatch.setenv("GENSCALE_TEST_A", "looped")
    monkeypatch.setenv("GENSCALE_TEST_B", "größe")
    assert env_values(names) == ("looped", "größe") == tuple(os.environ.get(n) for n in names)
    monkeypatch.setenv("GENSCALE_TEST_A", "split")
    monkeypatch.delenv("GENSCALE_TEST_B")
    assert env_values(names) == ("split", None)
