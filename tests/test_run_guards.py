"""Guards around a run folder and the command lines, from a review of the user path: each test
failed before its fix (two launches training one folder, duplicate metrics rows after a crash,
an ldm autoencoder trained into another run, evaluation settings refused only at the first
evaluation or after the whole training, a score on training pairs called held-out, task flags
silently ignored, NaN settings writing black images, Ctrl-C ignored after the last step)."""
from __future__ import annotations

import json
import os
import signal
import types

import pytest

from genscale.errors import UserError
from tests.test_cli_errors_audit import TINY, cache, one_error_line, train_proc  # noqa: F401


@pytest.fixture(scope="module")
def train_only_tar(cache) -> str:
    """One shard of the embedded digits as a single .tar: data with a train split and no test split."""
    from genscale.data import resolve_data

    return resolve_data("digits", "train", str(cache)).urls[0]


# ----------------------------------------------------------------------------- the run folder


def test_a_second_launch_on_a_folder_being_trained_is_refused(tmp_path, cache):
    from genscale.run_lock import lock_run_folder

    out = tmp_path / "run"
    lock_run_folder(out)  # this test process plays the launch that is still training
    proc = train_proc(cache, *TINY, "--out", str(out))
    assert proc.returncode == 1
    one_error_line(proc.stderr, f"{out.resolve()} is being trained by pid {os.getpid()}")
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing written, nothing pruned


def test_a_fresh_start_drops_the_rows_of_an_attempt_that_saved_nothing(tmp_path, cache):
    out = tmp_path / "run"
    out.mkdir()
    stale = [{"step": s, "kind": "train", "loss": 9.0} for s in (1, 2, 3)]  # a killed attempt, no checkpoint
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    proc = train_proc(cache, *TINY, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r.get("kind") == "train"]
    assert train_steps == [1, 2] and all(r.get("loss") != 9.0 for r in rows)


def test_ldm_into_another_models_run_is_refused_before_the_autoencoder(tmp_path, cache):
    out = tmp_path / "ddpm_run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"train": {"model": "ddpm"}}))
    proc = train_proc(cache, "--model", "ldm", "--autoencoder-steps", "2", *TINY[:4], "--out", str(out))
    assert proc.returncode == 2
    one_error_line(proc.stderr, "holds a ddpm run; choose another --out for ldm")
    assert not (out / "autoencoder").exists()


def test_evaluation_settings_are_refused_before_the_run_folder_is_written(tmp_path, cache, train_only_tar):
    out = tmp_path / "run"
    proc = train_proc(cache, *TINY, "--eval-every", "1", "--eval-metric", "bogus", "--out", str(out))
    assert proc.returncode == 2
    one_error_line(proc.stderr, "--eval-metric must be one of")
    proc = train_proc(cache, *TINY, "--eval-every", "1", "--data", train_only_tar, "--out", str(out))
    assert proc.returncode == 2
    one_error_line(proc.stderr, "--eval-every compares with held-out images, but")
    assert not out.exists()


def test_a_vae_without_a_test_split_finishes_with_a_note(train_only_tar, cache):
    from genscale.config import parse_train_args
    from genscale.families import family_module
    from genscale.data import resolve_data

    run = parse_train_args(["--model", "vae", "--data", train_only_tar, "--cache-dir", str(cache), "--image-size", "8"])
    info = resolve_data(train_only_tar, "train", str(cache)).data_info(image_size=8)
    family = family_module("vae").FAMILY(run.train, run.options, info)
    assert family.final_metrics() == {"test_nelbo": "not measured: --data has no test split"}


def test_translation_scores_refuse_data_without_held_out_pairs(train_only_tar, cache):
    from genscale.metrics.evaluation import EvalSetup, Evaluator

    class Untouched:  # the score must be refused before the family's (train-split) reference is read
        @property
        def reference(self):
            raise AssertionError("read the reference")

    setup = EvalSetup(metric="translation", reference=train_only_tar, cache_dir=str(cache))
    with pytest.raises(UserError, match="--metric translation scores held-out pairs, but .* has no test split"):
        Evaluator(setup).translation(Untouched(), 4)


def test_latent_diffusion_does_not_claim_to_inpaint():
    from genscale.inpainting import can_inpaint

    def family(name):
        return types.SimpleNamespace(name=name, schedule=object())

    assert can_inpaint(family("ddpm")) and not can_inpaint(family("ldm"))


def test_signals_are_given_back_when_the_step_loop_ends():
    from genscale.preemption import StopRequest

    def before(signum, frame):  # noqa: ARG001
        pass

    previous = signal.signal(signal.SIGINT, before)
    try:
        stop = StopRequest()
        stop.install()
        assert signal.getsignal(signal.SIGINT) == stop._handle
        stop.uninstall()
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, previous)


# ----------------------------------------------------------------------------- sample.py


def sample(*argv: str) -> None:
    from genscale.sample import main

    main(list(argv))


@pytest.mark.parametrize("extra, fragment", [
    (["--steps", "3"], "--steps goes with the tasks"),
    (["--t", "5", "--levels", "0.5"], "--t, --levels go with the tasks"),
])
def test_plain_sampling_refuses_task_flags(tmp_path, extra, fragment):
    with pytest.raises(UserError, match=fragment):
        sample("--run", str(tmp_path), "--num", "2", "--out", str(tmp_path / "s.png"), *extra)


@pytest.mark.parametrize("extra, fragment", [
    (["--cfg-scale", "nan"], "--cfg-scale must be a finite number, got nan"),
    (["--eta", "nan"], "--eta must be a non-negative number, got nan"),
    (["--sigma", "inf"], "--sigma must be a positive number, got inf"),
    (["--view-sigma", "0"], "--view-sigma must be a positive number, got 0"),
    (["--blur-sigma", "nan"], "--blur-sigma must be a positive number, got nan"),
    (["--sampler", "ddim"], "--sampler and --sampling-steps go with plain sampling"),
])
def test_tasks_refuse_numbers_that_would_blank_or_crash(tmp_path, extra, fragment):
    with pytest.raises(UserError, match=fragment):
        sample("--run", str(tmp_path), "--task", "hybrid", "--num", "2", "--out", str(tmp_path / "s.png"), *extra)


def test_a_seed_out_of_range_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"--seed must be between 0 and 2\*\*63 - 1"):
        sample("--run", str(tmp_path), "--seed", str(10**20), "--num", "2", "--out", str(tmp_path / "s.png"))


def test_a_missing_run_folder_is_named(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        sample("--run", str(tmp_path / "nope"), "--num", "2", "--out", str(tmp_path / "s.png"))


def test_repaint_settings_are_refused_for_inpainting_networks(tmp_path, monkeypatch):
    """--labels / --cfg-scale steer RePaint; an inpaint run would ignore them."""
    import numpy as np

    import genscale.sample as sample_module

    net = types.SimpleNamespace(name="inpaint", inpaint=lambda images, masks: images)
    monkeypatch.setattr(sample_module, "load_family", lambda run, device: (net, None, 1))
    np.savez(tmp_path / "in.npz", np.zeros((2, 8, 8, 1), np.uint8))
    np.savez(tmp_path / "mask.npz", np.ones((2, 8, 8), np.uint8))
    with pytest.raises(UserError, match=r"--cfg-scale apply to RePaint on diffusion runs; this run's network \(inpaint\)"):
        sample("--run", str(tmp_path), "--task", "inpaint", "--input", str(tmp_path / "in.npz"),
               "--mask", str(tmp_path / "mask.npz"), "--cfg-scale", "3", "--out", str(tmp_path / "f.png"))
