"""`sample.py --task inpaint` on runs of every family that fills holes, and exact resume of inpaint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
COMMON = ["--batch-size", "8", "--ckpt-every", "2", "--sample-every", "4", "--log-every", "2", "--num-workers", "1",
          "--image-size", "8"]
TINY = {"inpaint": ["--width", "8"],
        "transformer": ["--dim", "16", "--depth", "1", "--heads", "2", "--sampling-steps", "3"],
        "gan-inpaint": ["--g-width", "8", "--d-width", "8", "--patch-layers", "1"]}


def env(cache: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "GENSCALE_THREADS": "1", "GENSCALE_CACHE": str(cache)}


def train(model: str, out: Path, cache: Path, steps: int = 4) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "genscale" / "train.py"), "--model", model, *COMMON,
                           *TINY[model], "--steps", str(steps), "--out", str(out)],
                          cwd=ROOT, env=env(cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def inpaint(run: Path, images: Path, masks: Path, out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "genscale" / "sample.py"), "--run", str(run), "--task", "inpaint",
                           "--input", str(images), "--mask", str(masks), "--out", str(out), *extra],
                          cwd=ROOT, env=env(cache), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 8, 8, 1), dtype=np.uint8)
    masks = np.ones((6, 8, 8), np.uint8)
    masks[:, 2:6, 2:6] = 0  # centre boxes
    masks[3:] = rng.random((3, 8, 8)) > 0.5  # scattered pixels
    np.savez(folder / "images.npz", images)
    np.savez(folder / "masks.npz", masks)
    return folder / "images.npz", folder / "masks.npz", images, masks


@pytest.mark.parametrize("model", ["inpaint", "transformer", "gan-inpaint"])
def test_sample_py_inpaints_with_every_inpainting_family(model, cache, inputs, tmp_path):
    images_path, masks_path, images, masks = inputs
    train(model, tmp_path / "run", cache)
    proc = inpaint(tmp_path / "run", images_path, masks_path, tmp_path / "out", cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    filled = np.load(tmp_path / "out.npz")["arr_0"]
    assert filled.shape == images.shape and filled.dtype == np.uint8
    assert np.array_equal(filled[masks == 1], images[masks == 1])  # bit for bit
    assert not np.array_equal(filled[masks == 0], images[masks == 0])
    assert (tmp_path / "out.png").is_file()
    # plain sampling fills held-out images of the run's data (inpaint refused it: only gan-inpaint did)
    plain = subprocess.run([sys.executable, str(ROOT / "genscale" / "sample.py"), "--run", str(tmp_path / "run"),
                            "--num", "4", "--out", str(tmp_path / "plain.npz")],
                           cwd=ROOT, env=env(cache), capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert np.load(tmp_path / "plain.npz")["arr_0"].shape == (4, 8, 8, 1)
    if model == "inpaint":  # usage errors: one clear line, no traceback
        np.savez(tmp_path / "bad.npz", masks[:, :4])
        for args, fragment in [((images_path, tmp_path / "bad.npz"), "--mask arr_0 must be"),
                               ((images_path, tmp_path / "none.npz"), "does not exist")]:
            bad = inpaint(tmp_path / "run", *args, tmp_path / "x.npz", cache)
            assert bad.returncode == 2 and fragment in bad.stderr and "Traceback" not in bad.stderr
        missing = subprocess.run([sys.executable, str(ROOT / "genscale" / "sample.py"), "--run", str(tmp_path / "run"),
                                  "--task", "inpaint", "--out", str(tmp_path / "y.npz")],
                                 cwd=ROOT, env=env(cache), capture_output=True, text=True, timeout=300)
        assert missing.returncode == 2 and "needs --input" in missing.stderr


def launch_two_processes(model: str, out: Path, cache: Path, port: int, *extra: str) -> dict:
    """A 2-process gloo launch through accelerate's CPU config; returns the run's config.json."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "cpu.yaml"), "--main_process_port", str(port),
           str(ROOT / "genscale" / "train.py"), "--model", model, *COMMON, *extra, "--steps", "2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints" / "step-00000002" / "ema.pt").is_file()
    return json.loads((out / "config.json").read_text())


def test_two_process_inpaint_is_one_job(cache, tmp_path):
    assert launch_two_processes("inpaint", tmp_path / "ddp", cache, 29571, *TINY["inpaint"])["world_size"] == 2


def test_resumed_inpaint_run_equals_the_uninterrupted_one(cache, tmp_path):
    train("inpaint", tmp_path / "full", cache, steps=4)
    train("inpaint", tmp_path / "cut", cache, steps=2)
    train("inpaint", tmp_path / "cut", cache, steps=4)  # resumes from step 2
    name = Path("checkpoints") / "step-00000004" / "model.safetensors"
    a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "cut" / name))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
