"""Bad input gives one clear sentence and a non-zero exit, never a traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from genscale.config import parse_train_args
from genscale.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def run_script(script: str, *args: str, cache: Path | None = None, timeout: int = 300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENSCALE_THREADS": "1"}
    if cache is not None:
        env["GENSCALE_CACHE"] = str(cache)
    return subprocess.run([sys.executable, str(ROOT / "genscale" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_clean_error(proc, code: int, fragment: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr


def test_help_lists_every_model():
    from genscale.families import FAMILIES

    proc = run_script("train.py", "--help")
    assert proc.returncode == 0
    for name in FAMILIES:
        assert name in proc.stdout


@pytest.mark.parametrize("args, code, fragment", [
    (["--model", "nope"], 2, "unknown model 'nope'"),
    (["--steps", "-5"], 2, "--steps must be a positive number"),
    (["--batch-size", "0"], 2, "--batch-size must be a positive number"),
    (["--config", "/nonexistent/cfg.yaml"], 2, "does not exist"),
])
def test_train_usage_errors(args, code, fragment):
    assert_clean_error(run_script("train.py", *args), code, fragment)


def test_argparse_errors_exit_2():
    proc = run_script("train.py", "--steps", "many")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "invalid" in proc.stderr


def test_data_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    not_tar = tmp_path / "fake.tar"
    not_tar.write_text("this is not a tar archive")
    for spec, fragment in [(str(tmp_path / "missing"), "missing"), (str(empty), "empty"),
                           (str(not_tar), "not a tar")]:
        proc = run_script("train.py", "--data", spec, "--out", str(tmp_path / "run"), cache=tmp_path / "cache")
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
        assert fragment in proc.stderr.lower() or spec in proc.stderr, proc.stderr


def test_image_size_the_unet_cannot_take(tmp_path):
    proc = run_script("train.py", "--image-size", "12", "--channel-mults", "1,2,2,2", "--out",
                      str(tmp_path / "run"), cache=tmp_path / "cache")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    # one sentence: the "training at --image-size 12 (resized)" note came first
    assert proc.stderr.strip().count("\n") == 0 and "12" in proc.stderr, proc.stderr


def test_config_file_values_and_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 77\nbatch-size: 5\nchannel_mults: [1, 2]\nschedule: linear\n")
    run = parse_train_args(["--config", str(cfg), "--steps", "9"])
    assert run.train.steps == 9 and run.train.batch_size == 5
    assert run.options.channel_mults == (1, 2) and run.options.schedule == "linear"
    assert run.train.out == str(Path("runs") / "ddpm")
    cfg.write_text("stepz: 3\n")
    with pytest.raises(UserError, match="unknown keys: stepz"):
        parse_train_args(["--config", str(cfg)])


def test_sample_errors(tmp_path):
    assert_clean_error(run_script("sample.py", "--run", str(tmp_path / "none"), "--out", str(tmp_path / "x.png")),
                       2, "does not exist")  # a missing folder is named as such (689bc22); bad input: 2
    (tmp_path / "plain").mkdir()
    assert_clean_error(run_script("sample.py", "--run", str(tmp_path / "plain"), "--out", str(tmp_path / "x.png")),
                       2, "not a genscale run")
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000010").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({
        "train": {"model": "ddpm"}, "options": {"base_width": 16, "channel_mults": [1, 2], "attention_res": [4]},
        "data_info": {"name": "digits", "channels": 1, "image_size": 8, "num_classes": 10}}))
    ck = run / "checkpoints" / "step-00000010"
    (ck / "meta.json").write_text('{"step": 10}')
    (ck / "ema.pt").write_bytes(b"garbage, not a torch file")
    assert_clean_error(run_script("sample.py", "--run", str(run), "--out", str(tmp_path / "x.png")), 1, "damaged")


@pytest.mark.parametrize("script", ["train.py", "sample.py", "evaluate.py"])
def test_ctrl_c_while_starting_is_one_line(script):
    """Ctrl-C in the first seconds (while torch is imported) printed a KeyboardInterrupt traceback."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, str(ROOT / "genscale" / script), "--help"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    time.sleep(0.5)  # inside the imports on this machine and CI's (--help itself takes ~2 s)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip(f"{script} --help ended within 0.5 s, before the signal")
    assert "Traceback" not in err, err
    assert proc.returncode == 130 and err.strip() == "interrupted", (proc.returncode, err)


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_a_precision_accelerate_refuses_is_one_sentence(tmp_path, script):
    """fp8 without transformer_engine / MS-AMP (on this machine) ended in accelerate's traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_MIXED_PRECISION": "fp8"}
    args = ["--out", str(tmp_path / "run")] if script == "train.py" else ["--samples", str(tmp_path / "s.npz")]
    proc = subprocess.run([sys.executable, str(ROOT / "genscale" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        pytest.skip("accelerate took fp8 here (its packages are installed)")
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "accelerate refused this launch's settings" in lines[0] and "fp8" in lines[0], proc.stderr
