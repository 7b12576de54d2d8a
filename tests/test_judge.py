"""The judge classifier, evaluate.py's accuracy path, and PSNR.

The judge is trained once per session into a temporary cache shared with the other evaluation
test files (~10 s on one core); everything else loads it from there.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from genscale import evaluate
from genscale.metrics import judge as judge_mod
from genscale.metrics.judge import Judge, digits_split, judge_accuracy, load_or_train_judge, to_judge_input
from genscale.metrics.psnr import psnr

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def judge(eval_cache) -> Judge:
    return load_or_train_judge("digits")


@pytest.fixture(scope="module")
def split():
    return digits_split()


def upsample_uint8(images: np.ndarray, size: int, mode: str, channels: int = 1) -> np.ndarray:
    """uint8 N x 8 x 8 -> uint8 N x size x size x channels, as a generator's output would be."""
    x = torch.as_tensor(images).float()[:, None]
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    big = F.interpolate(x, size=(size, size), mode=mode, **kwargs).round().clamp(0, 255)
    return big.to(torch.uint8).permute(0, 2, 3, 1).repeat(1, 1, 1, channels).numpy()


def test_split_is_the_stratified_80_20_split_of_all_digits(split):
    train_x, train_y, test_x, test_y = split
    digits = load_digits()
    assert (len(train_x), len(test_x)) == (1438, 359)
    assert train_x.dtype == np.uint8 and train_x.shape[1:] == (8, 8)
    # Together the two halves are exactly the 1797 digits, stored as round(v * 255 / 16).
    expected = np.floor(digits.images.reshape(-1, 64) * 255 / 16 + 0.5).astype(np.uint8)
    got = np.concatenate([train_x, test_x]).reshape(-1, 64)
    rows = lambda a: sorted(map(bytes, a))  # noqa: E731
    assert rows(got) == rows(expected)
    assert sorted(np.concatenate([train_y, test_y]).tolist()) == sorted(digits.target.tolist())
    # Stratified: every class keeps its share within one image.
    for c in range(10):
        assert abs((test_y == c).sum() - 0.2 * (digits.target == c).sum()) <= 1


def test_judge_reaches_97_percent_on_held_out_digits(judge, split, eval_cache):
    _, _, test_x, test_y = split
    print(f"judge test accuracy: {judge.test_accuracy:.4f}")
    assert judge.test_accuracy >= 0.97
    # Recount independently of the stored figure.
    with torch.no_grad():
        logits = judge(torch.as_tensor(test_x).float()[:, None] / 127.5 - 1)
    assert (logits.argmax(1).numpy() == test_y).mean() == pytest.approx(judge.test_accuracy)
    meta = json.loads((eval_cache / "judges" / "digits.json").read_text())
    assert meta["test_accuracy"] == pytest.approx(judge.test_accuracy)
    assert (eval_cache / "judges" / "digits.pt").is_file()


def test_cached_judge_is_loaded_not_retrained(judge, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("retrained although the cache was valid")

    monkeypatch.setattr(judge_mod, "train_judge", fail)
    again = load_or_train_judge("digits")
    assert again.test_accuracy == judge.test_accuracy
    for (name, a), (_, b) in zip(judge.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_corrupt_or_stale_cache_is_rebuilt(tmp_path, monkeypatch):
    folder = tmp_path / "judges"
    folder.mkdir()
    (folder / "digits.pt").write_bytes(b"not a checkpoint")
    (folder / "digits.json").write_text(json.dumps({"version": judge_mod.JUDGE_VERSION, "test_accuracy": 1.0}))
    calls = []

    def fake_train(dataset):
        calls.append(dataset)
        fresh = Judge()
        fresh.test_accuracy = 0.5
        return fresh

    monkeypatch.setattr(judge_mod, "train_judge", fake_train)
    assert load_or_train_judge("digits", cache_dir=tmp_path).test_accuracy == 0.5
    assert calls == ["digits"]
    # Now valid, but a different judge version: rebuilt again.
    meta = json.loads((folder / "digits.json").read_text())
    (folder / "digits.json").write_text(json.dumps({**meta, "version": -1}))
    load_or_train_judge("digits", cache_dir=tmp_path)
    assert calls == ["digits", "digits"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_training_is_deterministic_and_leaves_global_rng_alone():
    before = torch.get_rng_state()
    a = judge_mod.train_judge(epochs=1)
    b = judge_mod.train_judge(epochs=1)
    assert torch.equal(torch.get_rng_state(), before)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic"])
def test_judge_reads_16px_samples_in_any_channel_count(judge, split, mode):
    _, _, test_x, test_y = split
    grey = upsample_uint8(test_x, 16, mode)
    rgb = upsample_uint8(test_x, 16, mode, channels=3)
    assert judge_accuracy(judge, grey, test_y)["accuracy"] >= 0.97
    assert judge_accuracy(judge, rgb, test_y)["accuracy"] >= 0.97
    # The harness convention (float NCHW in [-1, 1]) gives the same predictions.
    as_float = torch.as_tensor(rgb).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert np.array_equal(judge_mod.predict(judge, as_float), judge_mod.predict(judge, rgb))


def test_shuffled_labels_score_near_chance(judge, split):
    _, _, test_x, test_y = split
    true = judge_accuracy(judge, test_x, test_y)
    shuffled_labels = np.random.default_rng(0).permutation(test_y)
    shuffled = judge_accuracy(judge, test_x, shuffled_labels)
    assert 0.03 <= shuffled["accuracy"] <= 0.2
    # The histogram counts predictions, which do not depend on the intended labels.
    assert shuffled["histogram"] == true["histogram"]
    assert sum(true["histogram"]) == true["num"] == len(test_y)
    assert all(abs(n - (test_y == c).sum()) <= 3 for c, n in enumerate(true["histogram"]))


def test_accuracy_breakdown_matches_a_manual_count(judge, split):
    _, _, test_x, test_y = split
    # Make class 3 fail on purpose: claim every 3 is a 5.
    claimed = np.where(test_y == 3, 5, test_y)
    result = judge_accuracy(judge, test_x, claimed)
    pred = judge_mod.predict(judge, test_x)
    assert result["per_class"][5] == pytest.approx((pred[claimed == 5] == 5).mean())
    assert 3 not in result["per_class"]
    assert result["accuracy"] == pytest.approx((pred == claimed).mean())
    assert result["accuracy"] < 0.93


def test_features_are_penultimate_and_size_independent(judge, split):
    _, _, test_x, _ = split
    x8 = to_judge_input(test_x[:32])
    x16 = to_judge_input(upsample_uint8(test_x[:32], 16, "nearest"))
    f8, f16 = judge.features(x8), judge.features(x16)
    assert f8.shape == (32, Judge.feature_dim)
    # Nearest upsampling by 2 then area-averaging back is the identity.
    torch.testing.assert_close(f8, f16)
    torch.testing.assert_close(judge.head(f8), judge(x8))


def test_evaluate_script_labels_real_test_digits(judge, split, tmp_path, eval_cache):
    _, _, test_x, test_y = split
    samples = tmp_path / "samples.npz"
    np.savez(samples, upsample_uint8(test_x, 16, "bilinear"), test_y)
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(GENSCALE_CACHE=str(eval_cache), OMP_NUM_THREADS="1")
    # From another folder, without PYTHONPATH: the script must find its package itself.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "genscale" / "evaluate.py"), "--samples", str(samples),
         "--metric", "accuracy", "--json", str(out), "--min-accuracy", "0.97"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["num"] == 359 and result["judge_test_accuracy"] == pytest.approx(judge.test_accuracy)
    assert result["accuracy"] >= 0.97
    assert f"sample accuracy: {result['accuracy']:.4f} (359 samples)" in proc.stdout
    assert "judge test accuracy" in proc.stdout and "predicted-class histogram: 0:" in proc.stdout


def _write_bad(folder: Path, kind: str) -> Path:
    """A samples file that is wrong in the way ``kind`` says."""
    path = folder / ("bad.npy" if kind == "npy" else "bad.npz")
    imgs = np.zeros((4, 16, 16, 1), np.uint8)
    writers = {
        "missing": lambda: None,
        "text": lambda: path.write_text("hello"),
        "npy": lambda: np.save(path, imgs),
        "no_labels": lambda: np.savez(path, imgs),
        "float_images": lambda: np.savez(path, imgs.astype(np.float32), np.arange(4)),
        "nchw": lambda: np.savez(path, np.zeros((4, 1, 16, 16), np.uint8), np.arange(4)),
        "label_count": lambda: np.savez(path, imgs, np.arange(3)),
        "negative_labels": lambda: np.savez(path, imgs, -np.ones(4, np.int64)),
    }
    writers[kind]()
    return path


@pytest.mark.parametrize(
    "kind", ["missing", "text", "npy", "no_labels", "float_images", "nchw", "label_count", "negative_labels"]
)
def test_bad_samples_exit_2_with_one_line(kind, tmp_path, capsys):
    assert evaluate.main(["--samples", str(_write_bad(tmp_path, kind)), "--metric", "accuracy"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("evaluate.py: error: ")


def test_bad_samples_exit_2_as_a_script(tmp_path):
    path = _write_bad(tmp_path, "no_labels")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "genscale" / "evaluate.py"), "--samples", str(path), "--metric", "accuracy"],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "evaluate.py: error: The accuracy metric needs the intended class of every sample (arr_1)."
    ]


def test_psnr_matches_skimage_and_the_formula():
    from skimage.metrics import peak_signal_noise_ratio

    gen = torch.Generator().manual_seed(0)
    target = torch.rand(3, 2, 9, 7, generator=gen) * 2 - 1
    pred = (target + 0.1 * torch.randn(target.shape, generator=gen)).clamp(-1, 1)
    got = psnr(pred, target)
    for i in range(3):
        ref = peak_signal_noise_ratio(target[i].numpy(), pred[i].numpy(), data_range=2.0)
        assert got[i].item() == pytest.approx(ref, rel=1e-9)
    # Over a region only: the mean squared error of the selected pixels, in float64.
    holes = (torch.rand(3, 1, 9, 7, generator=gen) < 0.3).double()
    p, t, h = pred.double().numpy(), target.double().numpy(), np.broadcast_to(holes.numpy(), pred.shape)
    for i in range(3):
        mse = ((p[i] - t[i]) ** 2)[h[i] == 1].mean()
        assert psnr(pred, target, region=holes)[i].item() == pytest.approx(10 * np.log10(4 / mse), rel=1e-9)
    assert torch.isinf(psnr(target, target)).all()


def test_judge_split_is_the_embedded_digits_split(split, tmp_path):
    """The judge must never have seen the held-out digits that evaluations compare against."""
    from genscale.data import make_loader, resolve_data

    shards = resolve_data("digits", "test", str(tmp_path))
    loader = make_loader(shards, image_size=8, channels=1, batch_size=64, batches_per_epoch=1, seed=0, epoch=0,
                         rank=0, world_size=1, num_workers=0, resampled=False)
    images = torch.cat([b["image"] for b in loader])
    got = ((images[:, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    rows = lambda a: sorted(map(bytes, a.reshape(len(a), -1)))  # noqa: E731
    assert rows(got) == rows(split[2])
