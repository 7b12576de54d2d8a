"""Markdown summary of a benchmark results JSON: one table per suite, ratios, and the issue's targets.

Usage: python benchmarks/summarize.py [--merge-json merged.json] results.json [more.json ...] > summary.md
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from typing import Any

VARIANTS = ("eager", "fallback", "compile", "triton", "triton+compile", "triton+inline", "eager+graph", "compile+graph",
            "triton+graph", "eager-nchw", "triton-nchw", "eager-nchw+graph", "triton-nchw+graph")

# The targets of the kernels issue (H100, bf16, large shapes): (suite, predicate on the case, rules).
TARGETS = {
    "group_norm": "Triton >= 75% of copy bandwidth; >= 4x eager (channels_last), >= 2x eager (NCHW); "
                  ">= 1.2x torch.compile -- checked on bf16 cases of >= 4M elements",
    "noise": "Triton >= 80% of copy bandwidth; >= 3x eager -- checked on bf16 cases of >= 4M elements",
    "unet": "fused kernels >= 1.25x eager and >= 1.0x torch.compile of the eager model",
}


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.3f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def _cell(row: dict[str, Any], case_rows: dict[str, dict[str, Any]]) -> str:
    """A row's time; "(stream)" when a kernel row's CUDA-graph capture failed and the Python calls
    were timed instead (their host cost included), unlike the graph-timed rows beside it. (The
    U-Net step times Python calls on purpose, except its "+graph" variants; a CPU run has no graphs.)"""
    mixed = any(r.get("timing") == "graph" for r in case_rows.values())
    fell_back = row.get("timing") == "stream" and row.get("suite") != "unet" and mixed
    return _fmt_time(row["time_s"]) + (" (stream)" if fell_back else "")


def _ratio(a: float | None, b: float | None) -> float | None:
    return b / a if a and b else None


def _comparable(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Both rows timed the same way (a ratio of a graph-timed and a stream-timed row means little)."""
    return bool(a and b) and a.get("timing") == b.get("timing")


def _by_case(rows: list[dict[str, Any]], suite: str) -> dict[str, dict[str, dict[str, Any]]]:
    cases: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in rows:
        if row["suite"] == suite:
            cases[row["case"]][row["variant"]] = row
    return cases


def _fused(suite: str, v: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The fused-kernel row the targets are checked on: for the U-Net step the faster of the fused
    model as is and under torch.compile (both are what a user can run), else the Triton kernel."""
    if suite != "unet":
        return v.get("triton")
    rows = [v[name] for name in ("triton", "triton+compile", "triton+inline") if name in v]
    return min(rows, key=lambda r: r["time_s"]) if rows else None


def _target_checks(suite: str, case: str, v: dict[str, dict[str, Any]]) -> list[str]:
    tri = _fused(suite, v)
    if tri is None:
        return []
    eager, comp = v.get("eager"), v.get("compile")
    speed_e = _ratio(tri["time_s"], eager["time_s"]) if _comparable(tri, eager) else None
    speed_c = _ratio(tri["time_s"], comp["time_s"]) if _comparable(tri, comp) else None
    frac = tri.get("fraction_of_copy_bw") if tri.get("timing") != "stream" else None
    out = [] if _comparable(tri, eager) and _comparable(tri, comp) else ["timing differs: see (stream) cells"]
    if suite == "group_norm" and "bfloat16" in case and _numel(case) >= LARGE:
        need_e = 4.0 if " cl" in case else 2.0
        out += [_check(f"{frac:.0%} of copy bw" if frac else "bw -", bool(frac and frac >= 0.75)),
                _check(f"{speed_e:.2f}x eager (>= {need_e:g})" if speed_e else "eager -", bool(speed_e and speed_e >= need_e)),
                _check(f"{speed_c:.2f}x compile (>= 1.2)" if speed_c else "compile -", bool(speed_c and speed_c >= 1.2))]
    elif suite == "noise" and "bfloat16" in case and _numel(case) >= LARGE:
        out += [_check(f"{frac:.0%} of copy bw" if frac else "bw -", bool(frac and frac >= 0.8)),
                _check(f"{speed_e:.2f}x eager (>= 3)" if speed_e else "eager -", bool(speed_e and speed_e >= 3.0))]
    elif suite == "unet":
        out += [f"fused = {tri['variant']}",
                _check(f"{speed_e:.2f}x eager (>= 1.25)" if speed_e else "eager -", bool(speed_e and speed_e >= 1.25)),
                _check(f"{speed_c:.2f}x compile (>= 1.0)" if speed_c else "compile -", bool(speed_c and speed_c >= 1.0))]
        out += _graph_checks(v) + _layout_speedups(v)
    return out


# (channels_last, NCHW) pairs of U-Net variants: the same step in the two layouts.
LAYOUT_PAIRS = (("eager", "eager-nchw"), ("triton", "triton-nchw"), ("eager+graph", "eager-nchw+graph"),
                ("triton+graph", "triton-nchw+graph"))


def _layout_speedups(v: dict[str, dict[str, Any]]) -> list[str]:
    """How much faster each U-Net step runs in channels_last (train.py --channels-last) than in
    NCHW, where both were timed the same way: a finding, not a target."""
    found = [f"{cl} {_ratio(v[cl]['time_s'], v[nchw]['time_s']):.2f}x" for cl, nchw in LAYOUT_PAIRS
             if _comparable(v.get(cl), v.get(nchw))]
    return ["channels_last vs NCHW: " + ", ".join(found)] if found else []


def _graph_checks(v: dict[str, dict[str, Any]]) -> list[str]:
    """The same targets with every variant's step captured in a CUDA graph (no host cost per kernel)."""
    tri, eager, comp = v.get("triton+graph"), v.get("eager+graph"), v.get("compile+graph")
    if tri is None:
        return []
    speed_e = _ratio(tri["time_s"], eager["time_s"]) if eager else None
    speed_c = _ratio(tri["time_s"], comp["time_s"]) if comp else None
    return ["with CUDA graphs: triton+graph",
            _check(f"{speed_e:.2f}x eager+graph (>= 1.25)" if speed_e else "eager+graph -", bool(speed_e and speed_e >= 1.25)),
            _check(f"{speed_c:.2f}x compile+graph (>= 1.0)" if speed_c else "compile+graph -",
                   bool(speed_c and speed_c >= 1.0))]


LARGE = 4 << 20  # elements: below this a kernel is launch-bound (< ~6 us of traffic on an H100)


def _numel(case: str) -> int:
    """Elements of the shape written as AxBxCxD in a case name."""
    for word in case.split():
        if "x" in word and all(part.isdigit() for part in word.split("x")):
            total = 1
            for part in word.split("x"):
                total *= int(part)
            return total
    return 0


def _check(text: str, ok: bool) -> str:
    return f"{'PASS' if ok else 'MISS'} {text}"


def markdown(payload: dict[str, Any]) -> str:
    meta, rows = payload["meta"], payload["results"]
    copy_bw = meta.get("copy_bandwidth_Bps") or 0.0
    lines = [
        f"Device: {meta.get('device')} | commit {meta.get('commit')} | {meta.get('date')} | torch {meta.get('torch')} "
        f"| triton {meta.get('triton')}",
        f"Measured copy bandwidth (read + write): {copy_bw / 1e9:.0f} GB/s"
        + (f" | bf16 matmul: {meta['matmul_bf16_flops'] / 1e12:.0f} TFLOP/s" if meta.get("matmul_bf16_flops") else ""),
        "",
    ]
    if meta.get("env"):
        lines[-1:-1] = ["Settings: " + ", ".join(f"{k}={v}" for k, v in meta["env"].items())]
    lines += ["Rows marked L2: the rotation of input sets is smaller than 4x the L2 cache, so part of the",
              "traffic is served from cache and the bandwidth overstates DRAM speed (small shapes only).", ""]
    for suite in ("group_norm", "noise", "unet"):
        cases = _by_case(rows, suite)
        if not cases:
            continue
        present = [v for v in VARIANTS if any(v in c for c in cases.values())]
        unit = "images/s" if suite == "unet" else "GB/s (% copy)"
        lines += [f"### {suite}", "", f"Target: {TARGETS[suite]}", ""]
        fused = "fused" if suite == "unet" else "triton"
        header = ["case"] + present + [f"{fused} vs eager", f"{fused} vs compile", f"{fused} {unit}", "targets"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for case, v in cases.items():
            tri = _fused(suite, v)
            cells = [case] + [_cell(v[p], v) if p in v else "-" for p in present]
            se = _ratio(tri["time_s"], v["eager"]["time_s"]) if _comparable(tri, v.get("eager")) else None
            sc = _ratio(tri["time_s"], v["compile"]["time_s"]) if _comparable(tri, v.get("compile")) else None
            cells += [f"{se:.2f}x" if se else "-", f"{sc:.2f}x" if sc else "-"]
            if suite == "unet":
                mfu = tri["extra"].get("mfu") if tri else None
                cells.append(f"{tri['extra'].get('images_per_s', 0):.0f}" + (f" (MFU {mfu:.0%})" if mfu else "")
                             if tri else "-")
            else:
                in_l2 = tri and tri["extra"].get("exceeds_4x_l2") is False  # the rotation fits in cache
                cells.append(f"{tri['bandwidth_GBps']:.0f} ({tri['fraction_of_copy_bw']:.0%})" + (" L2" if in_l2 else "")
                             if tri and tri.get("fraction_of_copy_bw") is not None else "-")
            cells.append("; ".join(_target_checks(suite, case, v)) or "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines + _host_table(rows))


HOST_VARIANTS = ("wrapper", "triton", "triton jit", "eager", "autograd floor")


def _host_table(rows: list[dict[str, Any]]) -> list[str]:
    """Host microseconds per call (test_bench_host.py): no targets, the cost the GPU waits on."""
    cases = _by_case(rows, "host")
    if not cases:
        return []
    present = [v for v in HOST_VARIANTS if any(v in c for c in cases.values())]
    lines = ["### host", "", "Host time per call, tiny tensors, no synchronisation (wrapper: Triton launches "
             "stubbed out; triton: real launches, GroupNorm launched directly after the first call; triton jit: every "
             "launch through the jit function)", "",
             "| " + " | ".join(["case"] + present) + " |", "|" + "---|" * (len(present) + 1)]
    for case, v in cases.items():
        lines.append("| " + " | ".join([case] + [f"{v[p]['time_s'] * 1e6:.1f} us" if p in v else "-"
                                                 for p in present]) + " |")
    return lines + [""]


def merge(paths: list[str]) -> dict[str, Any]:
    """One payload from several runs' JSON (the first file's meta; every file's results)."""
    merged: dict[str, Any] = {"meta": {}, "results": []}
    for path in paths:
        with open(path) as fh:
            payload = json.load(fh)
        merged["meta"] = merged["meta"] or payload["meta"]
        merged["results"] += payload["results"]
    return merged


def main(argv: list[str]) -> None:
    out = None
    if argv[:1] == ["--merge-json"]:
        out, argv = argv[1], argv[2:]
    merged = merge(argv)
    if out:
        with open(out, "w") as fh:
            json.dump(merged, fh, indent=1)
    print(markdown(merged))


if __name__ == "__main__":
    main(sys.argv[1:])
