"""Fixtures and helpers shared by several test files."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest
import torch


@pytest.fixture
def fresh_accelerate_state() -> Iterator[None]:
    """Accelerate's process-wide state reset around a test that builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def eval_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """GENSCALE_CACHE for the evaluation tests, set for the whole test module.

    One folder for the whole session, shared by every evaluation test file: the judge classifier
    and the reference statistics are made once and then loaded from there."""
    folder = tmp_path_factory.getbasetemp() / "genscale_eval_cache"
    folder.mkdir(exist_ok=True)
    patch = pytest.MonkeyPatch()  # module scope: the function-scoped monkeypatch fixture cannot serve
    patch.setenv("GENSCALE_CACHE", str(folder))
    yield folder
    patch.undo()


def plain_optimize(fam, losses: list[float] | None = None) -> Callable[[torch.Tensor, str], None]:
    """The trainer's ``optimize(loss, name)`` without Accelerate: backward, step, zero the grads;
    each loss is appended to ``losses`` when given."""
    def optimize(loss: torch.Tensor, name: str) -> None:
        if losses is not None:
            losses.append(float(loss.detach()))
        loss.backward()
        fam.optimizers[name].step()
        fam.optimizers[name].zero_grad(set_to_none=True)
    return optimize
