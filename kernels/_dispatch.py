"""Backend choice for every public kernel: Triton on CUDA tensors, the eager reference elsewhere.

``GENSCALE_KERNELS`` is read at call time (so tests can flip it with monkeypatch):
``auto`` (default) picks Triton when every tensor is on CUDA and triton imports, ``eager``
forces the reference, ``triton`` forces the Triton kernels (on CPU tensors only under
``TRITON_INTERPRET=1``, set before triton is imported).

Triton modules are imported lazily, at the first Triton call: ``triton.jit`` decides at
decoration time whether a kernel is interpreted, so importing them late lets a test runner set
``TRITON_INTERPRET`` after ``import kernels`` and still get interpreted kernels.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

ENV_BACKEND = "GENSCALE_KERNELS"
_MODES = ("auto", "eager", "triton")


def backend_mode() -> str:
    """The requested backend: ``auto``, ``eager`` or ``triton``."""
    raw = env_values((ENV_BACKEND,))[0]  # read on every kernel call: the cheap read (below)
    mode = (raw or "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{ENV_BACKEND} must be one of {', '.join(_MODES)}; got {mode!r}")
    return mode


def interpreter_active() -> bool:
    """True when triton runs kernels with its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


_TRITON_FOUND = importlib.util.find_spec("triton") is not None  # looked up once; a fact, not state


def triton_importable() -> bool:
    return _TRITON_FOUND


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether a call on ``tensors`` goes to the Triton kernels."""
    mode = backend_mode()
    if mode == "eager":
        return False
    present = [t for t in tensors if t is not None]
    on_cuda = all(t.is_cuda for t in present)
    if mode == "auto":
        return on_cuda and triton_importable()
    if not triton_importable():
        raise RuntimeError(f"{ENV_BACKEND}=triton but the triton package is not installed")
    if not on_cuda and not interpreter_active():
        raise RuntimeError(
            f"{ENV_BACKEND}=triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        )
    return True


def compiling() -> bool:
    """True while torch.compile traces. The kernels' torch.library custom ops keep compiled graphs
    whole, so they are used then; eager calls go to the same launchers through a plain
    autograd.Function, because the custom-op dispatch adds host time to every call: on an H100
    machine (torch 2.11) a fused q_sample took 106 us of host time through it and 81 us without."""
    return torch.compiler.is_compiling()


_COMPILE_MODES = ("reference", "opaque", "inline")


def compile_mode() -> str:
    """What GroupNorm becomes while torch.compile traces (``GENSCALE_COMPILE_KERNELS``):

    * ``reference`` (default): the eager reference, which Inductor fuses itself. On the H100 the
      U-Net training step compiled this way took 48.7 ms, against 82.8 ms with the Triton kernels
      as opaque custom ops (each call goes back through Python; benchmarks/results/2026-11-22-h100).
    * ``opaque``: the Triton kernels as torch.library custom ops (no graph breaks; tested).
    * ``inline``: GroupNorm as a torch.library triton op, whose kernels Inductor launches from its
      own code (kernels/_group_norm_inline.py); needs compiled CUDA kernels and a torch with
      torch.library.triton_op, so under the interpreter it falls back to ``opaque``. Not yet timed.
    """
    mode = os.environ.get("GENSCALE_COMPILE_KERNELS", "reference").strip().lower() or "reference"
    if mode not in _COMPILE_MODES:
        raise ValueError(f"GENSCALE_COMPILE_KERNELS must be reference, opaque or inline; got {mode!r}")
    if mode == "inline" and interpreter_active():
        return "opaque"
    return mode


def sm_count(device: torch.device) -> int:
    """Multiprocessors on ``device``; 1 for the interpreter (one program runs at a time)."""
    if device.type != "cuda":
        return 1
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _encoded(names: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(os.fsencode(name) for name in names)


def env_values(names: tuple[str, ...]) -> tuple:
    """The values (str; None when unset) of environment variables, for keys built on every call.

    ``os.environ.get`` costs ~0.7 us per unset name (it encodes the name and goes through a
    KeyError), and a GroupNorm call keys its launch plan on 9 tuning variables. On POSIX the
    bytes mapping behind ``os.environ`` (which its setters and deleters keep current) is read
    directly instead: ~0.1 us per name; elsewhere, and while torch.compile traces (Dynamo knows
    ``os.environ``, not its internals), ``os.environ.get``.
    """
    data = None
    if os.name == "posix" and not torch.compiler.is_compiling():
        data = getattr(os.environ, "_data", None)
    if isinstance(data, dict):
        get = data.get
        raw = [get(key) for key in _encoded(names)]
        return tuple([None if value is None else os.fsdecode(value) for value in raw])
    get = os.environ.get
    return tuple([get(name) for name in names])


def env_int(name: str, default: int, power_of_two: bool = False) -> int:
    """An integer tuning override from the environment (used by tests and the tuning sweep); a
    positive power of two where it sets a block shape (Triton's aranges need one)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer; got {raw!r}") from None
    if power_of_two and (value < 1 or value & (value - 1)):
        raise ValueError(f"{name} must be a positive power of two; got {value}")
    return value
