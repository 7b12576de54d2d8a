"""train.py and sample.py as a user runs them, on the embedded digits with a tiny U-Net."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--steps", "24", "--batch-size", "16", "--ckpt-every", "6", "--sample-every", "12", "--timesteps", "50",
        "--base-width", "16", "--channel-mults", "1,2", "--attention-res", "4", "--image-size", "8",
        "--num-workers", "1", "--log-every", "4", "--sampling-steps", "5"]


def env(cache: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "GENSCALE_THREADS": "1", "GENSCALE_CACHE": str(cache)}


def train(out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "genscale" / "train.py"), *TINY, "--out", str(out), *extra],
                          cwd=ROOT, env=env(cache), capture_output=True, text=True, timeout=600)


def final_weights(out: Path) -> dict:
    return load_file(str(out / "checkpoints" / "step-00000024" / "model.safetensors"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cache) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = train(out, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_run_folder_contents(reference_run):
    cfg = json.loads((reference_run / "config.json").read_text())
    assert cfg["world_size"] == 1 and cfg["train"]["model"] == "ddpm" and cfg["data_info"]["num_classes"] == 10
    assert cfg["options"]["channel_mults"] == [1, 2] and "torch" in cfg["versions"] and cfg["git_commit"]
    steps = [json.loads(line)["step"] for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(4, 25, 4))
    assert sorted(p.name for p in (reference_run / "samples").iterdir()) == ["step-00000012.png", "step-00000024.png"]
    assert (reference_run / "loss_curve.png").is_file()


def test_rerun_of_finished_run_exits_zero(reference_run, cache):
    proc = train(reference_run, cache)
    assert proc.returncode == 0 and "already at its last step" in proc.stdout


def test_kill_9_then_resume_is_bit_identical(reference_run, cache, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "genscale" / "train.py"), *TINY, "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-00000012").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert done and "step-00000024" not in done, f"the kill came too late to test anything: {done}"
    resumed = train(out, cache)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    ref, got = final_weights(reference_run), final_weights(out)
    assert ref.keys() == got.keys()
    for k in ref:
        assert ref[k].equal(got[k]), k


def test_sample_outputs_and_seed(reference_run, cache, tmp_path):
    def sample(out: Path, seed: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "genscale" / "sample.py"), "--run", str(reference_run),
                               "--num", "12", "--labels", "all", "--seed", seed, "--out", str(out), *extra],
                              cwd=ROOT, env=env(cache), capture_output=True, text=True, timeout=300)

    assert sample(tmp_path / "a", "1").returncode == 0
    assert sample(tmp_path / "b", "1").returncode == 0
    assert sample(tmp_path / "c", "2").returncode == 0
    a, b, c = (np.load(tmp_path / f"{n}.npz") for n in "abc")
    assert a["arr_0"].shape == (12, 8, 8, 1) and a["arr_0"].dtype == np.uint8
    assert a["arr_1"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert np.array_equal(a["arr_0"], b["arr_0"]) and not np.array_equal(a["arr_0"], c["arr_0"])
    assert (tmp_path / "a.png").is_file()
    proc = sample(tmp_path / "d.npz", "1", "--labels", "3", "--sampler", "ddpm")
    assert proc.returncode == 0 and np.load(tmp_path / "d.npz")["arr_1"].tolist() == [3] * 12
    proc = sample(tmp_path / "f.npz", "1", "--sampler", "dpm++2m", "--sampling-steps", "8")
    assert proc.returncode == 0 and np.load(tmp_path / "f.npz")["arr_0"].shape == (12, 8, 8, 1)
    bad = sample(tmp_path / "e.npz", "1", "--labels", "12")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_two_process_launch_is_one_job(cache, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "cpu.yaml"), "--main_process_port", "29541",
           str(ROOT / "genscale" / "train.py"), *TINY, "--steps", "6", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["num_machines"] == 1


def test_eval_every_logs_scores_and_keeps_best(cache, tmp_path):
    out = tmp_path / "eval"
    proc = train(out, cache, "--steps", "12", "--eval-every", "6", "--eval-metric", "accuracy", "--eval-num", "20",
                 "--keep-best")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r.get("kind") == "eval"]
    assert [r["step"] for r in evals] == [6, 12]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["eval_num"] == 20 and r["accuracy_floor"] > 0.9 for r in evals)
    best = max(evals, key=lambda r: (r["accuracy"], -r["step"]))
    meta = json.loads((out / "checkpoints" / "best" / "meta.json").read_text())
    assert meta["step"] == best["step"]
