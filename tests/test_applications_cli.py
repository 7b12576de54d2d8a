"""sample.py --task denoise|img2img|inpaint|anagram|hybrid on tiny untrained runs: outputs, seeds, errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from genscale.cli import run_main
from genscale.sample import generate, main
from tests.test_applications_support import tiny_run

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    images = (np.random.default_rng(0).random((3, 8, 8, 1)) * 255).astype(np.uint8)
    np.savez(root / "images.npz", images)
    masks = np.ones((3, 8, 8), np.uint8)
    masks[:, 3:6, 2:7] = 0
    np.savez(root / "masks.npz", masks)
    np.savez(root / "big.npz", np.zeros((2, 16, 16, 1), np.uint8))
    np.savez(root / "masks2.npz", np.ones((2, 8, 8), np.uint8))
    return dict(root=root, ddpm=tiny_run(root / "ddpm"), denoiser=tiny_run(root / "denoiser", "denoiser", width=8),
                gan=tiny_run(root / "gan", "gan"))


def cli(argv, capsys):
    """(exit code, stdout, stderr) of sample.py's main, in process."""
    with pytest.raises(SystemExit) as exit_:
        run_main(main, [str(a) for a in argv])
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


TASKS = {
    "denoise": ["--input", "{root}/images.npz", "--t", "10", "--steps", "3"],
    "img2img": ["--input", "{root}/images.npz", "--levels", "0,0.5,1", "--steps", "4", "--labels", "3"],
    "inpaint": ["--input", "{root}/images.npz", "--mask", "{root}/masks.npz", "--steps", "6", "--jump-length", "2",
                "--jump-count", "2"],
    "anagram": ["--num", "2", "--steps", "4", "--views", "identity,rot90", "--labels", "6,9"],
    "hybrid": ["--num", "2", "--steps", "4", "--labels", "8,1", "--sigma", "1.0"],
}


@pytest.mark.parametrize("task", list(TASKS))
def test_task_writes_grid_and_uint8_npz_and_is_seeded(task, runs, tmp_path, capsys):
    args = [a.format(root=runs["root"]) for a in TASKS[task]]
    outs = []
    for name in ("a", "b"):
        code, stdout, err = cli(["--run", runs["ddpm"], "--task", task, "--seed", "3", "--out", tmp_path / name, *args],
                                capsys)
        assert code == 0, err
        assert (tmp_path / f"{name}.png").is_file() and "wrote" in stdout
        outs.append(np.load(tmp_path / f"{name}.npz"))
    arr = outs[0]["arr_0"]
    expected = {"img2img": 9, "anagram": 2, "hybrid": 2}.get(task, 3)  # img2img: 3 images x 3 levels
    assert arr.dtype == np.uint8 and arr.shape == (expected, 8, 8, 1)
    assert np.array_equal(arr, outs[1]["arr_0"])  # same seed, same output
    if task == "inpaint":
        images, masks = np.load(runs["root"] / "images.npz")["arr_0"], np.load(runs["root"] / "masks.npz")["arr_0"]
        assert np.array_equal(arr[masks == 1], images[masks == 1])
        # the copy above is made by run_inpainting itself: also require that the holes were filled
        assert np.mean(arr[masks == 0] != images[masks == 0]) > 0.5
    if task == "img2img":
        assert np.array_equal(arr[0::3], np.load(runs["root"] / "images.npz")["arr_0"])  # level 0 is the guide


@pytest.mark.parametrize("run, argv, message", [
    ("ddpm", ["--task", "anagram", "--views", "identity,hflip"], "unknown view 'hflip'"),
    ("ddpm", ["--task", "anagram", "--labels", "6,9,1"], "--labels must name 2 classes"),
    ("ddpm", ["--task", "denoise", "--input", "{root}/big.npz"], "the run works on 8 x 8 images"),
    ("ddpm", ["--task", "inpaint", "--input", "{root}/images.npz", "--mask", "{root}/masks2.npz"], "--mask arr_0"),
    ("ddpm", ["--task", "img2img", "--input", "{root}/images.npz", "--levels", "0.5,2"], "between 0 and 1"),
    ("gan", ["--task", "anagram"], "needs a diffusion run"),
    ("gan", ["--task", "denoise", "--input", "{root}/images.npz"], "needs a diffusion run"),
    ("denoiser", ["--task", "hybrid"], "denoiser run does --task denoise only"),
    ("ddpm", ["--task", "denoise", "--input", "{root}/images.npz", "--t", "20"], "--t must be a timestep"),
    ("ddpm", ["--task", "denoise", "--input", "{root}/truncated.npz"], "is not a readable .npz"),
    ("ddpm", ["--task", "img2img", "--input", "{root}/images.npz", "--steps", "0"], "--steps must be at least 1"),
    ("ddpm", ["--task", "img2img", "--input", "{root}/images.npz", "--batch-size", "0"], "--batch-size must be"),
    ("ddpm", ["--task", "anagram", "--num", "0"], "--num must be at least 1"),
    ("ddpm", ["--task", "anagram", "--views", "identity,rot180,vflip"], "--task anagram needs --labels with 3 classes"),
])
def test_bad_input_is_one_line_and_exit_2(run, argv, message, runs, tmp_path, capsys):
    whole = (runs["root"] / "images.npz").read_bytes()
    (runs["root"] / "truncated.npz").write_bytes(whole[: len(whole) // 2])  # a copy cut short
    argv = [a.format(root=runs["root"]) for a in argv]
    code, _, err = cli(["--run", runs[run], "--out", tmp_path / "x", *argv], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err, err


def test_cli_error_from_a_real_process(runs, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "genscale" / "sample.py"), "--run", str(runs["ddpm"]),
                           "--task", "anagram", "--views", "identity,spin", "--out", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: unknown view 'spin'; choose from identity, vflip, rot180, rot90"]


def test_unconditional_run_gets_no_labels_even_with_labels_all(runs):
    images, labels = generate(str(runs["gan"]), 4, "all", seed=0, device="cpu")
    assert images.shape == (4, 8, 8, 1) and labels.tolist() == [-1, -1, -1, -1]
    _, cond = generate(str(runs["ddpm"]), 4, "all", seed=0, sampling_steps=2, device="cpu")
    assert cond.tolist() == [0, 1, 2, 3]
