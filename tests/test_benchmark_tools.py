"""The benchmark tooling the GPU sessions rely on (device time is scarce: a bug here wastes a call or
publishes a wrong number): the harness rotates outputs as well as inputs, the summary never divides
a graph-timed row by a stream-timed one, and run_all.sh leaves results in $OUT after each stage and
stays inside its total time limit."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import _harness  # noqa: E402
import summarize  # noqa: E402

H100_RESULTS = ROOT / "benchmarks" / "results" / "2026-11-22-h100"


class _Stats:
    def __init__(self) -> None:
        self.stats = type("S", (), {"median": 1e-3, "min": 1e-3})()


class FakeBenchmark:
    """pytest-benchmark's pedantic(), without the timing."""

    def __init__(self) -> None:
        self.extra_info: dict = {}
        self.stats = _Stats()

    def pedantic(self, target, rounds, iterations, warmup_rounds):
        for _ in range(rounds + warmup_rounds):
            target()


def test_each_call_writes_fresh_memory_while_its_previous_output_lives():
    """An output dropped at once hands its block to the next call, whose writes then hit lines
    still in L2 (overstating bandwidth); kept until the set's next call, it cannot be reused."""
    addresses: dict[int, list[int]] = {0: [], 1: []}

    def fn(i, x):
        out = x * 2
        addresses[i].append(out.data_ptr())
        return out

    sets = [(0, torch.ones(1 << 16)), (1, torch.ones(1 << 16))]
    _harness.measure(FakeBenchmark(), fn, sets, torch.device("cpu"))
    for seen in addresses.values():
        assert len(seen) > 3 and all(a != b for a, b in zip(seen, seen[1:]))


def test_a_stream_timed_row_is_marked_and_never_divided_by_a_graph_timed_one():
    payload = json.loads((H100_RESULTS / "results.json").read_text())
    case = "fwd 16x128x64x64 bfloat16 nchw"
    times = {}
    for row in payload["results"]:
        if row["suite"] == "group_norm" and row["case"] == case:
            times[row["variant"]] = row["time_s"]
            if row["variant"] == "compile":
                row["timing"] = "stream"  # as if its capture had failed
    line = next(ln for ln in summarize.markdown(payload).splitlines() if ln.startswith(f"| {case} |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # cells: case, eager, compile, triton, vs eager, vs compile, ...; the expected text is made
    # from the raw times here, not copied from the summary
    assert cells[2] == f"{times['compile'] * 1e6:.1f} us (stream)"
    assert cells[4] == f"{times['eager'] / times['triton']:.2f}x" and cells[5] == "-"
    assert "timing differs" in cells[-1] and "MISS compile -" in cells[-1]


def test_the_settings_in_effect_are_shown():
    payload = json.loads((H100_RESULTS / "results.json").read_text())
    payload["meta"]["env"] = {"GENSCALE_NOISE_TILE": "4096"}
    assert "Settings: GENSCALE_NOISE_TILE=4096" in summarize.markdown(payload).splitlines()[:4]


def _run_all(tmp_path: Path, total_limit: int) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / f"out{total_limit}"
    env = {**os.environ, "OUT": str(out), "TOTAL_LIMIT": str(total_limit), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_all.sh"), "host"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc, out


def test_run_all_publishes_after_each_stage_and_skips_what_no_longer_fits(tmp_path):
    proc, out = _run_all(tmp_path, 200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert {r["suite"] for r in results["results"]} == {"host"}
    assert (out / "summary.md").is_file() and (out / "raw.tar.gz").is_file()
    proc, out = _run_all(tmp_path, 40)  # 40 s minus the 15 s reserve leaves less than a stage's 30
    assert "=== host: skipped" in proc.stdout and not (out / "results.json").exists()
