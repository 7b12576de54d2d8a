"""FID/KID through clean-fid: distances against float64 references, the clean resize, both
feature extractors, folders, the reference cache. Runs clean-fid's own code on the CPU."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from genscale import evaluate
from genscale.errors import UserError
from genscale.metrics import features as feat_mod
from genscale.metrics import reference as ref_mod
from genscale.metrics.features import FeatureExtractor, build_extractor, file_features, image_features
from genscale.metrics.fid import frechet_distance, kernel_distance
from genscale.metrics.judge import digits_split

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def judge_ext(eval_cache) -> FeatureExtractor:
    return build_extractor("judge", "digits")


def fid_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Float64 FID through symmetric eigendecompositions (no scipy.sqrtm):
    Tr (S_a S_b)^(1/2) = sum of sqrt(eig(S_a^(1/2) S_b S_a^(1/2)))."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.clip(np.linalg.eigvalsh(root @ s_b @ root), 0, None)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * np.sqrt(inner).sum())


def kid_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, float64, written out term by term."""
    d = a.shape[1]
    k = lambda x, y: (x @ y.T / d + 1) ** 3  # noqa: E731
    kaa, kbb, kab = k(a, a), k(b, b), k(a, b)
    m, n = len(a), len(b)
    return float((kaa.sum() - np.trace(kaa)) / (m * (m - 1)) + (kbb.sum() - np.trace(kbb)) / (n * (n - 1))
                 - 2 * kab.mean())


def test_fid_matches_float64_references():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
    assert frechet_distance(a, b) == pytest.approx(fid_reference(a, b), rel=1e-9)
    # b = 2a + 3: S_b = 4 S_a, so FID = ||mu_a + 3||^2 + Tr S_a exactly.
    exact = ((a.mean(0) + 3) ** 2).sum() + np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, 2 * a + 3) == pytest.approx(exact, rel=1e-9)
    assert abs(frechet_distance(a, a)) < 1e-9


def test_fid_stays_accurate_with_dead_units():
    """Judge features have ReLU units that never fire: singular covariances."""
    rng = np.random.default_rng(1)
    a = np.maximum(rng.normal(size=(359, 32)) @ rng.normal(size=(32, 32)), 0)
    b = np.maximum(rng.normal(size=(200, 32)) @ rng.normal(size=(32, 32)) + 0.3, 0)
    a[:, :5] = 0
    b[:, :5] = 0
    assert frechet_distance(a, b) == pytest.approx(fid_reference(a, b), rel=1e-6)


def test_kid_equals_float64_unbiased_mmd_and_leaves_numpy_rng_alone():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(150, 16)).astype(np.float32)
    b = (rng.normal(size=(150, 16)) * 1.3 + 0.2).astype(np.float32)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    # With subsets as large as both sets, every subset is a permutation of the full sets, so the
    # average over subsets is the full-set unbiased estimate.
    got = kernel_distance(a, b)
    assert got == pytest.approx(kid_reference(a.astype(np.float64), b.astype(np.float64)), rel=1e-10)
    assert np.array_equal(np.random.get_state()[1], before)
    # Smaller subsets: a seeded estimate near the full one, the same for the same seed.
    sub = kernel_distance(a, b, seed=5, max_subset_size=100)
    assert sub == kernel_distance(a, b, seed=5, max_subset_size=100) != kernel_distance(a, b, seed=6,
                                                                                         max_subset_size=100)
    assert sub == pytest.approx(got, abs=0.5 * abs(got))
    with pytest.raises(UserError):
        frechet_distance(a[:1], b)


def test_clean_resize_is_pil_bicubic_on_float_channels():
    """The in-memory path resizes like clean-fid: PIL bicubic on each float32 channel."""
    identity = FeatureExtractor("raw", "raw", 8, 3 * 8 * 8, lambda x: x.flatten(1))
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, size=(5, 16, 16, 1), dtype=np.uint8)
    got = image_features(images, identity, batch_size=2).reshape(5, 3, 8, 8)
    for i in range(5):
        plane = Image.fromarray(images[i, :, :, 0].astype(np.float32), mode="F")
        expected = np.asarray(plane.resize((8, 8), Image.BICUBIC)).clip(0, 255)
        for c in range(3):  # grey is repeated into three channels, as clean-fid's RGB loader does
            np.testing.assert_array_equal(got[i, c], expected)


def test_judge_features_are_the_judges_penultimate_layer(judge_ext):
    from genscale.metrics.judge import load_or_train_judge

    _, _, test_x, _ = digits_split()
    judge = load_or_train_judge("digits")
    # 8x8 images are not resized (PIL returns a copy at the same size).
    got = image_features(test_x[:64, :, :, None], judge_ext)
    with torch.no_grad():
        expected = judge.features(torch.as_tensor(test_x[:64]).float()[:, None] / 127.5 - 1).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert judge_ext.dim == 128 and judge_ext.tag == "judge-digits-v2"
    with pytest.raises(UserError, match="No judge classifier is defined for the data set 'faces'"):
        build_extractor("judge", "faces")


def _write_pngs(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img[:, :, 0] if img.shape[-1] == 1 else img).save(folder / f"{i:05d}.png")


def _upsampled_test_digits(n: int | None = None) -> np.ndarray:
    _, _, test_x, _ = digits_split()
    x = torch.as_tensor(test_x[:n]).float()[:, None]
    big = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).round().clamp(0, 255)
    return big.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_folder_features_go_through_clean_fids_loader_and_equal_the_array_path(judge_ext, tmp_path):
    images = _upsampled_test_digits(40)
    _write_pngs(tmp_path / "imgs", images)
    files = feat_mod.list_image_files(tmp_path / "imgs")
    np.testing.assert_allclose(file_features(files, judge_ext), image_features(images, judge_ext), rtol=1e-6,
                               atol=1e-6)


def test_image_files_are_found_whatever_the_case_of_their_suffix(tmp_path):
    """Cameras write IMG_0001.JPG; "Png" and ".BMP" were skipped (clean-fid lists only some upper-case forms)."""
    (tmp_path / "sub").mkdir()
    names = ["a.png", "b.PNG", "c.Png", "d.jpg", "e.JPEG", "sub/f.BMP", "sub/g.webp"]
    for name in names:
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / name, format="PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    found = feat_mod.list_image_files(tmp_path)
    assert [Path(f).relative_to(tmp_path).as_posix() for f in found] == sorted(names)


def test_fid_of_a_folder_against_itself_is_zero(eval_cache, tmp_path, capsys):
    images = _upsampled_test_digits()
    _write_pngs(tmp_path / "digits", images)
    out = tmp_path / "r.json"
    folder = str(tmp_path / "digits")
    assert evaluate.main(["--samples", folder, "--reference", folder, "--metric", "fid", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert abs(result["fid"]) < 1e-6 and result["num"] == result["num_reference"] == 359
    printed = capsys.readouterr().out
    assert "(judge features; 359 samples vs 359 real images of" in printed
    assert "floor: none" in printed  # a folder has no second split
    # Noise in the same feature space is far away.
    assert result["fid_noise"] > 10


def test_reference_statistics_are_cached_by_split_features_and_resolution(judge_ext, tmp_path, monkeypatch):
    monkeypatch.setenv("GENSCALE_CACHE", str(tmp_path))
    test16 = ref_mod.split_features("digits", "test", judge_ext, 16, 1)
    path = ref_mod.stats_path("digits", "test", judge_ext, 16, 1)
    assert path.name == "digits-test-judge-digits-v2-16px-1ch-v1.npz" and path.is_file()
    with np.load(path) as npz:
        np.testing.assert_array_equal(npz["feats"], test16.feats)
        np.testing.assert_allclose(npz["mu"], test16.feats.mean(0))
        assert len(npz["keys"]) == 359 and list(npz["keys"]) == sorted(npz["keys"])

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(ref_mod, "image_features", fail)
    again = ref_mod.split_features("digits", "test", judge_ext, 16, 1)
    np.testing.assert_array_equal(again.feats, test16.feats)
    monkeypatch.undo()
    monkeypatch.setenv("GENSCALE_CACHE", str(tmp_path))
    test8 = ref_mod.split_features("digits", "test", judge_ext, 8, 1)
    assert ref_mod.stats_path("digits", "test", judge_ext, 8, 1).is_file()
    # At 8 px the images are the digits themselves: the features are the judge's on the split.
    _, _, test_x, _ = digits_split()
    direct = image_features(test_x[:, :, :, None], judge_ext)
    order = np.lexsort(direct.T[::-1])
    np.testing.assert_allclose(test8.feats[np.lexsort(test8.feats.T[::-1])], direct[order], rtol=1e-6, atol=1e-7)
    # Real-vs-real floor in the judge space is small next to noise.
    train8 = ref_mod.split_features("digits", "train", judge_ext, 8, 1)
    assert frechet_distance(train8.feats, test8.feats) < 3


def test_reference_features_gather_a_digest_per_image_not_its_pixels(judge_ext, tmp_path, monkeypatch):
    """Every rank's (key, tie-breaker, features) rows are gathered to every rank; the tie-breaker
    was the image itself (~10 GB per GPU for 50k images of 256 px). Now a 32-byte digest, and the
    features are the same as with one process reading everything."""
    monkeypatch.setenv("GENSCALE_CACHE", str(tmp_path))
    gathered = []
    real_gather = ref_mod.gather_objects
    monkeypatch.setattr(ref_mod, "gather_objects", lambda part, acc: gathered.extend(part) or real_gather(part, acc))
    feats = ref_mod.split_features("digits", "test", judge_ext, 16, 1, use_cache=False)
    assert len(gathered) == 359 and all(len(row[1]) == 32 for row in gathered)
    keys, images, _ = ref_mod.load_split("digits", "test", 16, 1)
    np.testing.assert_allclose(feats.feats, image_features(images, judge_ext), rtol=1e-6, atol=1e-6)


def _fake_inception(folder: Path) -> torch.nn.Module:
    """A torchscript file shaped like clean-fid's: ``layers`` maps N x 3 x 299 x 299 to 2048."""

    class Layers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Conv2d(3, 2048, 1)

        def forward(self, x):
            # Pool first: a 2048-channel conv at 299 x 299 would take seconds per image.
            return F.adaptive_avg_pool2d(torch.tanh(self.proj(F.adaptive_avg_pool2d(x, 13))), 1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()

        def forward(self, x, return_features: bool = False):
            return self.layers(x)

    torch.manual_seed(0)
    net = Net()
    torch.jit.save(torch.jit.script(net), str(folder / feat_mod.INCEPTION_FILE))
    return net


def test_inception_path_resizes_to_299_and_normalises_like_clean_fid(tmp_path, monkeypatch):
    monkeypatch.setenv("GENSCALE_INCEPTION_DIR", str(tmp_path))
    net = _fake_inception(tmp_path)
    ext = build_extractor("inception", "")
    assert (ext.size, ext.dim, ext.tag) == (299, 2048, "inception-2015-12-05")
    images = _upsampled_test_digits(3)
    got = image_features(images, ext)
    planes = [np.asarray(Image.fromarray(img[:, :, 0].astype(np.float32), mode="F").resize((299, 299),
                                                                                          Image.BICUBIC))
              for img in images]
    x = torch.from_numpy(np.stack(planes).clip(0, 255))[:, None].repeat(1, 3, 1, 1).float()
    with torch.no_grad():
        expected = net.layers((x - 128) / 128).view(3, 2048).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_missing_inception_weights_name_the_file_and_folder(tmp_path, monkeypatch, capsys):
    import cleanfid.downloads_helper as dl

    monkeypatch.setenv("GENSCALE_INCEPTION_DIR", str(tmp_path / "weights"))

    def offline(fpath):
        raise OSError("Name or service not known")

    monkeypatch.setattr(dl, "check_download_inception", offline)
    with pytest.raises(UserError) as err:
        build_extractor("inception", "")
    message = str(err.value)
    assert "place inception-2015-12-05.pt" in message and f"in {tmp_path / 'weights'}/" in message
    assert len(message.splitlines()) == 1
    # the judge is offered only for data that has one: for other data its error sent users back here
    assert "use --features judge" not in message
    with pytest.raises(UserError, match=r"GENSCALE_INCEPTION_DIR to its folder\), or use --features judge\.$"):
        build_extractor("inception", "digits")
    samples = tmp_path / "s.npz"
    np.savez(samples, _upsampled_test_digits(4))
    assert evaluate.main(["--samples", str(samples), "--features", "inception", "--metric", "kid"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate.py: error: clean-fid's Inception weights are missing")
    assert not list((tmp_path / "weights").glob("*.pt"))  # no partial file left behind
