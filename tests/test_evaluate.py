"""evaluate.py on runs: sharded generation (2 processes = 1 process), accuracy, PSNR, errors."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from genscale import evaluate
from genscale.errors import UserError
from genscale.metrics import reference as ref_mod
from genscale.metrics.evaluation import (EvalSetup, Evaluator, array_images, family_images, intended_labels,
                                         needs_input_images)
from genscale.metrics.inpainting import biharmonic_fill, pooled_psnr
from genscale.metrics.psnr import psnr
from genscale.metrics.sharded import chunk_seed, rank_chunks, sharded_rows
from genscale.metrics.judge import digits_split
from tests.test_evaluate_support import TINY_DDPM, DigitsFamily, ThreadGroup, make_run, upsample

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(eval_cache):
    return eval_cache  # tests/conftest.py: one GENSCALE_CACHE shared with test_fid.py and test_judge.py


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "ddpm", **TINY_DDPM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_chunks_go_round_robin_and_cover_every_sample_once():
    for world in (1, 2, 3, 5):
        got = sorted(c for r in range(world) for c in rank_chunks(1037, 100, r, world))
        assert got == [(k, 100 * k, min(1037, 100 * k + 100)) for k in range(11)]
        assert all(k % world == r for r in range(world) for k, _, _ in rank_chunks(1037, 100, r, world))
    seeds = {chunk_seed(s, k, p) for s in (0, 1) for k in range(50) for p in range(3)}
    assert len(seeds) == 300  # distinct streams per (seed, chunk, purpose)


def test_sharded_rows_are_the_same_on_any_number_of_ranks():
    def compute(k, start, stop):
        gen = torch.Generator().manual_seed(chunk_seed(7, k))
        return torch.randn(stop - start, 3, generator=gen) + torch.arange(start, stop)[:, None]

    single = sharded_rows(250, 40, 3, compute)
    for world in (2, 3):
        results = ThreadGroup(world).run(lambda acc: sharded_rows(250, 40, 3, compute, acc))
        for r in results:
            np.testing.assert_array_equal(r, single)
    # Rows come back in sample order.
    np.testing.assert_allclose(single.mean(1), np.arange(250), atol=3)


def test_a_failure_on_one_rank_raises_on_every_rank_instead_of_hanging():
    def compute(k, start, stop):
        if k == 3:
            raise UserError("chunk 3 is broken")
        return torch.zeros(stop - start, 1)

    results = ThreadGroup(2).run(lambda acc: sharded_rows(500, 100, 1, compute, acc))
    assert isinstance(results[1], UserError) and "chunk 3 is broken" in str(results[1])
    assert isinstance(results[0], UserError) and "another process" in str(results[0])


def test_reference_and_samples_sharded_in_threads_equal_one_process(cache, ddpm_run, monkeypatch, tmp_path):
    """Two fake ranks: sharded reference reading and gathered sample features give the
    single-process FID and KID (the reference is recomputed on each side, not cached)."""
    from genscale.sample import load_family

    monkeypatch.setattr(ref_mod, "gather_objects", lambda items, acc: acc.gather_object(items) if acc else items)
    family, info, _ = load_family(ddpm_run)
    labels = intended_labels(120, 10)

    def kid_and_fid(acc):
        ev = Evaluator(EvalSetup(metric="kid", image_size=8, channels=1, chunk_size=50, use_cache=False), acc)
        feats = ev.features_of(family_images(family, labels, seed=3), 120)
        kid = ev.distance(feats)
        ev.setup.metric = "fid"
        return feats, kid, ev.distance(feats)

    one = kid_and_fid(None)
    two = ThreadGroup(2).run(kid_and_fid)
    for feats, kid, fid in two:
        np.testing.assert_array_equal(feats, one[0])
        assert kid == one[1] and fid == one[2]
    assert one[1]["kid"] > one[1]["kid_floor"] and one[2]["fid"] > one[2]["fid_floor"]


def test_two_process_launch_equals_one_process(cache, ddpm_run, tmp_path):
    """accelerate launch with 2 gloo processes: generation, reference features and KID subsets
    all sharded and gathered, and the numbers equal the plain one-process run."""
    common = ["--run", str(ddpm_run), "--metric", "kid", "--num", "150", "--chunk-size", "40", "--seed", "1"]
    one = tmp_path / "one.json"
    assert evaluate.main([*common, "--json", str(one)]) == 0
    fresh = tmp_path / "cache2"  # no cached reference: the 2 processes compute it themselves
    fresh.mkdir()
    shutil.copytree(cache / "judges", fresh / "judges")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENSCALE_THREADS": "1", "GENSCALE_CACHE": str(fresh)}
    env.pop("PYTHONPATH", None)
    two = tmp_path / "two.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / "cpu.yaml"), "--main_process_port", str(free_port()),
           str(ROOT / "genscale" / "evaluate.py"), *common, "--json", str(two)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert (a["world_size"], b["world_size"]) == (1, 2)
    for key in ("kid", "kid_floor", "kid_noise"):
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-12), key
    assert "KID" in proc.stdout and "(judge features; 150 samples vs 359 real images of digits test)" in proc.stdout
    assert len(list((fresh / "fid_stats").glob("*.npz"))) == 2  # test and train, written by rank 0


def test_fid_report_orders_real_degraded_and_noise(cache, tmp_path, capsys):
    """Real train digits < noisy train digits < Gaussian noise, all against the test split."""
    train_x, train_y, _, _ = digits_split()
    clean = upsample(train_x[:400])
    gen = torch.Generator().manual_seed(0)
    noisy = (clean + 0.6 * torch.randn(clean.shape, generator=gen)).clamp(-1, 1)
    scores = {}
    for name, images in (("clean", clean), ("noisy", noisy)):
        path = tmp_path / f"{name}.npz"
        np.savez(path, ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), train_y[:400])
        out = tmp_path / f"{name}.json"
        assert evaluate.main(["--samples", str(path), "--metric", "fid", "--json", str(out)]) == 0
        scores[name] = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "floor, real vs real: FID" in printed and "400 real images of digits train vs the same 359" in printed
    clean, noisy = scores["clean"], scores["noisy"]
    assert clean["fid"] < noisy["fid"] < noisy["fid_noise"]
    # The floor is real train images too (another random 400 of them): close to the clean score.
    assert clean["fid_floor"] == pytest.approx(clean["fid"], rel=0.5)
    assert clean["fid_floor"] == noisy["fid_floor"] and clean["num"] == clean["floor_num"] == 400


def test_accuracy_of_a_run_is_drawn_in_chunks(cache, tmp_path, monkeypatch, capsys):
    import genscale.sample as sample_mod

    run = make_run(tmp_path / "run", image_size=16, **TINY_DDPM)
    stub = DigitsFamily()
    info = sample_mod.DataInfo("digits", 1, 16, 10)
    monkeypatch.setattr(sample_mod, "load_family", lambda run_dir, device="cpu": (stub, info, 0))
    out = tmp_path / "acc.json"
    argv = ["--run", str(run), "--metric", "accuracy", "--num", "230", "--chunk-size", "100", "--json", str(out)]
    assert evaluate.main([*argv, "--min-accuracy", "0.9"]) == 0
    assert stub.calls == [100, 100, 30]
    result = json.loads(out.read_text())
    assert result["accuracy"] >= 0.95 and sum(result["histogram"]) == result["num"] == 230
    assert result["accuracy_floor"] >= 0.95 and result["floor_num"] == 359
    printed = capsys.readouterr().out
    assert "sample accuracy: " in printed and "(230 samples)" in printed and "floor, real images: " in printed
    stub.wrong = True
    assert evaluate.main([*argv, "--min-accuracy", "0.9"]) == 1
    assert json.loads(out.read_text())["accuracy"] < 0.1


def test_psnr_of_an_inpainting_run_against_biharmonic(cache, tmp_path, capsys):
    run = make_run(tmp_path / "inpaint", model="gan-inpaint", image_size=16, g_width=8, d_width=8)
    out = tmp_path / "p.json"
    assert evaluate.main(["--run", str(run), "--metric", "psnr", "--num", "60", "--mask", "box",
                          "--chunk-size", "25", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num"] == 60 and result["mask"] == "box" and 0.05 < result["hole_fraction"] < 0.3
    # Biharmonic fills digits' holes well; an untrained U-Net does not.
    assert result["psnr_biharmonic"] > 12 and result["psnr"] < result["psnr_biharmonic"]
    printed = capsys.readouterr().out
    assert "hole PSNR" in printed and "(60 images of digits test, box masks" in printed
    assert "baseline, biharmonic inpainting on the same images and masks" in printed
    # gan-inpaint composites its output with the known pixels: none of them changes
    assert result["known_changed"] == 0 and "known pixels changed by the model: 0 of " in printed


def test_psnr_of_a_ddpm_run_goes_through_repaint(cache, ddpm_run, tmp_path):
    """A ddpm run fills holes with RePaint (genscale.inpainting), keeping known pixels exactly."""
    out = tmp_path / "p.json"
    assert evaluate.main(["--run", str(ddpm_run), "--metric", "psnr", "--num", "6", "--mask", "centre",
                          "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num"] == 6 and result["mask"] == "centre" and result["hole_fraction"] == 0.25
    assert result["known_changed"] == 0 and result["known_values"] == 6 * 48


def test_translation_scores_against_the_targets_and_the_copy_baseline():
    """L1 and PSNR pooled over every value of the held-out pairs, against float64 formulas."""
    gen = torch.Generator().manual_seed(0)
    source = torch.rand(7, 1, 6, 6, generator=gen) * 2 - 1  # grey inputs, colour targets
    target = (torch.rand(7, 3, 6, 6, generator=gen) * 2 - 1).clamp(-1, 1)
    shift = torch.randn(7, 3, 6, 6, generator=gen) * 0.1

    class Translator:
        name = "pix2pix"

        def reference(self):
            return {"source": source, "image": target}

        def translate(self, s):  # looks its pairs up by content, so any chunking must give the same sums
            index = [int((source == x).flatten(1).all(1).nonzero()) for x in s]
            return (target[index] + shift[index]).clamp(-1, 1)

    ev = Evaluator(EvalSetup(metric="translation", reference="photos-paired", chunk_size=3))
    result = ev.translation(Translator(), None)
    out, copy = (target + shift).clamp(-1, 1).double(), source.double().expand(-1, 3, -1, -1)
    assert result["num"] == 7
    assert result["l1"] == pytest.approx(float((out - target.double()).abs().mean()), rel=1e-6)
    assert result["psnr"] == pytest.approx(10 * np.log10(4 / float((out - target.double()).square().mean())), rel=1e-6)
    assert result["l1_copy"] == pytest.approx(float((copy - target.double()).abs().mean()), rel=1e-6)
    assert result["psnr_copy"] == pytest.approx(10 * np.log10(4 / float((copy - target.double()).square().mean())),
                                                rel=1e-6)
    assert ev.translation(Translator(), 4)["num"] == 4


def test_psnr_rows_equal_psnr_of_a_biharmonic_family(cache):
    class Biharmonic:
        name = "biharmonic"
        device = torch.device("cpu")

        def inpaint(self, images, masks, generator=None):
            assert isinstance(generator, torch.Generator)  # a stochastic filler gets the chunk's generator
            return biharmonic_fill(images, masks)

    ev = Evaluator(EvalSetup(metric="psnr", image_size=16, channels=1, chunk_size=30))
    result = ev.psnr(Biharmonic(), 70, "stroke")
    assert result["psnr"] == result["psnr_biharmonic"] and result["num"] == 70
    assert result["known_changed"] == 0 and result["known_values"] > 0

    class Shifted(Biharmonic):  # repaints every pixel, known ones included
        def inpaint(self, images, masks, generator=None):
            return (biharmonic_fill(images, masks) + 0.25).clamp(-1, 2)

    shifted = ev.psnr(Shifted(), 70, "stroke")
    assert shifted["known_changed"] == shifted["known_values"] == result["known_values"]
    # The pooled PSNR equals psnr.py on all images as one long image, holes only.
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(4, 1, 6, 6, generator=gen) * 2 - 1
    pred = target + 0.1 * torch.randn(target.shape, generator=gen)
    masks = (torch.rand(4, 1, 6, 6, generator=gen) > 0.4).float()
    holes = 1 - masks
    sse = ((pred - target) ** 2 * holes).sum().item()
    expected = psnr(pred.reshape(1, -1), target.reshape(1, -1), region=holes.reshape(1, -1)).item()
    assert pooled_psnr(sse, holes.sum().item()) == pytest.approx(expected, rel=1e-6)


def test_classes_sees_every_digit_in_real_images_and_one_in_a_collapsed_set(cache, tmp_path, capsys):
    train_x, train_y, _, _ = digits_split()
    real = np.asarray(train_x[:300], np.uint8)[..., None]  # the 8 x 8 digits as they are
    collapsed = np.repeat(real[np.flatnonzero(train_y[:300] == 3)[:1]], 50, axis=0)
    results = {}
    for name, images in (("real", real), ("collapsed", collapsed)):
        np.savez(tmp_path / f"{name}.npz", images)  # no labels: coverage needs none
        assert evaluate.main(["--samples", str(tmp_path / f"{name}.npz"), "--metric", "classes",
                              "--json", str(tmp_path / f"{name}.json")]) == 0
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    real_r, collapsed_r = results["real"], results["collapsed"]
    assert real_r["classes_present"] == 10 and sum(real_r["histogram"]) == real_r["num"] == 300
    # the judge's labels of real training digits match the true labels almost everywhere
    assert np.abs(np.array(real_r["histogram"]) - np.bincount(train_y[:300], minlength=10)).sum() <= 12
    assert collapsed_r["classes_present"] == 1 and collapsed_r["histogram"][3] == 50
    assert collapsed_r["rarest_share"] == 0 and sum(real_r["floor_histogram"]) == real_r["floor_num"] == 359
    assert "classes present: 1 of 10 (50 samples" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["fid_on_inpainting", "psnr_on_gan", "psnr_on_samples", "no_run",
                                  "unknown_judge", "accuracy_without_labels", "nelbo_on_ddpm",
                                  "translation_on_ddpm"])
def test_errors_are_one_line(case, cache, ddpm_run, tmp_path, capsys):
    samples = tmp_path / "s.npz"
    np.savez(samples, np.zeros((4, 8, 8, 1), np.uint8))
    argv = {
        "fid_on_inpainting": ["--run", str(make_run(tmp_path / "i", model="gan-inpaint", image_size=16, g_width=8,
                                                    d_width=8)), "--metric", "fid"],
        "psnr_on_gan": ["--run", str(make_run(tmp_path / "g", model="gan")), "--metric", "psnr", "--num", "4"],
        "psnr_on_samples": ["--samples", str(samples), "--metric", "psnr"],
        "no_run": ["--run", str(tmp_path / "absent")],
        "unknown_judge": ["--samples", str(samples), "--dataset", "faces"],
        "accuracy_without_labels": ["--samples", str(samples), "--metric", "accuracy"],
        "nelbo_on_ddpm": ["--run", str(ddpm_run), "--metric", "nelbo"],
        "translation_on_ddpm": ["--run", str(ddpm_run), "--metric", "translation"],
    }[case]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("evaluate.py: error: "), err
    expected = {"fid_on_inpainting": "gan-inpaint transforms input images", "psnr_on_gan": "gan cannot fill holes",
                "psnr_on_samples": "needs --run", "no_run": "does not exist", "unknown_judge": "'faces'",
                "accuracy_without_labels": "intended class", "nelbo_on_ddpm": "needs --run with a vae run",
                "translation_on_ddpm": "image-to-image run (pix2pix)"}[case]
    assert expected in err[0]


def test_fid_is_refused_only_for_families_that_need_input_images():
    from genscale.families.base import DataInfo

    info = DataInfo("digits", 1, 16, 10)
    kinds = {"gan-inpaint": True, "inpaint": True, "pix2pix": True, "transformer": False, "ddpm": False,
             "vae": False, "dcgan": False}
    for model, expected in kinds.items():
        module = __import__(f"genscale.families.{model.replace('-', '_')}", fromlist=["FAMILY"])
        assert needs_input_images(module.FAMILY, info) is expected, model
    assert needs_input_images(module.FAMILY, DataInfo("p", 3, 16, 0, paired=True))


def test_samples_npz_and_family_paths_agree(cache, ddpm_run):
    """The features of a run's chunks equal those of the same images handed over as an array."""
    from genscale.sample import load_family

    family, _, _ = load_family(ddpm_run)
    labels = intended_labels(60, 10)
    draw = family_images(family, labels, seed=0)
    images = np.concatenate([draw(k, 25 * k, min(60, 25 * k + 25)) for k in range(3)])
    ev = Evaluator(EvalSetup(image_size=8, channels=1, chunk_size=25))
    np.testing.assert_array_equal(ev.features_of(draw, 60), ev.features_of(array_images(images), 60))


def test_colour_samples_without_a_reference_are_not_scored_against_the_digits(tmp_path, capsys):
    """--samples alone compares with the embedded digits: 32x32 colour samples got an FID of 139
    against 8x8 grey digits, exit 0."""
    path = tmp_path / "colour.npz"
    np.savez(path, np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8))
    assert evaluate.main(["--samples", str(path), "--metric", "fid"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--samples holds 3-channel images" in err and "give --reference" in err
