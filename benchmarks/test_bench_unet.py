"""One whole U-Net training step (DDPM's CIFAR-10 U-Net): eager, torch.compile, and the fused kernels.

The step: noise x0 at random t, predict eps, MSE loss, backward, Adam. bf16 autocast and
channels_last on CUDA (train.py --channels-last, off by default until this measures it); the
"-nchw" variants ("eager-nchw", "triton-nchw" and their "+graph") run the same step in NCHW, which
tells whether channels_last is the faster layout (on the CPU every variant runs NCHW already). "eager" and "compile" use eager
GroupNorm (GENSCALE_KERNELS=eager) and the usual randn + formula noising; "triton" uses the fused
GroupNorm+SiLU and the fused noising and loss kernels; "triton+compile" compiles the latter (the
kernels stay opaque custom ops); "triton+inline" compiles it with GroupNorm as a triton op that
Inductor launches itself.
MFU = model FLOPs per step (counted by torch's FlopCounterMode) / step time / the datasheet
bf16 dense peak (also given against the bf16 matrix-product rate measured in this run).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from _harness import Record, measure

pytest.importorskip("genscale.models.unet", reason="genscale's U-Net is not importable")
ON_GPU = torch.cuda.is_available()
T = 1000
if ON_GPU:  # Ho et al.'s CIFAR-10 model: width 128, mults 1,2,2,2, 2 res blocks, attention at 16x16
    CONFIG = dict(base_width=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,),
                  image_size=32, dropout=0.1)
    BATCH = int(os.environ.get("BENCH_UNET_BATCH", "128"))
else:  # a small stand-in so the CPU run stays short
    CONFIG = dict(base_width=32, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                  image_size=16, dropout=0.1)
    BATCH = 4


class Objective(nn.Module):
    """x0, t -> training loss, with either the fused kernels or the eager formulation."""

    def __init__(self, unet: nn.Module, device: torch.device, fused: bool) -> None:
        super().__init__()
        self.unet, self.fused = unet, fused
        abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)
        self.register_buffer("abar64", abar.to(device), persistent=False)
        self.register_buffer("sqrt_abar", abar.sqrt().float().to(device), persistent=False)
        self.register_buffer("sqrt_1m", (1 - abar).sqrt().float().to(device), persistent=False)

    def forward(self, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.fused:  # a new seed every step, drawn on the GPU: CUDA graph replays draw anew too
            seed = torch.randint(0, 2**62, (1,), device=x0.device)
            xt = kernels.q_sample(x0, t, self.abar64, seed=seed)
            return kernels.eps_loss(self.unet(xt, t), seed)
        eps = torch.randn_like(x0)
        xt = self.sqrt_abar[t].view(-1, 1, 1, 1) * x0 + self.sqrt_1m[t].view(-1, 1, 1, 1) * eps
        return F.mse_loss(self.unet(xt, t).float(), eps)


def _build(device: torch.device, fused: bool, compiled: bool, graphed: bool = False, nchw: bool = False):
    from genscale.models.unet import UNet

    torch.manual_seed(0)
    fmt = torch.channels_last if device.type == "cuda" and not nchw else torch.contiguous_format
    unet = UNet(3, 3, **CONFIG).to(device=device, memory_format=fmt)
    objective = Objective(unet, device, fused)
    # graphed: the harness captures whole steps in a CUDA graph, so Adam keeps its step count on the
    # GPU (capturable), autocast must not cache casts across the capture, and gradients are zeroed in
    # place (the captured backward accumulates into the buffers the warm-up allocated).
    opt = torch.optim.Adam(unet.parameters(), lr=2e-4, fused=device.type == "cuda", capturable=graphed)
    forward = torch.compile(objective) if compiled else objective
    x0 = torch.randn(BATCH, 3, CONFIG["image_size"], CONFIG["image_size"], device=device).contiguous(memory_format=fmt)
    t = torch.randint(0, T, (BATCH,), device=device)

    def step(x0: torch.Tensor, t: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=not graphed):
            loss = forward(x0, t)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=not graphed)

    return step, (x0, t)


@pytest.fixture(scope="module")
def flops_per_step(device) -> float:
    """FLOPs of one forward+backward (matrix products and convolutions), counted on the eager model."""
    from torch.utils.flop_counter import FlopCounterMode

    saved = os.environ.get("GENSCALE_KERNELS")
    os.environ["GENSCALE_KERNELS"] = "eager"
    try:
        step, args = _build(device, fused=False, compiled=False)
        counter = FlopCounterMode(display=False)
        with counter:
            step(*args)
    finally:
        if saved is None:
            os.environ.pop("GENSCALE_KERNELS", None)
        else:
            os.environ["GENSCALE_KERNELS"] = saved
    return float(counter.get_total_flops())


# "+graph": the whole training step captured in one CUDA graph and replayed, which removes the
# host's cost per launched kernel. At batch 128 and 32 px the eager step is already partly host-bound
# on an H100 (65.6 ms wall for 53.7 ms of GPU time) and the fused step much more so (78 ms wall for
# 27.7 ms of GPU time, torch.profiler), so these variants compare the GPU work side by side.
# "triton+inline": triton+compile with GENSCALE_COMPILE_KERNELS=inline (GroupNorm as a triton op that
# Inductor launches itself instead of an opaque custom op; kernels/_group_norm_inline.py).
# "-nchw": the same step with the network and x0 in NCHW instead of channels_last (CUDA only).
# Run order: the cheap and never-measured "+graph" and "-nchw" variants before the compiled ones, so
# that a stage cut at its time limit loses compiled variants rather than the CUDA-graph and layout
# comparisons.
VARIANTS = ["eager", "triton", "eager+graph", "triton+graph", "eager-nchw", "triton-nchw", "eager-nchw+graph",
            "triton-nchw+graph", "compile", "compile+graph", "triton+compile", "triton+inline", "fallback"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_unet_training_step(benchmark, device, facts, record, monkeypatch, flops_per_step, variant):
    only = os.environ.get("BENCH_UNET_VARIANTS", "").strip()
    if only and variant not in only.split(","):
        pytest.skip(f"not in BENCH_UNET_VARIANTS={only}")
    graphed = variant.endswith("+graph")
    base = variant.removesuffix("+graph")
    nchw = base.endswith("-nchw")
    base = base.removesuffix("-nchw")
    if graphed and device.type != "cuda":
        pytest.skip("CUDA graphs need CUDA")
    if nchw and device.type != "cuda":
        pytest.skip("on the CPU every variant runs NCHW already ('eager' is this step)")
    if base == "fallback" and device.type == "cuda":
        pytest.skip("the eager fallback serves non-CUDA tensors; on CUDA the baseline is 'eager'")
    if base.startswith("triton") and device.type != "cuda":
        pytest.skip("Triton kernels need CUDA (the CPU interpreter checks correctness, it cannot time)")
    fused = base in ("fallback", "triton", "triton+compile", "triton+inline")
    monkeypatch.setenv("GENSCALE_KERNELS", {"eager": "eager", "compile": "eager", "fallback": "auto"}.get(base, "triton"))
    monkeypatch.setenv("GENSCALE_COMPILE_KERNELS", "inline" if base == "triton+inline" else "opaque")
    torch._dynamo.reset()
    step, args = _build(device, fused=fused, compiled="compile" in base or base == "triton+inline", graphed=graphed,
                        nchw=nchw)
    per_step, method = measure(benchmark, step, [args], device, use_graph=graphed)
    if graphed and method != "graph":
        pytest.fail(f"the training step could not be captured: {benchmark.extra_info.get('graph_capture_error')}")
    peak = facts["datasheet_bf16_flops"]
    measured = facts["matmul_bf16_flops"]
    extra = dict(
        images_per_s=BATCH / per_step,
        flops_per_step=flops_per_step,
        mfu=flops_per_step / per_step / peak if peak else None,
        mfu_vs_measured_matmul=flops_per_step / per_step / measured if measured else None,
        batch=BATCH,
        memory_format="channels_last" if device.type == "cuda" and not nchw else "nchw",
        config={k: list(v) if isinstance(v, tuple) else v for k, v in CONFIG.items()},
    )
    record(Record("unet", f"train step b{BATCH} {CONFIG['image_size']}px w{CONFIG['base_width']}", variant,
                  per_step, 0, method, extra=extra), benchmark)
