"""The vae through train.py and sample.py on two processes (resume is covered with ldm's)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.test_inpaint_end_to_end import launch_two_processes

ROOT = Path(__file__).resolve().parent.parent


def test_two_process_vae_then_sample_py(tmp_path):
    cache = tmp_path / "cache"
    config = launch_two_processes("vae", tmp_path / "ddp", cache, 29591, "--width", "8", "--z-channels", "8")
    assert config["world_size"] == 2 and config["options"]["beta"] == 1.0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENSCALE_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, str(ROOT / "genscale" / "sample.py"), "--run", str(tmp_path / "ddp"),
                           "--num", "5", "--out", str(tmp_path / "s.npz")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (5, 8, 8, 1)
