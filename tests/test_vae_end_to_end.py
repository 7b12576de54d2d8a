"""The vae through train.py and sample.py on two processes (resume is covered with ldm's)."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_inpaint_end_to_end import launch_two_processes

ROOT = Path(__file__).resolve().parent.parent


def test_two_process_vae_then_sample_py(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    config = launch_two_processes("vae", tmp_path / "ddp", cache, 29591, "--width", "8", "--z-channels", "8")
    assert config["world_size"] == 2 and config["options"]["beta"] == 1.0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENSCALE_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, str(ROOT / "genscale" / "sample.py"), "--run", str(tmp_path / "ddp"),
                           "--num", "5", "--out", str(tmp_path / "s.npz")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (5, 8, 8, 1)

    # the held-out negative ELBO is printed and logged when training finishes, with the EMA weights
    final = [r for r in map(json.loads, (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines())
             if r.get("kind") == "final"]
    assert len(final) == 1 and final[0]["step"] == 2 and final[0]["test_images"] == 359
    assert final[0]["test_bits_per_dim"] == pytest.approx(final[0]["test_nelbo_nats"] / (64 * math.log(2)), rel=1e-3)
    assert final[0]["test_nelbo_nats"] == pytest.approx(final[0]["test_rec_nats"] + final[0]["test_kl_nats"], abs=2e-3)
    monkeypatch.setenv("GENSCALE_CACHE", str(cache))
    from genscale.sample import load_family

    family, _, _ = load_family(tmp_path / "ddp")
    assert family.test_elbo()["nelbo_nats"] == pytest.approx(final[0]["test_nelbo_nats"], abs=1e-3)
    from genscale import evaluate

    assert evaluate.main(["--run", str(tmp_path / "ddp"), "--metric", "nelbo", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["nelbo_nats"] == pytest.approx(final[0]["test_nelbo_nats"],
                                                                                       abs=1e-3)
