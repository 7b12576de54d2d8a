"""Embedded datasets, the shard cache and resolve_data: checked against the raw sklearn/skimage
arrays, reading the tars with the standard library rather than with genscale's own loader."""
from __future__ import annotations

import io
import json
import multiprocessing
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from genscale.data import BUILTIN_NAMES, ShardSet, resolve_data
from genscale.data import builtin
from genscale.data.writer import encode_png, split_indices, write_split
from genscale.errors import UserError


def read_tars(urls: list[str]) -> dict[str, dict[str, bytes]]:
    """key -> {extension: bytes}, straight from the tar members."""
    samples: dict[str, dict[str, bytes]] = {}
    for url in urls:
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                assert ext not in samples.setdefault(key, {}), f"duplicate {m.name}"
                samples[key][ext] = tar.extractfile(m).read()
    return samples


def png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def test_digits_equal_sklearn_with_a_stratified_split(cache):
    from sklearn.datasets import load_digits

    digits = load_digits()
    splits = {s: resolve_data("digits", s, cache_dir=cache) for s in ("train", "test")}
    seen = {}
    for split, shards in splits.items():
        assert (shards.name, shards.channels, shards.image_size, shards.num_classes) == ("digits", 1, 8, 10)
        samples = read_tars(shards.urls)
        assert len(samples) == shards.num_samples
        for key, fields in samples.items():
            assert key.startswith("digit") and "." not in key
            index = int(key[len("digit"):])
            expected = np.round(digits.images[index] * 255.0 / 16.0).astype(np.uint8)
            np.testing.assert_array_equal(png_array(fields["png"]), expected)
            assert int(fields["cls"]) == digits.target[index]
            assert key not in seen, "a sample in both splits"
            seen[key] = split
    assert len(seen) == 1797
    test_counts = Counter(digits.target[int(k[5:])] for k, s in seen.items() if s == "test")
    all_counts = Counter(digits.target)
    assert sum(test_counts.values()) == round(0.2 * 1797)
    for c in range(10):  # stratified: every class gives about a fifth to test
        assert abs(test_counts[c] - 0.2 * all_counts[c]) <= 1


def test_digits_cache_is_written_once_and_reused(cache, monkeypatch):
    first = resolve_data("digits", cache_dir=cache)
    mtimes = [os.path.getmtime(u) for u in first.urls]

    def must_not_build(out):
        raise AssertionError("rebuilt a cached dataset")

    monkeypatch.setitem(builtin._BUILDERS, "digits", must_not_build)
    again = resolve_data("digits", cache_dir=cache)
    assert again.urls == first.urls and [os.path.getmtime(u) for u in again.urls] == mtimes


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GENSCALE_CACHE", str(tmp_path / "envcache"))
    shards = resolve_data("faces")
    assert shards.urls[0].startswith(str(tmp_path / "envcache" / "faces" / "train"))


def test_losing_the_cache_race_uses_the_winner(tmp_path, monkeypatch):
    real = builtin._BUILDERS["faces"]
    calls = []

    def racing(out):  # while we build, "another rank" finishes first
        calls.append(out)
        if len(calls) == 1:
            builtin.builtin_dir("faces", str(tmp_path))
        real(out)

    monkeypatch.setitem(builtin._BUILDERS, "faces", racing)
    path = builtin.builtin_dir("faces", str(tmp_path))
    assert len(calls) == 2 and path == str(tmp_path / "faces")
    assert sorted(os.listdir(tmp_path)) == ["faces"], "temporary folders left behind"
    assert resolve_data("faces", "test", cache_dir=str(tmp_path)).num_samples == 40


def _build_in_child(cache_dir, barrier, results):
    barrier.wait()
    results.put(builtin.builtin_dir("faces", cache_dir))


def test_concurrent_processes_build_the_cache_once(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(tmp_path), barrier, results)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert {results.get(timeout=5) for _ in procs} == {str(tmp_path / "faces")}
    assert sorted(os.listdir(tmp_path)) == ["faces"]


def test_faces_are_the_lfw_subset_with_face_labels(cache):
    from skimage.data import lfw_subset

    raw = lfw_subset()
    keys = {}
    for split in ("train", "test"):
        shards = resolve_data("faces", split, cache_dir=cache)
        assert (shards.channels, shards.image_size, shards.num_classes) == (1, 25, 2)
        assert shards.class_names == ["background", "face"]
        for key, fields in read_tars(shards.urls).items():
            i = int(key[3:])
            np.testing.assert_array_equal(png_array(fields["png"]), np.round(raw[i] * 255).astype(np.uint8))
            assert int(fields["cls"]) == (1 if i < 100 else 0)
            keys[key] = split
    assert len(keys) == 200 and Counter(keys.values()) == {"train": 160, "test": 40}


@pytest.mark.parametrize("name", ["photos", "photos-paired"])
def test_photo_crops_do_not_leak_between_splits(cache, name):
    regions: dict[str, dict[str, list[int]]] = {}
    for split in ("train", "test"):
        shards = resolve_data(name, split, cache_dir=cache)
        assert (shards.channels, shards.image_size, shards.paired) == (3, 64, name == "photos-paired")
        assert shards.class_names == list(builtin.PHOTOS)
        samples = read_tars(shards.urls)
        assert len(samples) == shards.num_samples > 100
        for n, (key, fields) in enumerate(samples.items()):
            photo, y, x = key.rsplit("_", 2)
            assert int(fields["cls"]) == builtin.PHOTOS.index(photo)
            regions.setdefault(photo, {"train": [], "test": []})[split].append(int(x))
            if n % 8:  # decoding a sample in 8 is enough and keeps the test quick
                continue
            if name == "photos-paired":
                rgb = png_array(fields["tgt.png"]).astype(np.float64)
                grey = png_array(fields["src.png"]).astype(np.float64)
                assert rgb.shape == (64, 64, 3) and grey.shape == (64, 64)
                luma = rgb @ np.array([0.299, 0.587, 0.114])  # ITU-R 601, as PIL's "L"
                assert np.abs(grey - luma).max() <= 1.0
            else:
                assert png_array(fields["png"]).shape == (64, 64, 3)
    assert set(regions) == set(builtin.PHOTOS)
    for photo, xs in regions.items():  # test crops all lie right of every train crop
        assert xs["test"] and max(xs["train"]) + 64 <= min(xs["test"]), photo


def test_photo_crop_matches_the_source_photo():
    photo = builtin.load_photo("astronaut")
    crops = list(builtin.photo_crops(photo))
    split, y, x, crop = crops[0]
    assert (split, y, x) == ("train", 0, 0)
    # astronaut is 512 px: halved, each crop pixel is the mean of a 2x2 block (BOX filter).
    block = photo[:128, :128].astype(np.float64).reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
    assert np.abs(crop.astype(np.float64) - block).max() <= 1.0


def test_write_split_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (25, 5, 7, 3), dtype=np.uint8)
    samples = [{"__key__": f"s{i:03d}", "png": encode_png(images[i]), "cls": i % 4, "json": {"i": i}}
               for i in range(25)]
    assert write_split(samples, str(tmp_path / "train"), maxcount=10) == 25
    urls = sorted(str(p) for p in (tmp_path / "train").iterdir())
    assert [os.path.basename(u) for u in urls] == ["000000.tar", "000001.tar", "000002.tar"]
    back = read_tars(urls)
    for i in range(25):
        fields = back[f"s{i:03d}"]
        np.testing.assert_array_equal(png_array(fields["png"]), images[i])
        assert int(fields["cls"]) == i % 4 and json.loads(fields["json"]) == {"i": i}
    with pytest.raises(ValueError, match="dot"):
        write_split([{"__key__": "a.b", "png": b"x"}], str(tmp_path / "bad"))


def test_split_indices_stratified_and_disjoint():
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    train, test = split_indices(len(labels), 0.2, seed=3, labels=labels)
    assert len(test) == 20 and sorted(np.concatenate([train, test]).tolist()) == list(range(100))
    assert Counter(labels[test].tolist()) == {0: 10, 1: 6, 2: 3, 3: 1}
    again = split_indices(len(labels), 0.2, seed=3, labels=labels)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert len(split_indices(5, 0.1, 0)[1]) == 1  # a positive fraction never gives an empty test split
    assert len(split_indices(5, 0.0, 0)[1]) == 0


def _write(tmp_path, name, samples, maxcount=100):
    write_split(samples, str(tmp_path / name), maxcount=maxcount)
    return tmp_path / name


def grey(i, size=6):
    return encode_png(np.full((size, size), i, np.uint8))


def test_folder_without_info_is_peeked(tmp_path):
    folder = _write(tmp_path, "labelled", [{"__key__": f"k{i}", "png": grey(i), "cls": i % 7} for i in range(30)])
    shards = resolve_data(str(folder))
    assert (shards.name, shards.channels, shards.image_size, shards.num_classes, shards.paired) == \
        ("labelled", 1, 6, 7, False)
    assert shards.num_samples is None and shards.data_info(image_size=32).image_size == 32
    # img2dataset's layout: jpg + txt + json without a label -> colour, unlabelled
    jpg = io.BytesIO()
    Image.fromarray(np.zeros((9, 12, 3), np.uint8) + 100).save(jpg, format="JPEG")
    web = _write(tmp_path, "web", [{"__key__": f"{i:09d}", "jpg": jpg.getvalue(), "txt": "a caption",
                                    "json": {"url": "http://x", "caption": "a caption"}} for i in range(3)])
    shards = resolve_data(str(web / "000000.tar"))
    assert (shards.channels, shards.image_size, shards.num_classes) == (3, 9, 0)
    paired = _write(tmp_path, "pairs", [{"__key__": "p0", "src.png": grey(1), "tgt.png": grey(2),
                                         "json": {"label": 4}}])
    shards = resolve_data(str(paired))
    assert shards.paired and shards.num_classes == 5


def test_split_folders_and_brace_patterns(tmp_path):
    root = tmp_path / "ds"
    _write(tmp_path, "ds/train", [{"__key__": f"a{i}", "png": grey(i)} for i in range(12)], maxcount=4)
    _write(tmp_path, "ds/test", [{"__key__": f"b{i}", "png": grey(i)} for i in range(3)])
    train, test = resolve_data(str(root)), resolve_data(str(root), "test")
    assert [os.path.basename(u) for u in train.urls] == ["000000.tar", "000001.tar", "000002.tar"]
    assert [os.path.basename(u) for u in test.urls] == ["000000.tar"]
    picked = resolve_data(str(root / "train" / "{000000..000001}.tar"))
    assert picked.urls == train.urls[:2] and picked.name == "ds"


@pytest.mark.parametrize("make, split, fragment", [
    (lambda p: str(p / "missing"), "train", "neither an embedded dataset"),
    (lambda p: (p / "empty").mkdir() or str(p / "empty"), "train", "holds no .tar shards"),
    (lambda p: (p / "fake.tar").write_text("not a tar") and str(p / "fake.tar"), "train", "not a tar archive"),
    (lambda p: str(_write(p, "only", [{"__key__": "k", "png": grey(1)}])), "test", "has no test split"),
    (lambda p: str(_write(p, "one", [{"__key__": "k", "png": grey(1)}]) / "000000.tar"), "test",
     "has no test split"),
    (lambda p: str(p / "gone" / "{000000..000003}.tar"), "train", "missing file"),
    (lambda p: "digits", "validation", "unknown split"),
])
def test_bad_specs_give_one_sentence(tmp_path, make, split, fragment):
    with pytest.raises(UserError, match=fragment) as err:
        resolve_data(make(tmp_path), split, cache_dir=str(tmp_path / "cache"))
    assert err.value.exit_code == 2 and "\n" not in str(err.value)


@pytest.mark.parametrize("keep", [lambda n: n // 2 + 100, lambda n: n // 2 // 4096 * 4096],
                         ids=["mid-block", "on-a-page"])  # the latter: an interrupted copy of whole pages
def test_a_shard_cut_short_is_refused_not_read_as_fewer_images(tmp_path, keep):
    folder = _write(tmp_path, "cut", [{"__key__": f"k{i:03d}", "png": grey(i % 200)} for i in range(40)])
    shard = folder / "000000.tar"
    whole = shard.read_bytes()
    assert len(resolve_data(str(folder)).urls) == 1  # complete: accepted
    shard.write_bytes(whole[: keep(len(whole))])
    with tarfile.open(shard) as tar:  # what went unnoticed: tarfile reads the rest as a shorter archive
        assert 0 < len(tar.getmembers()) < 80
    with pytest.raises(UserError, match="000000.tar is cut short"):
        resolve_data(str(folder))


def test_shard_set_is_a_plain_dataclass():
    s = ShardSet(urls=["a.tar"], name="x", channels=3, image_size=64, num_classes=0)
    info = s.data_info()
    assert (info.name, info.channels, info.image_size, info.num_classes, info.paired) == ("x", 3, 64, 0, False)
    assert set(BUILTIN_NAMES) == {"digits", "faces", "photos", "photos-paired"}
