"""A hostile user's inputs to the four command lines: each one gives one clear sentence and a
non-zero exit before any work is lost, and never damages the run it points at. Every test here
failed before the fix it names (a traceback, a silently ignored value, a rewritten config.json,
an error only after the whole evaluation, or a usage dump of thirty lines)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from genscale.config import parse_train_args
from genscale.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--steps", "2", "--batch-size", "8", "--ckpt-every", "2", "--sample-every", "0", "--timesteps", "20",
        "--base-width", "16", "--channel-mults", "1,2", "--attention-res", "4", "--image-size", "8",
        "--num-workers", "1", "--log-every", "1", "--sampling-steps", "3"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def train_proc(cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENSCALE_THREADS": "1", "GENSCALE_CACHE": str(cache)}
    return subprocess.run([sys.executable, str(ROOT / "genscale" / "train.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def one_error_line(stderr: str, fragment: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and fragment in lines[0], stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache) -> Path:
    out = tmp_path_factory.mktemp("runs") / "ddpm"
    proc = train_proc(cache, *TINY, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_divergence_before_the_first_checkpoint_promises_no_checkpoint(tmp_path, cache):
    proc = train_proc(cache, *TINY, "--steps", "6", "--ckpt-every", "6", "--lr", "1e30", "--grad-clip", "0",
                      "--warmup-steps", "0", "--out", str(tmp_path / "run"))
    assert proc.returncode == 1, proc.stderr[-3000:]
    one_error_line(proc.stderr, "no checkpoint had been saved yet")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("sub", ["", "run"])
def test_train_out_that_is_or_is_under_a_file(tmp_path, sub):
    from genscale.train import main

    afile = tmp_path / "notes.txt"
    afile.write_text("keep me")
    out = afile / sub if sub else afile
    with pytest.raises(UserError, match="is a file") as err:  # was FileExistsError / NotADirectoryError
        main(["--out", str(out), "--steps", "1"])
    assert err.value.exit_code == 2 and afile.read_text() == "keep me"


@pytest.mark.parametrize("flag, value", [("--lr", "nan"), ("--lr", "inf"), ("--grad-clip", "nan"),
                                         ("--ema-decay", "nan"), ("--cfg-scale", "nan")])
def test_non_finite_numbers_are_refused(flag, value):
    # nan passed "--lr must be positive" (every comparison with nan is false) and inf diverged later
    with pytest.raises(UserError, match=f"{flag} must be a finite number"):
        parse_train_args([flag, value])


def test_usage_errors_are_one_line(capsys, tmp_path):
    from genscale import evaluate, sample
    from genscale.data import write_shards

    calls = [(lambda: parse_train_args(["--stepz", "3"]), "unrecognized arguments: --stepz"),
             (lambda: sample.main(["--run", "r", "--out", "o.png", "--nm", "4"]), "unrecognized arguments: --nm"),
             (lambda: evaluate.parse_args(["--run", "r", "--metric", "fdi"]), "invalid choice: 'fdi'"),
             (lambda: write_shards.main([str(tmp_path)]), "required: out_dir")]
    for call, fragment in calls:
        with pytest.raises((UserError, SystemExit)) as err:
            call()
        code = err.value.exit_code if isinstance(err.value, UserError) else err.value.code
        assert code == 2
        stderr = capsys.readouterr().err
        assert stderr.count("\n") == 1 and fragment in stderr and "--help" in stderr, stderr


@pytest.mark.parametrize("args, fragment", [
    (["--batch-size", "0"], "--batch-size must be positive"),  # was range() arg 3 must not be zero
    (["--batch-size", "-2"], "--batch-size must be positive"),  # was need at least one array to concatenate
    (["--sampling-steps", "0"], "--sampling-steps must be between 1 and 20"),  # was silently the default
    (["--sampling-steps", "500"], "--sampling-steps must be between 1 and 20"),  # was a ValueError traceback
    (["--cfg-scale", "nan"], "--cfg-scale must be a finite number"),  # was blank images and exit 0
])
def test_sample_bad_numbers(tiny_run, tmp_path, args, fragment):
    from genscale.sample import main

    with pytest.raises(UserError, match=fragment):
        main(["--run", str(tiny_run), "--num", "2", "--out", str(tmp_path / "s.png"), *args])
    assert not list(tmp_path.iterdir())


def test_sample_out_unwritable_is_refused_before_sampling(tiny_run, tmp_path, monkeypatch):
    import genscale.sample as sample

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking --out")

    monkeypatch.setattr(sample, "generate", no_sampling)
    (tmp_path / "grid.png").mkdir()
    (tmp_path / "afile").write_text("x")
    for out, fragment in [(tmp_path / "grid.png", "is a folder"), (tmp_path / "afile" / "s.png", "is a file"),
                          (tmp_path / "s.jpg", "must end in .png or .npz"),
                          (tmp_path / "s.png.", "must end in .png or .npz"),  # wrote s.png..png and s.png..npz
                          # root may write in /proc, yet nothing can be made there: was a traceback after sampling
                          (Path("/proc/genscale-none/s.png"), "/proc/genscale-none")]:
        with pytest.raises(UserError, match=fragment):
            sample.main(["--run", str(tiny_run), "--num", "2", "--out", str(out)])


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_a_run_folder_that_cannot_be_created(cache):
    proc = train_proc(cache, *TINY, "--out", "/proc/genscale-none/run")
    assert proc.returncode != 0
    one_error_line(proc.stderr, "--out /proc/genscale-none/run")


@pytest.mark.parametrize("name, written", [("S.PNG", ["S.PNG"]), ("S.Npz", ["S.Npz"]), ("s", ["s.npz", "s.png"])])
def test_sample_out_suffix_in_any_case(tiny_run, tmp_path, name, written):
    """``--out S.PNG`` was refused ("must end in .png"), and numpy would have written "S.NPZ.npz"."""
    from PIL import Image

    from genscale.sample import main

    assert main(["--run", str(tiny_run), "--num", "3", "--seed", "4", "--out", str(tmp_path / name)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == written  # no temporary left behind
    for path in tmp_path.iterdir():
        if path.suffix.lower() == ".png":
            assert Image.open(path).format == "PNG"
        else:
            with np.load(path) as data:
                assert data["arr_0"].shape == (3, 8, 8, 1) and data["arr_0"].dtype == np.uint8  # grey digits
                assert data["arr_1"].shape == (3,) and data["arr_1"].dtype == np.int64


def test_config_json_that_is_not_a_mapping(tiny_run, tmp_path):
    import shutil

    from genscale.sample import load_family
    from genscale.train import check_same_run

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="damaged"):  # was AttributeError: 'list' object has no attribute 'get'
        load_family(run)
    with pytest.raises(UserError, match="damaged"):  # was TypeError: list indices must be integers
        check_same_run(parse_train_args(["--out", str(run)]))


def test_evaluate_bad_sampler_settings(tiny_run, capsys):
    from genscale import evaluate

    with pytest.raises(SystemExit):  # --sampler foo was accepted and silently ran DDIM
        evaluate.parse_args(["--run", str(tiny_run), "--metric", "accuracy", "--sampler", "foo"])
    assert "invalid choice: 'foo'" in capsys.readouterr().err
    assert evaluate.main(["--run", str(tiny_run), "--metric", "accuracy", "--num", "2",
                          "--sampling-steps", "999"]) == 2
    one_error_line(capsys.readouterr().err, "--sampling-steps must be between 1 and 20")


def test_evaluate_json_checked_before_the_evaluation(tiny_run, tmp_path, capsys):
    from genscale import evaluate

    (tmp_path / "result.json").mkdir()
    assert evaluate.main(["--run", str(tiny_run), "--metric", "accuracy", "--num", "2",
                          "--json", str(tmp_path / "result.json")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "", "the evaluation ran (and was thrown away) before --json was checked"
    one_error_line(captured.err, "is a folder")


def test_data_folder_of_images_points_to_the_shard_writer(tmp_path):
    from PIL import Image

    from genscale.data import resolve_data

    for i in range(3):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / f"img{i}.png")
    with pytest.raises(UserError, match="python -m genscale.data.write_shards"):
        resolve_data(str(tmp_path), "train", None)


@pytest.mark.parametrize("kind", ["npy", "truncated", "empty"])
def test_inpaint_inputs_that_are_not_npz(tmp_path, kind):
    from genscale.inpainting import load_inpainting_inputs

    images = np.zeros((2, 8, 8, 1), np.uint8)
    masks = tmp_path / "masks.npz"
    np.savez(masks, np.ones((2, 8, 8), np.uint8))
    bad = tmp_path / f"images.{'npy' if kind == 'npy' else 'npz'}"
    if kind == "npy":  # was TypeError: 'numpy.ndarray' object does not support the context manager protocol
        np.save(bad, images)
    elif kind == "truncated":  # was zipfile.BadZipFile
        np.savez(bad, images)
        bad.write_bytes(bad.read_bytes()[:100])
    else:  # was EOFError
        bad.write_bytes(b"")
    with pytest.raises(UserError, match="single array" if kind == "npy" else "not a readable .npz"):
        load_inpainting_inputs(str(bad), str(masks))


def test_log_with_a_tracker_that_is_not_installed(tmp_path, monkeypatch):
    import accelerate.utils

    from genscale.train import main

    # accelerate only warned and logged nowhere; the run went on without the logs asked for
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    with pytest.raises(UserError, match="--log-with tensorboard needs the tensorboard package"):
        main(["--log-with", "tensorboard", "--data", str(tmp_path / "no-data"), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_png_that_cannot_be_written_leaves_no_temporary(tmp_path):
    from genscale.run_files import save_png

    target = tmp_path / "grid.png"
    target.mkdir()  # was IsADirectoryError, and grid.png.tmp.png left behind
    with pytest.raises(UserError, match="cannot write"):
        save_png(target, np.zeros((4, 4, 1), np.uint8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


def test_write_shards_names_the_unreadable_file(tmp_path):
    from genscale.data.write_shards import write_shards

    src = tmp_path / "images"
    src.mkdir()
    (src / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError) as err:  # said: cannot identify image file <_io.BytesIO object at 0x...>
        write_shards(str(src), str(tmp_path / "shards"), progress=False)
    assert "broken.png: cannot identify image file" in str(err.value) and "BytesIO" not in str(err.value)


def test_evaluate_folder_with_an_unreadable_image(tmp_path, capsys):
    from types import SimpleNamespace

    from PIL import Image

    from genscale import evaluate
    from genscale.metrics.features import file_features

    folder = tmp_path / "samples"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "b.png")
    # the first file sets the shape: was PIL.UnidentifiedImageError from evaluate._folder_shape
    assert evaluate.main(["--samples", str(folder), "--metric", "fid"]) == 2
    one_error_line(capsys.readouterr().err, "a.png cannot be read as an image")
    # any file, read by clean-fid's loader before the network sees it: was the same traceback
    extractor = SimpleNamespace(device="cpu", dim=4, resizer=lambda: None)
    with pytest.raises(UserError, match="a.png"):
        file_features([str(folder / "b.png"), str(folder / "a.png")], extractor)


def test_config_option_that_is_a_folder_or_a_runs_config(tiny_run, tmp_path):
    with pytest.raises(UserError, match="is a folder"):  # said "does not exist" of a folder that exists
        parse_train_args(["--config", str(tmp_path)])
    # a run's config.json (train and options sections) was "unknown keys: data_info, device, ..."
    run = parse_train_args(["--config", str(tiny_run / "config.json"), "--steps", "5"])
    recorded = json.loads((tiny_run / "config.json").read_text())
    assert run.train.steps == 5 and run.train.batch_size == recorded["train"]["batch_size"] == 8
    assert run.options.base_width == recorded["options"]["base_width"] == 16
    assert run.train.out != recorded["train"]["out"]  # a copy of the settings, not a resume of that run


def test_vae_image_size_error_names_the_image_size(tmp_path, cache, monkeypatch):
    from genscale.train import main

    monkeypatch.setenv("GENSCALE_CACHE", str(cache))
    # said "the autoencoder's downsampling factor must be a power of two, got 10"
    with pytest.raises(UserError, match="needs an image size that is a power of two, got 10"):
        main(["--model", "vae", "--image-size", "10", "--out", str(tmp_path / "run")])


def test_write_shards_into_an_interrupted_write_says_so(tmp_path):
    from genscale.data.write_shards import main

    np.savez(tmp_path / "x.npz", np.zeros((4, 8, 8), np.uint8))
    (tmp_path / "out" / "train").mkdir(parents=True)  # what Ctrl-C leaves: shards, no info.json yet
    with pytest.raises(UserError, match="unfinished write .* remove it"):
        main([str(tmp_path / "x.npz"), str(tmp_path / "out"), "--quiet"])


def test_ctrl_c_during_evaluate_is_one_line(tiny_run, cache, tmp_path):
    import signal
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENSCALE_THREADS": "1", "GENSCALE_CACHE": str(cache)}
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, str(ROOT / "genscale" / "evaluate.py"), "--run", str(tiny_run),
                                 "--metric", "fid", "--num", "100000", "--sampling-steps", "20"],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.time() + 120
        while "fid samples" not in log.read_text() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    stderr = log.read_text()
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr[-3000:]  # was a KeyboardInterrupt traceback
    assert stderr.rstrip().endswith("interrupted")


def test_sampling_in_several_batches_shows_one_bar(tiny_run, capsys):
    from genscale.sample import generate

    images, labels = generate(str(tiny_run), 6, batch_size=2, progress=True)
    err = capsys.readouterr().err
    # was three DDIM bars of 3 steps each, restarting at 0, and no count of the images
    assert "samples" in err and "6/6" in err and "DDIM" not in err
    quiet, _ = generate(str(tiny_run), 6, batch_size=2, progress=False)
    assert np.array_equal(images, quiet) and images.shape == (6, 8, 8, 1) and list(labels) == [0, 1, 2, 3, 4, 5]


def test_info_json_with_a_value_of_the_wrong_type(tmp_path):
    from genscale.data import resolve_data
    from genscale.data.write_shards import write_shards

    src = tmp_path / "x.npz"
    np.savez(src, np.zeros((4, 8, 8), np.uint8))
    write_shards(str(src), str(tmp_path / "shards"), test_fraction=0.0, progress=False)
    info = json.loads((tmp_path / "shards" / "info.json").read_text())
    (tmp_path / "shards" / "info.json").write_text(json.dumps({**info, "channels": "x"}))
    # said: "info.json lacks a valid invalid literal for int() with base 10: 'x' entry."
    with pytest.raises(UserError, match="holds a value of the wrong type"):
        resolve_data(str(tmp_path / "shards"), "train", None)


@pytest.mark.parametrize("model, metric, fragment", [
    ("gan", "accuracy", "needs a class-conditional model"),  # scored chance agreement with unseen labels
    ("vae", "psnr", "needs a model that fills holes"),  # failed at the first evaluation, after training
])
def test_eval_metric_the_model_cannot_serve(tmp_path, cache, monkeypatch, model, metric, fragment):
    from genscale.train import main

    monkeypatch.setenv("GENSCALE_CACHE", str(cache))
    with pytest.raises(UserError, match=fragment):
        main(["--model", model, "--steps", "4", "--eval-every", "2", "--eval-metric", metric, "--eval-num", "20",
              "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()  # refused before the run folder is made


def test_evaluate_accuracy_of_an_unconditional_run(tmp_path, cache, capsys):
    from genscale import evaluate

    out = tmp_path / "vae"
    proc = train_proc(cache, "--model", "vae", "--steps", "2", "--sample-every", "0", "--num-workers", "1",
                      "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the vae trains on the labelled digits but draws without labels: this printed an "accuracy"
    # of the judge against labels the samples never saw (0.1000, exit 0)
    assert evaluate.main(["--run", str(out), "--metric", "accuracy", "--num", "20"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    one_error_line(captured.err, "needs a class-conditional run")


def test_evaluate_missing_reference_is_named_by_its_own_flag(tmp_path, capsys):
    from PIL import Image

    from genscale import evaluate

    folder = tmp_path / "samples"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "a.png")
    missing = tmp_path / "no-such-reference"
    assert evaluate.main(["--samples", str(folder), "--reference", str(missing), "--metric", "fid"]) == 2
    # was "--data '...' is neither ...": the user never typed --data
    one_error_line(capsys.readouterr().err, f"--reference '{missing}' is neither an embedded dataset")
