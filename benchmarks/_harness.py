"""Timing and bookkeeping shared by the benchmark suites.

Device time on CUDA: the op is called on a rotation of input sets (together larger than 4x the
L2 cache, so each call reads from memory, not from cache), the whole rotation is captured into
one CUDA graph, and pytest-benchmark times replays (each followed by a synchronize). Per-call time
= round time / calls per round, which removes launch gaps and host overhead from kernel timings.
Where capture fails (or on the CPU) the calls are issued from Python instead; the record says which.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

MIN_ROUND_S = 2e-3  # a timed round lasts at least this long, so the synchronize is noise
ROUNDS_CUDA, ROUNDS_CPU = 15, 5


@dataclass
class Record:
    suite: str  # "group_norm", "noise", "unet"
    case: str  # what is computed, e.g. "fwd 16x128x64x64 bf16 cl"
    variant: str  # "eager", "compile", "triton", "fallback", ...
    time_s: float
    min_bytes: int = 0
    timing: str = "graph"
    extra: dict[str, Any] = field(default_factory=dict)

    def bandwidth(self) -> float:
        return self.min_bytes / self.time_s if self.time_s > 0 and self.min_bytes else 0.0

    def as_dict(self, copy_bw: float) -> dict[str, Any]:
        d = asdict(self)
        d["bandwidth_GBps"] = self.bandwidth() / 1e9
        d["fraction_of_copy_bw"] = self.bandwidth() / copy_bw if copy_bw else None
        return d


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 32 << 20
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))


def input_sets(make: Callable[[], Sequence[Any]], bytes_per_set: int, device: torch.device,
               max_sets: int = 1024) -> list[Sequence[Any]]:
    """Enough fresh input sets that cycling through them never hits in L2 (together 4x its size).

    Capped at ``max_sets`` so that graphs stay small: below ~200 KB per set (4 x 50 MB / 1024) the
    rotation still fits in cache, which ``cache_note`` records for the summary to mark.
    """
    n = 1 if device.type != "cuda" else min(max_sets, max(2, math.ceil(4 * l2_bytes(device) / max(1, bytes_per_set))))
    return [make() for _ in range(n)]


def cache_note(sets: list[Sequence[Any]], bytes_per_set: int, device: torch.device) -> dict[str, Any]:
    """How large the timed rotation was against the L2 cache (for a record's ``extra``)."""
    total = len(sets) * bytes_per_set
    return {"working_set_bytes": total, "exceeds_4x_l2": total >= 4 * l2_bytes(device)}


def _rough_time(calls: list[Callable[[], Any]], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    for call in calls:
        call()
    sync(device)
    return (time.perf_counter() - start) / len(calls)


def measure(benchmark, fn: Callable[..., Any], sets: list[Sequence[Any]], device: torch.device,
            use_graph: bool = True) -> tuple[float, str]:
    """Seconds per call of ``fn(*inputs)`` and the timing method ("graph" or "stream").

    Each set's output is kept until that set's next call, so the writes rotate over fresh memory as
    the reads do: an output dropped at once would hand the same block to the next call, and its
    lines, rewritten while still in L2, might never reach DRAM (overstating bandwidth)."""
    outputs: list[Any] = [None] * len(sets)

    def make_call(i: int, args: Sequence[Any]) -> Callable[[], None]:
        def call() -> None:
            outputs[i] = fn(*args)  # the new output is allocated while the previous one is alive
        return call

    calls = [make_call(i, args) for i, args in enumerate(sets)]
    for call in calls:  # compile / autotune / first-touch outside the timed region
        call()
    sync(device)
    per_call = _rough_time(calls, device)
    reps = max(1, math.ceil(MIN_ROUND_S / max(per_call * len(calls), 1e-7)))
    if device.type != "cuda":
        reps = 1
    round_calls = calls * reps
    method = "stream"
    target: Callable[[], None]
    if device.type == "cuda" and use_graph:
        try:
            graph = _capture(round_calls, device)
            method = "graph"

            def target() -> None:
                graph.replay()
                torch.cuda.synchronize(device)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to stream timing
            benchmark.extra_info["graph_capture_error"] = repr(exc)[:300]
    if method == "stream":
        def target() -> None:
            for call in round_calls:
                call()
            sync(device)

    rounds = ROUNDS_CUDA if device.type == "cuda" else ROUNDS_CPU
    benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=2 if device.type == "cuda" else 1)
    per_call = benchmark.stats.stats.median / len(round_calls)
    benchmark.extra_info.update(calls_per_round=len(round_calls), input_sets=len(sets), timing=method,
                                time_per_call_s=per_call)
    return per_call, method


def _capture(round_calls: list[Callable[[], Any]], device: torch.device) -> torch.cuda.CUDAGraph:
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture requires
        for call in round_calls[: min(3, len(round_calls))]:
            call()
    torch.cuda.current_stream(device).wait_stream(side)
    sync(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in round_calls:
            call()
    sync(device)
    return graph


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    nbytes = (1 << 30) if device.type == "cuda" else (128 << 20)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(10):
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * nbytes / times[len(times) // 2]


def matmul_flops(device: torch.device) -> float | None:
    """Measured bf16 matrix-product rate (FLOP/s) on random data: the compute ceiling for MFU."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    return 10 * 2 * n**3 / (start.elapsed_time(end) / 1e3)


DATASHEET_BF16_DENSE = {  # FLOP/s, dense bf16 tensor-core peak from the vendor datasheets
    "H100 80GB HBM3": 989.4e12,  # SXM
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200": 989.4e12,
    "A100": 312e12,
}


def datasheet_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in DATASHEET_BF16_DENSE.items():
        if key in name:
            return value
    return None
