"""GroupNorm+SiLU forward and forward+backward: eager PyTorch, torch.compile, Triton (and the CPU fallback).

Minimum bytes: forward reads x and writes y (2 x element size per element); forward+backward adds
reading x and dy and writing dx (5 x element size in all). Parameters and statistics are O(C) and
not counted.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import kernels
from _harness import Record, cache_note, input_sets, measure

GROUPS = 32
ON_GPU = torch.cuda.is_available()
# U-Net activations: N=16, C=128..512, 64x64 down to 8x8; batch 1 for the split path.
# (16, 256, 64, 64) is a larger activation (67 MB in bf16) that shows the asymptotic bandwidth.
GPU_SHAPES = [(16, 128, 64, 64), (16, 256, 32, 32), (16, 512, 16, 16), (16, 512, 8, 8), (1, 128, 64, 64),
              (1, 512, 16, 16), (16, 256, 64, 64)]
GPU_FP32_SHAPES = [(16, 128, 64, 64), (16, 256, 32, 32), (1, 128, 64, 64)]
CPU_SHAPES = [(2, 64, 16, 16)]
if os.environ.get("BENCH_QUICK"):
    GPU_SHAPES, GPU_FP32_SHAPES = GPU_SHAPES[:1] + GPU_SHAPES[4:5], GPU_FP32_SHAPES[:1]


def _cases() -> list:
    if not ON_GPU:
        return [(s, torch.float32) for s in CPU_SHAPES]
    return [(s, torch.bfloat16) for s in GPU_SHAPES] + [(s, torch.float32) for s in GPU_FP32_SHAPES]


def _eager(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(F.group_norm(x, GROUPS, w, b, 1e-5))


def _fused(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return kernels.group_norm_silu(x, w, b, GROUPS)


def _op(variant: str, device: torch.device, monkeypatch: pytest.MonkeyPatch):
    if variant == "eager":
        return _eager
    if variant == "fallback":
        if device.type == "cuda":
            pytest.skip("the eager fallback serves non-CUDA tensors; on CUDA the baseline is 'eager'")
        monkeypatch.setenv("GENSCALE_KERNELS", "auto")
        return _fused
    if variant == "compile":
        torch._dynamo.reset()
        return torch.compile(_eager, dynamic=False)
    if device.type != "cuda":
        pytest.skip("Triton kernels need CUDA (the CPU interpreter checks correctness, it cannot time)")
    monkeypatch.setenv("GENSCALE_KERNELS", "triton")
    return _fused


@pytest.mark.parametrize("variant", ["eager", "fallback", "compile", "triton"])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("case", _cases(), ids=lambda c: f"{'x'.join(map(str, c[0]))}-{str(c[1])[6:]}")
def test_group_norm_silu(benchmark, device, record, monkeypatch, case, layout, mode, variant):
    (n, c, h, w), dtype = case
    fn = _op(variant, device, monkeypatch)
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    grad = mode == "fwdbwd"
    weight = (1 + 0.1 * torch.randn(c, device=device)).to(dtype).requires_grad_(grad)
    bias = (0.1 * torch.randn(c, device=device)).to(dtype).requires_grad_(grad)

    def make():
        x = torch.randn(n, c, h, w, device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(grad)
        return (x, torch.randn_like(x)) if grad else (x,)

    elem = torch.tensor([], dtype=dtype).element_size()
    numel = n * c * h * w
    set_bytes = numel * elem * (2 if grad else 1)
    sets = input_sets(make, set_bytes, device)

    if grad:
        def run(x, dy):
            y = fn(x, weight, bias)  # returned too: the harness keeps it alive, so its writes rotate
            return y, torch.autograd.grad(y, (x, weight, bias), dy)
    else:
        def run(x):
            with torch.no_grad():
                return fn(x, weight, bias)

    per_call, method = measure(benchmark, run, sets, device)
    case_name = f"{mode} {n}x{c}x{h}x{w} {str(dtype)[6:]} {layout}"
    record(Record("group_norm", case_name, variant, per_call, numel * elem * (5 if grad else 2), method,
                  extra=dict(op="group_norm_silu", mode=mode, shape=[n, c, h, w], dtype=str(dtype), layout=layout,
                             **cache_note(sets, set_bytes, device))),
           benchmark)
