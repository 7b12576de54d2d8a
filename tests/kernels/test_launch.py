"""Direct launches (kernels/_launch.py): after a launch through the jit function, the compiled
kernel it returned is launched with the same arguments in the jit's order, and only for tensors
Triton would have specialised the same way.

The CPU part drives the logic with a stand-in jit function and compiled kernel (the interpreter
compiles nothing); the gpu-marked test launches the real GroupNorm kernels both ways.
"""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kernels import _launch

triton_compiler = pytest.importorskip("triton.compiler")


class _Param:
    def __init__(self, name: str, default=inspect.Parameter.empty) -> None:
        self.name, self.default = name, default
        self.has_default = default is not inspect.Parameter.empty


class _Compiled(triton_compiler.CompiledKernel):
    """A CompiledKernel whose launches are recorded (built without Triton's constructor)."""

    def __getitem__(self, grid):
        return lambda *args: self.calls.append(("direct", grid, args))

    def __del__(self) -> None:  # nothing was loaded on a device
        pass


class _Jit:
    """Stands in for a jit function with parameters x_ptr, y_ptr, n, eps, BLOCK: constexpr,
    ACT: constexpr = True."""

    params = [_Param("x_ptr"), _Param("y_ptr"), _Param("n"), _Param("eps"), _Param("BLOCK"),
              _Param("ACT", default=True)]

    def __init__(self, returns_compiled: bool = True) -> None:
        self.calls: list = []
        self.compiled = _Compiled.__new__(_Compiled)
        self.compiled.calls = self.calls
        self.returns_compiled = returns_compiled

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(("jit", grid, args, kwargs))
            return self.compiled if self.returns_compiled else None
        return run


def _launch_twice(kernel, x, y, kept):
    for _ in range(2):
        _launch.launch(kernel, (4, 2), (x, y), (7, 1e-5), dict(BLOCK=64, num_warps=4), kept)


def test_second_launch_goes_to_the_compiled_kernel_in_the_jit_argument_order():
    kernel, kept = _Jit(), {}
    x, y = torch.zeros(8), torch.zeros(8)
    _launch_twice(kernel, x, y, kept)
    assert kernel.calls[0] == ("jit", (4, 2), (x, y, 7, 1e-5), dict(BLOCK=64, num_warps=4))
    # grid padded to three axes; constexprs by parameter order, the default for the one not given;
    # num_warps is a launch option, not a parameter
    assert kernel.calls[1] == ("direct", (4, 2, 1), (x, y, 7, 1e-5, 64, True))
    assert len(kernel.calls) == 2


def test_tensors_specialised_differently_go_through_the_jit_again():
    kernel, kept = _Jit(), {}
    base = torch.zeros(16)
    x, y = base[:8], torch.zeros(8)
    _launch_twice(kernel, x, y, kept)
    misaligned = base[1:9]  # 4 bytes past a 16-byte boundary: Triton compiles another kernel
    _launch_twice(kernel, misaligned, y, kept)
    _launch_twice(kernel, x.double(), y, kept)  # another dtype: another kernel
    assert [c[0] for c in kernel.calls] == ["jit", "direct"] * 3
    assert len(kept) == 3


def test_no_direct_launch_when_disabled_or_nothing_was_compiled():
    x, y = torch.zeros(8), torch.zeros(8)
    disabled = _Jit()
    _launch_twice(disabled, x, y, None)
    interpreted = _Jit(returns_compiled=False)  # the interpreter returns no compiled kernel
    kept: dict = {}
    _launch_twice(interpreted, x, y, kept)
    assert [c[0] for c in disabled.calls + interpreted.calls] == ["jit"] * 4
    assert kept == {}


def test_a_parameter_with_no_value_keeps_the_jit():
    kernel, kept = _Jit(), {}
    x, y = torch.zeros(8), torch.zeros(8)
    for _ in range(2):  # BLOCK missing: the jit would raise; a stand-in that does not must not be kept
        _launch.launch(kernel, (1,), (x, y), (7, 1e-5), {}, kept)
    assert [c[0] for c in kernel.calls] == ["jit", "jit"]


def test_a_kernel_swapped_out_is_called_and_one_without_parameters_is_not_kept():
    """A stub put in a kept kernel's place (the host benchmark's stubbed variant) is what runs; a
    wrapper without ``params`` (Triton's autotuner) cannot be bound here, so it stays on the jit."""
    kernel, kept = _Jit(), {}
    x, y = torch.zeros(8), torch.zeros(8)
    _launch_twice(kernel, x, y, kept)
    stub = _Jit(returns_compiled=False)
    _launch_twice(stub, x, y, kept)
    assert [c[0] for c in kernel.calls] == ["jit", "direct"]
    assert [c[0] for c in stub.calls] == ["jit", "jit"]
    wrapped, kept = _Jit(), {}
    wrapped.params = None
    _launch_twice(wrapped, x, y, kept)
    assert [c[0] for c in wrapped.calls] == ["jit", "jit"] and kept == {}


def test_launch_mode_from_the_environment(monkeypatch):
    monkeypatch.setenv("GENSCALE_TRITON_LAUNCH", "jit")
    assert not _launch.direct_launch()
    monkeypatch.setenv("GENSCALE_TRITON_LAUNCH", "direct")
    assert _launch.direct_launch()
    monkeypatch.setenv("GENSCALE_TRITON_LAUNCH", "fast")
    with pytest.raises(ValueError, match="GENSCALE_TRITON_LAUNCH must be direct or jit"):
        _launch.direct_launch()


# Runs in a fresh process: the kernels must be jit functions (decorated before TRITON_INTERPRET is
# set), whose arguments Triton's own binder (built for an sm_90 target; no GPU needed) binds.
_AGAINST_TRITONS_BINDER = r"""
import os, torch
from triton.backends.compiler import GPUTarget
from triton.compiler import CompiledKernel, make_backend
from triton.runtime.jit import create_function_from_signature
from kernels import _group_norm_triton as k

backend = make_backend(GPUTarget("cuda", 90, 32))
records = []

class Compiled(CompiledKernel):
    def __getitem__(self, grid):
        return lambda *args: records.append(("direct", self.name, grid, args))
    def __del__(self):
        pass

class Recording:
    def __init__(self, name, jit):
        self.name, self.jit, self.params = name, jit, jit.params
        self.binder = create_function_from_signature(jit.signature, jit.params, backend)
    def __getitem__(self, grid):
        def run(*args, **kwargs):
            bound, _, _ = self.binder(*args, **kwargs)
            records.append(("jit", self.name, tuple(grid) + (1,) * (3 - len(grid)), tuple(bound.values())))
            compiled = Compiled.__new__(Compiled)
            compiled.name = self.name
            return compiled
        return run

names = [n for n, v in vars(k).items() if type(v).__name__ == "JITFunction"]
for name in names:
    setattr(k, name, Recording(name, getattr(k, name)))
os.environ["TRITON_INTERPRET"] = "1"  # lets the forced Triton path take CPU tensors
os.environ["GENSCALE_KERNELS"] = "triton"
import kernels

def same(a, b):
    return len(a) == len(b) and all(x is y or (not torch.is_tensor(x) and x == y) for x, y in zip(a, b))

checked = set()
for path in ("fused", "looped", "split"):
    os.environ["GENSCALE_GN_PATH"] = path
    for fmt in (torch.contiguous_format, torch.channels_last):
        for affine in (True, False):
            x = torch.randn(2, 12, 5, 7).to(memory_format=fmt).requires_grad_()
            w = torch.randn(12, requires_grad=True) if affine else None
            b = torch.randn(12, dtype=torch.float64, requires_grad=True) if affine else None
            rounds = []
            for _ in range(2):
                records.clear()
                kernels.group_norm_silu(x, w, b, 3).backward(torch.randn_like(x))
                rounds.append(list(records))
            first, second = rounds
            assert [r[0] for r in first] == ["jit"] * len(first), first
            assert [r[0] for r in second] == ["direct"] * len(second), second
            for (_, name, grid, bound), (_, name2, grid2, args) in zip(first, second):
                assert (name, grid) == (name2, grid2)
                # same tensors are not reused across calls: compare everything but the tensors
                assert len(bound) == len(args), name
                for u, v in zip(bound, args):
                    assert torch.is_tensor(u) == torch.is_tensor(v), name
                    if torch.is_tensor(u):
                        assert (u.dtype, u.shape) == (v.dtype, v.shape), name
                    else:
                        assert u == v and type(u) is type(v), (name, u, v)
                checked.add(name)
# what a direct launch is keyed on separates every tensor specialisation Triton makes
from kernels._launch import _signature
jit = k.gn_fwd_fused.jit
base = torch.zeros(4096, dtype=torch.float32)
variants = [base[:64], base[1:65], base[4:68], base[:64].to(torch.bfloat16), base[:64].half(),
            torch.zeros(80, dtype=torch.bfloat16)[3:67], torch.zeros(80, dtype=torch.bfloat16)[8:72]]
rest = (torch.zeros(64),) * 5 + (4, 2, 16, 1 / 32, 1e-5, 128, 16, 1, 128, 16, 1)
meta = dict(HAS_W=True, HAS_B=True, ACT=True, GB=1, BLOCK_CG=2, BLOCK_S=16, SINGLE=True)
binder = create_function_from_signature(jit.signature, jit.params, backend)
specs = [str(binder(v, *rest, **meta)[1][0]) for v in variants]
assert len(set(specs)) >= 4, specs  # aligned / not, three dtypes
for i, a in enumerate(variants):
    for j, b in enumerate(variants):
        if specs[i] != specs[j]:
            assert _signature((a,)) != _signature((b,)), (specs[i], specs[j])
print(sorted(checked))
"""


def test_direct_arguments_equal_what_tritons_binder_binds():
    """Every GroupNorm kernel, every strategy: the arguments of a direct launch are those Triton's
    jit binder produced for the first launch, in order, constexprs and defaults included."""
    root = Path(__file__).resolve().parents[2]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _AGAINST_TRITONS_BINDER], capture_output=True, text=True,
                         timeout=300, cwd=root, env={**env, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr[-3000:]
    checked = out.stdout.strip().splitlines()[-1]
    for name in ("gn_fwd_fused", "gn_bwd_fused", "gn_stats_partial", "gn_stats_finalize", "gn_apply",
                 "gn_bwd_partial", "gn_bwd_finalize", "gn_bwd_apply"):
        assert name in checked


class _CountingJit:
    """Delegates to a real jit function and counts the launches that went through it."""

    def __init__(self, jit) -> None:
        self.jit, self.params, self.count = jit, jit.params, 0

    def __getitem__(self, grid):
        self.count += 1
        return self.jit[grid]


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_direct_and_jit_launches_agree_on_the_gpu(monkeypatch, channels_last, path):
    """The real kernels: GroupNorm forward and backward launched directly equal, bit for bit,
    the same launches through the jit function, and after the first call nothing goes through
    the jit function."""
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    import kernels
    from kernels import _group_norm_ops, _group_norm_triton

    monkeypatch.setattr(_group_norm_ops, "_SPECS", {})
    counters = {}
    for name, obj in vars(_group_norm_triton).copy().items():
        if type(obj).__name__ == "JITFunction":
            counters[name] = _CountingJit(obj)
            monkeypatch.setattr(_group_norm_triton, name, counters[name])
    monkeypatch.setenv("GENSCALE_GN_PATH", path)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(16, 64, 9, 7, device="cuda", dtype=torch.bfloat16).to(memory_format=fmt)
    dy = torch.randn_like(x)
    w, b = torch.randn(64, device="cuda"), torch.randn(64, device="cuda")
    results, jit_launches = {}, {}
    for mode in ("jit", "direct"):
        monkeypatch.setenv("GENSCALE_TRITON_LAUNCH", mode)
        runs, counts = [], []
        for _ in range(3):  # the first launch compiles / is kept; the later ones are direct
            before = sum(c.count for c in counters.values())
            xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
            y = kernels.group_norm_silu(xr, wr, br, 16)
            y.backward(dy)
            torch.cuda.synchronize()
            runs.append((y.detach(), xr.grad, wr.grad, br.grad))
            counts.append(sum(c.count for c in counters.values()) - before)
        results[mode], jit_launches[mode] = runs, counts
    launches = jit_launches["jit"][0]
    assert launches == (2 if path == "fused" else 6) and jit_launches["jit"] == [launches] * 3
    assert jit_launches["direct"] == [launches, 0, 0]
    for jit_run, direct_run in zip(results["jit"], results["direct"]):
        assert all(torch.equal(a, c) for a, c in zip(jit_run, direct_run))
    ref = F.silu(F.group_norm(x.float(), 16, w, b))
    assert (results["direct"][2][0].float() - ref).abs().max() < 0.05
