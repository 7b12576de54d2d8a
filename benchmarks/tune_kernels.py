"""Strategy sweep on a CUDA GPU: which GroupNorm path and which noise-draw math is fastest where.

Not a benchmark of record (that is ``pytest benchmarks/ --benchmark-only``): this times the
launch plans the environment overrides select (GENSCALE_GN_PATH, GENSCALE_GN_FUSED_MAX_*,
GENSCALE_NOISE_MATH) side by side, to decide the defaults in kernels/_group_norm_ops.py and
kernels/_noise_ops.py. Each case is captured in a CUDA graph (the plan is made at capture) and
its replays timed with triton.testing.do_bench (median; it clears the L2 cache before every
repetition, so inputs come from DRAM). Timing the Python calls themselves measured the host
instead: on an H100 machine a fused forward "took" 50-230 us against 16 us of GPU time.
``--only host`` measures that host cost per call (tiny tensors, no synchronisation). GPU only:

    python benchmarks/tune_kernels.py [--only gn|noise|host] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kernels  # noqa: E402

GN_SHAPES = [(16, 128, 64, 64), (16, 256, 32, 32), (16, 512, 16, 16), (16, 256, 64, 64), (1, 128, 64, 64)]
GN_CONFIGS = {
    "default": {},
    "looped": {"GENSCALE_GN_PATH": "looped"},
    "split": {"GENSCALE_GN_PATH": "split"},
    "single-32k": {"GENSCALE_GN_PATH": "fused", "GENSCALE_GN_FUSED_MAX_FWD": "32768",
                   "GENSCALE_GN_FUSED_MAX_BWD": "32768"},
    # channels_last with 4 channels per group: 4 groups per program read whole 32-byte sectors of
    # each bf16 row (the default drops to 2 groups, 16 bytes, to give every SM a program)
    "gb4": {"GENSCALE_GN_PATH": "fused", "GENSCALE_GN_GROUP_BLOCK": "4"},
    "bwd-16k": {"GENSCALE_GN_FUSED_MAX_BWD": "16384"},
    # the looped plan keeps one tile of loads in flight per program: bigger tiles, more bytes in
    # flight per multiprocessor (kernels/_group_norm_ops.LOOP_TILE)
    "loop-8k": {"GENSCALE_GN_LOOP_TILE": "8192"},
    "loop-16k": {"GENSCALE_GN_LOOP_TILE": "16384"},
    "gb4-loop16k": {"GENSCALE_GN_PATH": "fused", "GENSCALE_GN_GROUP_BLOCK": "4", "GENSCALE_GN_LOOP_TILE": "16384"},
    # or keep several tiles in flight through shared memory (software-pipelined loops)
    "stages3": {"GENSCALE_GN_LOOP_STAGES": "3"},
    "gb4-stages3": {"GENSCALE_GN_PATH": "fused", "GENSCALE_GN_GROUP_BLOCK": "4", "GENSCALE_GN_LOOP_STAGES": "3"},
}
# The noise kernels that draw: tile elements / warps (kernels/_noise_ops._make_layout).
NOISE_TILES = {"tile2048": ("2048", "8"), "tile8192": ("8192", "8"), "tile4096w4": ("4096", "4"),
               "tile16384": ("16384", "8")}
KNOBS = sorted({k for cfg in GN_CONFIGS.values() for k in cfg}
               | {"GENSCALE_NOISE_MATH", "GENSCALE_NOISE_TILE", "GENSCALE_NOISE_WARPS"})


def _with_env(cfg: dict, fn):
    for k in KNOBS:
        os.environ.pop(k, None)
    os.environ.update(cfg)
    try:
        return fn()
    finally:
        for k in cfg:
            os.environ.pop(k, None)


def _bench(fn) -> float:
    """GPU microseconds of one fn() call (graph replay: no host overhead in the number)."""
    import triton.testing

    fn()  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return float(triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")) * 1e3


def _host_us(fn, calls: int = 300) -> float:
    """Wall microseconds per call with no synchronisation inside: the host's cost when the GPU
    work is negligible (tiny tensors)."""
    import time

    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def host_rows() -> list[dict]:
    import torch.nn.functional as F

    x = torch.randn(2, 64, 8, 8, device="cuda").contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(64, device="cuda"), torch.randn(64, device="cuda")
    xg = x.detach().requires_grad_()
    dy = torch.randn_like(x)
    abar = torch.linspace(0.9999, 0.0001, 1000, dtype=torch.float64, device="cuda")
    t = torch.tensor([3, 500], device="cuda")
    cases = {
        "eager group_norm+silu fwd": lambda: F.silu(F.group_norm(x, 32, w, b)),
        "fused group_norm_silu fwd": lambda: kernels.group_norm_silu(x, w, b, 32),
        "eager group_norm+silu fwd+bwd": lambda: torch.autograd.grad(F.silu(F.group_norm(xg, 32, w, b)), xg, dy),
        "fused group_norm_silu fwd+bwd": lambda: torch.autograd.grad(kernels.group_norm_silu(xg, w, b, 32), xg, dy),
        "fused q_sample (one launch)": lambda: kernels.q_sample(x, t, abar, seed=1, offset=2),
        "torch.add (one launch)": lambda: torch.add(x, x),
    }
    rows = []
    for name, fn in cases.items():
        with torch.no_grad() if "bwd" not in name else torch.enable_grad():
            row = {"op": "host", "shape": name, "us_per_call": _host_us(fn)}
        _emit(rows, row)
    return rows


_JSON_LINES: Path | None = None  # --json: every row is appended as it is measured


def _emit(rows: list[dict], row: dict) -> None:
    """Keep, print and (with --json) append a row at once: a command killed at the device's time
    limit still returns the rows measured so far."""
    rows.append(row)
    print(json.dumps(row), flush=True)
    if _JSON_LINES is not None:
        with _JSON_LINES.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


def copy_bandwidth() -> float:
    x = torch.empty(2**28, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    us = _bench(lambda: y.copy_(x))
    return 2 * x.numel() / us / 1e3  # GB/s, read + write


def gn_rows(copy_gbs: float) -> list[dict]:
    rows = []
    for shape in GN_SHAPES:
        n, c, h, w = shape
        for layout in ("nchw", "cl"):
            fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
            x = torch.randn(shape, device="cuda", dtype=torch.bfloat16).to(memory_format=fmt)
            dy = torch.randn_like(x)
            wt = torch.randn(c, device="cuda")
            bs = torch.randn(c, device="cuda")
            xg = x.detach().requires_grad_()

            def fwd():
                with torch.no_grad():
                    kernels.group_norm_silu(x, wt, bs, 32)

            def fwdbwd():  # autograd.grad: .backward() would also add into xg.grad every replay
                torch.autograd.grad(kernels.group_norm_silu(xg, wt, bs, 32), xg, dy)

            for mode, fn, bytes_per in (("fwd", fwd, 4), ("fwdbwd", fwdbwd, 10)):
                row = {"op": "group_norm", "shape": "x".join(map(str, shape)), "layout": layout, "mode": mode}
                for name, cfg in GN_CONFIGS.items():
                    try:
                        us = _with_env(cfg, lambda: _bench(fn))
                        row[name] = us
                    except Exception as exc:  # a plan that does not compile or fit is a result too
                        row[name] = f"error: {str(exc).splitlines()[0][:80]}"
                timed = [(v, k) for k, v in row.items() if k in GN_CONFIGS and isinstance(v, float)]
                if timed:  # every config may fail (a sticky CUDA error): keep the row, go on
                    row["best"] = min(timed)[1]
                    row["best_pct_copy"] = 100 * bytes_per * x.numel() / min(timed)[0] / 1e3 / copy_gbs
                _emit(rows, row)
    return rows


def noise_rows(copy_gbs: float) -> list[dict]:
    rows = []
    shape = (32, 3, 512, 512)
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    e1, e2 = torch.randn_like(x), torch.randn_like(x)
    abar = torch.linspace(0.9999, 0.0001, 1000, dtype=torch.float64, device="cuda")
    t = torch.randint(1, 1000, (shape[0],), device="cuda")
    pred = x.detach().requires_grad_()
    cases = {
        "q_sample": (lambda: kernels.q_sample(x, t, abar, seed=1, offset=2), 2),
        "loss_fwdbwd": (lambda: torch.autograd.grad(kernels.eps_loss(pred, 1, 2), pred), 3),
        "ddpm_cfg": (lambda: kernels.ddpm_step(x, e1, t, abar, eps_cond=e2, guidance_scale=2.0, seed=1, offset=2), 4),
    }
    for name, (fn, bytes_per) in cases.items():
        row = {"op": name, "shape": "x".join(map(str, shape))}
        configs = {"fast": {"GENSCALE_NOISE_MATH": "fast"}, "precise": {"GENSCALE_NOISE_MATH": "precise"}}
        configs.update({name: {"GENSCALE_NOISE_TILE": tile, "GENSCALE_NOISE_WARPS": warps}
                        for name, (tile, warps) in NOISE_TILES.items()})
        for config, env in configs.items():
            try:
                row[config] = _with_env(env, lambda: _bench(fn))
            except Exception as exc:
                row[config] = f"error: {str(exc).splitlines()[0][:80]}"
        timed = [v for k, v in row.items() if k in configs and isinstance(v, float)]
        if timed:
            row["best_pct_copy"] = 100 * bytes_per * x.numel() / min(timed) / 1e3 / copy_gbs
        _emit(rows, row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None,
                        help="append each row to this file as a JSON line, as soon as it is measured")
    parser.add_argument("--only", choices=("gn", "noise", "host"), default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("tune_kernels.py needs a CUDA GPU.")
    copy_gbs = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()} copy bandwidth {copy_gbs:.0f} GB/s", flush=True)
    global _JSON_LINES
    _JSON_LINES = args.json
    if args.json:
        with args.json.open("a") as fh:
            fh.write(json.dumps({"op": "device", "name": torch.cuda.get_device_name(), "copy_gbs": copy_gbs}) + "\n")
    rows = []
    if args.only == "host":
        rows += host_rows()
    if args.only in (None, "noise"):
        rows += noise_rows(copy_gbs)
    if args.only in (None, "gn"):
        rows += gn_rows(copy_gbs)
    print("\n| case | " + " | ".join(list(GN_CONFIGS) + ["best", "% copy"]) + " |")
    for r in rows:
        if r["op"] == "host":
            print(f"| host: {r['shape']} | {r['us_per_call']:.1f} us per call |")
            continue
        keys = ("fast", "precise", *NOISE_TILES) if "fast" in r else tuple(GN_CONFIGS)
        named = "fast" in r  # the noise rows have their own columns: name each cell
        cells = [(f"{k} " if named else "") + (f"{r[k]:.1f}" if isinstance(r[k], float) else r[k][:20]) for k in keys]
        label = " ".join(str(r.get(k, "")) for k in ("op", "shape", "layout", "mode")).strip()
        pct = f"{r['best_pct_copy']:.0f}%" if "best_pct_copy" in r else "-"
        print(f"| {label} | " + " | ".join(cells) + f" | {r.get('best', '')} | {pct} |")


if __name__ == "__main__":
    main()
