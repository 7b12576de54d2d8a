"""A stop signal sent to the whole job, as SLURM sends it (scancel, the time limit, preemption) and
a terminal sends Ctrl-C: every process of the group gets it, the loader workers too. The trainer
must save and exit cleanly; a worker that dies of the signal first crashes it before it can save.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from genscale import checkpoints as ckpt
from tests.test_cli_errors_audit import TINY

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups as SLURM uses them on Linux")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_stop_signal_to_the_whole_process_group_saves_and_exits_cleanly(tmp_path, sig):
    out = tmp_path / "run"
    # default threads: at fork torch then starts a thread in each loader worker, where the signal can land
    env = {**os.environ, "GENSCALE_CACHE": str(tmp_path / "cache")}
    env.pop("GENSCALE_THREADS", None)
    proc = subprocess.Popen([sys.executable, str(ROOT / "genscale" / "train.py"), *TINY, "--steps", "100000",
                             "--ckpt-every", "100000", "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own group: the signal below reaches no one else
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        os.killpg(proc.pid, sig)  # the trainer and its loader worker alike
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "Traceback" not in stderr, stderr[-3000:]
    assert proc.returncode == 0, stderr[-3000:]
    saved = [step for step, _ in ckpt.list_checkpoints(out)]
    assert len(saved) == 1 and saved[0] >= 3
    assert f"received {sig.name}: saved step {saved[0]}" in stdout + stderr
