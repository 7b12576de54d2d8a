"""sample.py's batches: seeded by (seed, batch) alone, so one process and a multi-process launch
write the same file, and the samples are those evaluate.py scores with the same seed and chunks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from genscale.errors import UserError
from tests.test_cli_errors_audit import cache, tiny_run  # noqa: F401 -- fixtures

ROOT = Path(__file__).resolve().parent.parent


def test_samples_are_the_ones_evaluate_scores(tiny_run):  # noqa: F811
    from genscale.metrics.evaluation import family_images
    from genscale.sample import generate, load_family, parse_labels

    images, labels = generate(str(tiny_run), 7, "all", seed=5, batch_size=3, device="cpu")
    family, _, _ = load_family(tiny_run, "cpu")
    draw = family_images(family, parse_labels("all", 7, 10), 5)
    expected = np.concatenate([draw(0, 0, 3), draw(1, 3, 6), draw(2, 6, 7)])
    assert images.shape == (7, 8, 8, 1) and np.array_equal(images, expected)
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 6]
    other_seed, _ = generate(str(tiny_run), 7, "all", seed=6, batch_size=3, device="cpu")
    assert not np.array_equal(images, other_seed)  # the comparison above is not between constants


def test_two_processes_write_what_one_process_writes(tiny_run, tmp_path):  # noqa: F811
    args = [str(ROOT / "genscale" / "sample.py"), "--run", str(tiny_run), "--num", "7", "--batch-size", "3",
            "--seed", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "accelerate_configs" / "cpu.yaml"), "--main_process_port", "29593"]
    two = subprocess.run([*launch, *args, "--out", str(tmp_path / "two.npz")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one.npz")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1  # rank 0 writes; before, every rank wrote the whole file
    a, b = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert a["arr_0"].shape == (7, 8, 8, 1)
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])


def test_a_task_under_a_multi_process_launch_is_refused(tiny_run, tmp_path, monkeypatch):  # noqa: F811
    from genscale.sample import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--task denoise runs in one process; start it with python"):
        main(["--run", str(tiny_run), "--task", "denoise", "--out", str(tmp_path / "d.png")])
    assert not (tmp_path / "d.png").exists()
