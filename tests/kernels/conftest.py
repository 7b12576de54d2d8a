"""Kernel tests: the Triton kernels on the CPU interpreter, and (marked gpu) compiled on CUDA.

TRITON_INTERPRET must be set before the kernel modules are decorated; kernels imports them
lazily, at the first Triton call, so setting it here is early enough. It is set only when CUDA is
absent: on a GPU machine the same process must compile the kernels for the gpu-marked tests.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from kernels._dispatch import interpreter_active  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU; runs the Triton kernels compiled")


@pytest.fixture(params=[pytest.param("cpu", id="interp"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)])
def device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> torch.device:
    """A device on which the Triton kernels run: the interpreter on CPU, or compiled on CUDA."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("CUDA is not available")
        if interpreter_active():
            pytest.skip("TRITON_INTERPRET is set: compiled kernels cannot run in this process")
    elif not interpreter_active():
        pytest.skip("the Triton interpreter is off (CUDA present); run with TRITON_INTERPRET=1 for these")
    monkeypatch.setenv("GENSCALE_KERNELS", "triton")
    return torch.device(request.param)


@pytest.fixture(scope="session")
def dynamo_tables() -> None:
    """Let torch._dynamo build its tables of torch functions before `poison` patches any.

    Dynamo resolves torch.* functions into lookup tables the first time it runs (a custom op call
    is enough); built while torch.empty_like is patched, they would make later compiles
    graph-break on the real function.
    """
    torch.compile(lambda t: torch.empty_like(t) + torch.empty(1), backend="eager", fullgraph=True)(torch.zeros(1))
    torch._dynamo.reset()


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch, dynamo_tables: None) -> None:
    """Every fresh float tensor starts as NaN, so an element a kernel forgets to write fails the test."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan(empty_like(*a, **k)))
