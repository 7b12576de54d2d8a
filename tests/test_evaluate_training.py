"""The --eval-every hook (genscale.metrics.training.TrainingEvaluator) on a family in memory."""
from __future__ import annotations

import math

import pytest
import torch

from genscale.config import RunConfig, TrainConfig
from genscale.errors import UserError
from genscale.families import family_module
from genscale.families.base import DataInfo
from genscale.metrics import reference as ref_mod
from genscale.metrics.training import TrainingEvaluator
from tests.test_evaluate_support import TINY_DDPM, DigitsFamily, ThreadGroup


def run_config(model: str = "ddpm", image_size: int = 16, **train) -> RunConfig:
    module = family_module(model)
    options = module.Options(**(TINY_DDPM if model == "ddpm" else {}))
    settings = dict(eval_every=10, eval_num=120, eval_metric="fid", eval_features="judge")
    return RunConfig(TrainConfig(model=model, image_size=image_size, **{**settings, **train}), options)


INFO = DataInfo("digits", 1, 16, 10)


def tiny_ddpm(run: RunConfig):
    torch.manual_seed(0)
    return family_module("ddpm").FAMILY(run.train, run.options, INFO)


def test_fid_hook_tracks_the_best_score_and_leaves_the_rng_alone(eval_cache):
    run = run_config(eval_num=120)
    ev = TrainingEvaluator(run, INFO)
    family = tiny_ddpm(run)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    first = ev(family, 10)
    assert torch.equal(torch.get_rng_state(), before)
    assert set(first) == {"fid", "fid_floor", "eval_num", "eval_seconds", "is_best", "best"}
    assert all(isinstance(v, float) for v in first.values())
    assert first["eval_num"] == 120 and first["is_best"] == 1.0 and first["best"] == first["fid"]
    assert first["fid_floor"] < first["fid"]
    # Same weights, same samples: the same score, which is not a new best.
    again = ev(family, 20)
    assert again["fid"] == first["fid"] and again["is_best"] == 0.0
    # A generator as good as the test split itself beats the untrained U-Net.
    perfect = ev(DigitsFamily(), 30)
    assert perfect["fid"] < first["fid"] and perfect["is_best"] == 1.0 and ev.best_step == 30
    assert perfect["fid"] == pytest.approx(perfect["fid_floor"], rel=1.0)

    # The best score survives a resume, through the checkpoint registry or through metrics.jsonl.
    state = ev.state_dict()
    resumed = TrainingEvaluator(run, INFO)
    resumed.load_state_dict(state)
    assert (resumed.best, resumed.best_step) == (perfect["fid"], 30)
    assert resumed(family, 40)["is_best"] == 0.0
    records = [{"step": s, "kind": "eval", **r} for s, r in ((10, first), (20, again), (30, perfect))]
    records.append({"step": 35, "kind": "train", "loss": 0.1})
    from_log = TrainingEvaluator(run, INFO)
    from_log.restore(records, upto_step=25)  # records after the checkpoint are ignored
    assert (from_log.best, from_log.best_step) == (first["fid"], 10)


def test_accuracy_and_psnr_hooks(eval_cache):
    run = run_config(eval_metric="accuracy", eval_num=100)
    ev = TrainingEvaluator(run, INFO)
    good = ev(DigitsFamily(), 5)
    assert good["accuracy"] >= 0.95 and good["accuracy_floor"] >= 0.95 and good["is_best"] == 1.0
    bad = ev(DigitsFamily(wrong=True), 6)
    assert bad["accuracy"] < 0.1 and bad["is_best"] == 0.0 and bad["best"] == good["accuracy"]

    run = run_config(model="gan-inpaint", eval_metric="psnr", eval_num=40)
    run.options.g_width = run.options.d_width = 8
    torch.manual_seed(0)
    family = family_module("gan-inpaint").FAMILY(run.train, run.options, INFO)
    result = TrainingEvaluator(run, INFO)(family, 1)
    assert set(result) == {"psnr", "psnr_biharmonic", "eval_num", "eval_seconds", "is_best", "best"}
    assert result["eval_num"] == 40 and math.isfinite(result["psnr"]) and result["psnr_biharmonic"] > 12


def test_every_rank_gets_the_same_result_as_one_process(eval_cache, monkeypatch):
    monkeypatch.setattr(ref_mod, "gather_objects", lambda items, acc: acc.gather_object(items) if acc else items)
    run = run_config(eval_num=90, eval_metric="kid")
    family = tiny_ddpm(run)
    single = TrainingEvaluator(run, INFO)(family, 3)
    results = ThreadGroup(3).run(lambda acc: TrainingEvaluator(run, INFO, acc)(family, 3))
    for r in results:
        assert not isinstance(r, BaseException), r
        assert {k: v for k, v in r.items() if k != "eval_seconds"} == \
               {k: v for k, v in single.items() if k != "eval_seconds"}


@pytest.mark.parametrize("change, message", [
    (dict(eval_metric="lpips"), "--eval-metric must be one of"),
    (dict(eval_metric="nelbo"), "--eval-metric must be one of fid, kid, accuracy, psnr,"),  # evaluate.py only
    (dict(eval_num=1), "--eval-num must be at least 2"),
    (dict(eval_features="clip"), "--eval-features must be one of"),
    (dict(data="faces"), "No judge classifier is defined for the data set 'faces'"),
    (dict(model="gan-inpaint"), "gan-inpaint transforms input images"),
    (dict(model="pix2pix", eval_metric="kid"), "pix2pix transforms input images"),
])
def test_bad_settings_fail_before_training_starts(change, message, eval_cache):
    info = DataInfo("faces", 1, 16, 2) if change.get("data") == "faces" else INFO
    with pytest.raises(UserError, match=message):
        TrainingEvaluator(run_config(**change), info)


def test_accuracy_needs_labels(eval_cache):
    with pytest.raises(UserError, match="class-conditional"):
        TrainingEvaluator(run_config(eval_metric="accuracy"), DataInfo("digits", 1, 16, 0))


def test_missing_inception_weights_fail_before_training_starts(eval_cache, tmp_path, monkeypatch):
    import cleanfid.downloads_helper as dl

    monkeypatch.setenv("GENSCALE_INCEPTION_DIR", str(tmp_path))
    monkeypatch.setattr(dl, "check_download_inception", lambda fpath: (_ for _ in ()).throw(OSError("offline")))
    expected = f"place inception-2015-12-05.pt .* in {tmp_path}/ .* use --eval-features judge"
    with pytest.raises(UserError, match=expected):
        TrainingEvaluator(run_config(eval_features="inception"), INFO)
