"""Resuming a run folder with other flags: what may change, what is refused before anything is
written, and what a finished run keeps. Each test failed before the fix it names."""
from __future__ import annotations

import json
import shutil

from tests.test_cli_errors_audit import TINY, cache, one_error_line, tiny_run, train_proc  # noqa: F401 (fixtures)


def test_resume_with_other_network_options_keeps_the_run_intact(tiny_run, cache):
    before = (tiny_run / "config.json").read_text()
    proc = train_proc(cache, *TINY, "--steps", "4", "--base-width", "32", "--out", str(tiny_run))
    assert proc.returncode == 2, proc.stderr[-3000:]
    one_error_line(proc.stderr, "resume with --base-width 16")
    # config.json was rewritten with base_width 32 before the load failed: sample.py then refused the run
    assert (tiny_run / "config.json").read_text() == before
    from genscale.sample import load_family

    _, _, step = load_family(tiny_run)
    assert step == 2


def test_resume_with_options_that_change_what_the_weights_mean_is_refused(tiny_run, cache, tmp_path):
    """A resume takes its options from the flags: --schedule/--timesteps/--prediction other than the
    run's were accepted and written to config.json, and sample.py then read the weights under them."""
    run = tmp_path / "ddpm"
    shutil.copytree(tiny_run, run)
    before = (run / "config.json").read_text()
    old = json.loads(before)["options"]
    proc = train_proc(cache, *TINY, "--steps", "4", "--schedule", "linear" if old["schedule"] != "linear" else "cosine",
                      "--prediction", "v" if old["prediction"] != "v" else "eps", "--out", str(run))
    assert proc.returncode == 2, proc.stderr[-3000:]
    was = f"--prediction {old['prediction']} --schedule {old['schedule']}"
    one_error_line(proc.stderr, f"were trained with {was}; resume with {was} (or --config {run / 'config.json'})")
    assert (run / "config.json").read_text() == before
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]
    # Sampling settings may change: the run goes on, and records them.
    proc = train_proc(cache, *TINY, "--steps", "4", "--sampler", "ddpm", "--cfg-scale", "1.5", "--out", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "config.json").read_text())["options"]["cfg_scale"] == 1.5


def test_no_resume_warning_without_a_checkpoint(tiny_run, cache, tmp_path):
    """A folder with config.json but no checkpoint (a launch that died at once) starts afresh: it
    warned "resuming ... with changed batch_size" all the same."""
    run = tmp_path / "ddpm"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "checkpoints")
    proc = train_proc(cache, *TINY, "--batch-size", "4", "--out", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming" not in proc.stderr and "finished 2 steps" in proc.stdout


def test_a_finished_run_run_again_keeps_its_record(tiny_run, cache, tmp_path):
    """"nothing to do", yet config.json was rewritten with the new flags (here --steps 1, --lr 5)."""
    run = tmp_path / "ddpm"
    shutil.copytree(tiny_run, run)
    before = (run / "config.json").read_text()
    proc = train_proc(cache, *TINY, "--steps", "1", "--lr", "5", "--out", str(run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nothing to do" in proc.stdout + proc.stderr
    assert (run / "config.json").read_text() == before
