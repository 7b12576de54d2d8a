"""Benchmark session: device facts measured once, one record per timed case, JSON + summary at the end.

Run: ``pytest benchmarks/ --benchmark-only`` (results go to $BENCH_OUT, default runs/benchmarks/...).
Without --benchmark-only (e.g. a plain ``pytest benchmarks/``) every benchmark is skipped.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmarks' own helper modules

import _harness  # noqa: E402
import summarize  # noqa: E402

RECORDS = pytest.StashKey[list]()
FACTS = pytest.StashKey[dict]()
REPO = Path(__file__).resolve().parent.parent

# torch.compile benchmarks compile one graph per shape; keep dynamo from giving up on recompiles.
for _name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 4096)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU")
    config.stash[RECORDS] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("benchmark_only", default=False) or config.getoption("benchmark_enable", default=False):
        return
    skip = pytest.mark.skip(reason="benchmarks run with --benchmark-only")
    here = Path(__file__).resolve().parent
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def facts(request: pytest.FixtureRequest, device: torch.device) -> dict:
    """Device facts measured in this run: the copy bandwidth every result is compared with."""
    got = request.config.stash.get(FACTS, None)
    if got is None:
        got = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "device_type": device.type,
            "copy_bandwidth_Bps": _harness.copy_bandwidth(device),
            "matmul_bf16_flops": _harness.matmul_flops(device),
            "datasheet_bf16_flops": _harness.datasheet_peak(device),
            "l2_bytes": _harness.l2_bytes(device),
            "sm_count": torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None,
        }
        request.config.stash[FACTS] = got
    return got


@pytest.fixture
def record(request: pytest.FixtureRequest, facts: dict):
    """record(Record) keeps a result for the JSON and adds it to pytest-benchmark's extra_info."""

    def add(rec: _harness.Record, benchmark=None) -> None:
        row = rec.as_dict(facts["copy_bandwidth_Bps"])
        request.config.stash[RECORDS].append(row)
        if benchmark is not None:
            benchmark.extra_info.update({k: v for k, v in row.items() if k not in ("extra",)})
            benchmark.extra_info.update(rec.extra)
            benchmark.extra_info["copy_bandwidth_GBps"] = facts["copy_bandwidth_Bps"] / 1e9

    return add


def _git_commit() -> str:
    """The commit measured. BENCH_COMMIT overrides git: a device machine may receive the working tree
    with a stale .git (seen: it reported the session's starting commit "+dirty")."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "benchmarks"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    rows = config.stash.get(RECORDS, [])
    if not rows:
        return
    facts = config.stash.get(FACTS, {})
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    meta = {
        **facts,
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        # tuning knobs and benchmark settings in effect: two runs with different ones must not look alike
        "env": {k: v for k, v in sorted(os.environ.items())
                if k.startswith(("GENSCALE_", "TRITON_", "TORCHINDUCTOR_", "BENCH_"))
                and k not in ("BENCH_OUT", "BENCH_NAME", "BENCH_COMMIT")},
    }
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(os.environ.get("BENCH_OUT") or REPO / "runs" / "benchmarks" / f"{facts.get('device_type', 'x')}-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    name = os.environ.get("BENCH_NAME", "results")
    payload = {"meta": meta, "results": rows}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1))
    (out / f"{name}.md").write_text(summarize.markdown(payload))
    print(f"\nbenchmark results: {out / (name + '.json')}\n" + summarize.markdown(payload))
