"""The shard-writer command, one test per source kind on tiny generated inputs; the shards are
read back with the standard library's tarfile and compared with the input pixels."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from genscale.data import resolve_data
from genscale.data.write_shards import main, write_shards
from genscale.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_split(out, split) -> list[dict]:
    """Samples of OUT/split in shard order, as {ext: bytes} plus "__key__"."""
    samples: dict[str, dict] = {}
    folder = os.path.join(out, split)
    for name in sorted(os.listdir(folder)):
        with tarfile.open(os.path.join(folder, name)) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = tar.extractfile(m).read()
    return list(samples.values())


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def info_of(out) -> dict:
    with open(os.path.join(out, "info.json")) as f:
        return json.load(f)


def save(path, array, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def test_image_folder_keeps_png_and_jpeg_bytes_and_converts_the_rest(tmp_path):
    src, rng = tmp_path / "imgs", np.random.default_rng(0)
    originals = {}
    for i in range(10):
        arr = rng.integers(0, 256, (6 + i, 9, 3), dtype=np.uint8)
        ext = ("png", "jpg", "bmp")[i % 3]
        path = src / ("sub" if i % 2 else "") / f"img{i}.{ext}"
        save(str(path), arr)
        originals[path.name] = (arr, path.read_bytes(), ext)
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    info = write_shards(str(src), str(out), test_fraction=0.2, seed=1, progress=False)
    assert info["counts"] == {"train": 8, "test": 2} and info["num_classes"] == 0 and info["channels"] == 3
    assert info["image_size"] == 9  # most common shorter side
    names = []
    for split in ("train", "test"):
        for s in read_split(out, split):
            name = json.loads(s["json"])["file"]
            names.append(name)
            arr, raw, ext = originals[name]
            assert "cls" not in s and "." not in s["__key__"]
            if ext == "bmp":  # re-encoded losslessly
                np.testing.assert_array_equal(pixels(s["png"]), arr)
            else:  # stored as it was
                assert s[{"png": "png", "jpg": "jpg"}[ext]] == raw
    assert sorted(names) == sorted(originals) and names != sorted(names)  # all there, shuffled


def test_class_folders_give_sorted_labels_and_a_stratified_split(tmp_path):
    src = tmp_path / "classes"
    for c, name in enumerate(["zebra", "ant", "moth"]):
        for i in range(10):
            save(str(src / name / f"{i}.png"), np.full((4, 4), c * 50 + i, np.uint8))
    out = tmp_path / "out"
    assert main([str(src), str(out), "--test-fraction", "0.2", "--maxcount", "7", "--quiet"]) == 0
    info = info_of(out)
    assert info["class_names"] == ["ant", "moth", "zebra"] and info["num_classes"] == 3
    assert info["channels"] == 1 and info["counts"] == {"train": 24, "test": 6}
    assert len(os.listdir(out / "train")) == 4  # 24 samples at 7 per shard
    test_labels = []
    for split in ("train", "test"):
        for s in read_split(out, split):
            meta = json.loads(s["json"])
            label = int(s["cls"])
            assert info["class_names"][label] == meta["class"]
            value = int(pixels(s["png"])[0, 0])
            assert value == ["zebra", "ant", "moth"].index(meta["class"]) * 50 + int(meta["file"][0])
            if split == "test":
                test_labels.append(label)
    assert sorted(test_labels) == [0, 0, 1, 1, 2, 2]
    shards = resolve_data(str(out), "test")
    assert shards.num_classes == 3 and shards.num_samples == 6


@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NHW"])
def test_npz_round_trip(tmp_path, layout):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 5, 6, 3) if layout != "NHW" else (30, 5, 6), dtype=np.uint8)
    labels = np.arange(30) % 3
    stored = images.transpose(0, 3, 1, 2) if layout == "NCHW" else images
    np.savez(tmp_path / "d.npz", stored, labels)
    out = tmp_path / "out"
    info = write_shards(str(tmp_path / "d.npz"), str(out), test_fraction=0.1, progress=False)
    assert info["num_classes"] == 3 and info["channels"] == (1 if layout == "NHW" else 3)
    got = {}
    for split in ("train", "test"):
        for s in read_split(out, split):
            got[pixels(s["png"]).tobytes()] = int(s["cls"])
    assert got == {images[i].tobytes(): int(labels[i]) for i in range(30)}


def test_npz_named_arrays_without_labels(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 3, 3), np.uint8))
    info = write_shards(str(tmp_path / "d.npz"), str(tmp_path / "out"), progress=False)
    assert info["num_classes"] == 0 and sum(info["counts"].values()) == 4


def _idx(path, array: np.ndarray) -> None:
    # The MNIST "idx" format: magic (0, 0, 8 = ubyte, ndim), big-endian int32 dims, then the bytes.
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape))
        f.write(array.astype(np.uint8).tobytes())


def test_torchvision_mnist_on_disk(tmp_path):
    raw = tmp_path / "root" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = {}
    for prefix, n in (("train", 12), ("t10k", 5)):
        images, labels = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)
        _idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        data[prefix] = {images[i].tobytes(): int(labels[i]) for i in range(n)}
    out = tmp_path / "out"
    info = write_shards(str(tmp_path / "root"), str(out), progress=False)  # kind guessed from MNIST/
    assert info["counts"] == {"train": 12, "test": 5} and info["num_classes"] == 10
    assert info["image_size"] == 28 and info["channels"] == 1
    for split, prefix in (("train", "train"), ("test", "t10k")):
        assert {pixels(s["png"]).tobytes(): int(s["cls"]) for s in read_split(out, split)} == data[prefix]


def test_torchvision_dataset_absent(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="CIFAR10 is not readable") as err:
        write_shards(str(tmp_path / "empty"), str(tmp_path / "out"), kind="torchvision", dataset="CIFAR10",
                     progress=False)
    assert err.value.exit_code == 2
    with pytest.raises(UserError, match="--dataset"):
        write_shards(str(tmp_path / "empty"), str(tmp_path / "out"), kind="torchvision", progress=False)


@pytest.mark.parametrize("direction", ["AtoB", "BtoA"])
def test_side_by_side_pairs_keep_their_splits(tmp_path, direction):
    rng = np.random.default_rng(0)
    halves = {}
    for split, folder in (("train", "train"), ("test", "val"), ("test", "val")):
        i = len(halves)
        a = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        b = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        save(str(tmp_path / "facades" / folder / f"{i}.png"), np.concatenate([a, b], axis=1))
        halves[f"{i}.png"] = (split, a, b) if direction == "AtoB" else (split, b, a)
    out = tmp_path / "out"
    info = write_shards(str(tmp_path / "facades"), str(out), kind="side-by-side", direction=direction,
                        progress=False)
    assert info["paired"] and info["counts"] == {"train": 1, "test": 2} and info["image_size"] == 8
    for split in ("train", "test"):
        for s in read_split(out, split):
            want_split, src, tgt = halves[json.loads(s["json"])["file"]]
            assert split == want_split
            np.testing.assert_array_equal(pixels(s["src.png"]), src)
            np.testing.assert_array_equal(pixels(s["tgt.png"]), tgt)
    assert resolve_data(str(out), "test").paired


def test_unreadable_images_are_skipped(tmp_path):
    src = tmp_path / "imgs"
    for i in range(4):
        save(str(src / f"{i}.png"), np.full((3, 3), i, np.uint8))
    (src / "9.png").write_bytes(b"\x89PNG broken")
    info = write_shards(str(src), str(tmp_path / "out"), test_fraction=0.0, progress=False)
    assert info["counts"] == {"train": 4, "test": 0} and info["skipped"] == 1
    assert not os.path.exists(tmp_path / "out" / "test")  # an empty split leaves no folder


@pytest.mark.parametrize("argv, fragment", [
    (["{tmp}/missing", "{tmp}/out"], "does not exist"),
    (["{tmp}/x.npz", "{tmp}/out"], "uint8"),
    (["{tmp}/x.npz", "{tmp}/out", "--test-fraction", "1.5"], "--test-fraction"),
    (["{tmp}/emptydir", "{tmp}/out"], "neither image files"),
    (["{tmp}/x.npz", "{tmp}/full"], "already holds shards"),
])
def test_errors_are_one_sentence(tmp_path, argv, fragment):
    np.savez(tmp_path / "x.npz", np.zeros((2, 3, 3), np.float32))
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "full" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match=fragment) as err:
        main([a.format(tmp=tmp_path) for a in argv] + ["--quiet"])
    assert err.value.exit_code == 2 and "\n" not in str(err.value)


def test_command_line_exits_2_without_traceback(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "genscale.data.write_shards", str(tmp_path / "nope"),
                           str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'} does not exist."]


def test_an_npz_without_images_is_one_sentence(tmp_path):
    np.savez(tmp_path / "empty.npz", np.zeros((0, 16, 16), np.uint8), np.zeros((0,), np.int64))
    out = tmp_path / "out"
    with pytest.raises(UserError) as err:  # was: ValueError "zero-size array to reduction operation"
        main([str(tmp_path / "empty.npz"), str(out), "--quiet"])
    assert str(err.value) == f"{tmp_path / 'empty.npz'} holds no images (arr_0 has shape (0, 16, 16))."
    assert not out.exists()


def _unreadable_train_split(tmp_path):
    src = tmp_path / "partial"
    for i in range(3):
        (src / "train").mkdir(parents=True, exist_ok=True)
        (src / "train" / f"f{i}.png").write_bytes(b"not a png")
    save(str(src / "test" / "ok.png"), np.zeros((4, 4, 3), np.uint8))
    return src


@pytest.mark.parametrize("out_exists", [False, True])
def test_a_refused_write_leaves_nothing_behind(tmp_path, out_exists):
    src, out = _unreadable_train_split(tmp_path), tmp_path / "out"
    if out_exists:
        out.mkdir()
    for _ in range(2):  # the re-run gets the same sentence, not "an unfinished write"
        with pytest.raises(UserError) as err:
            main([str(src), str(out), "--quiet"])
        assert os.path.isdir(out) == out_exists and (not out_exists or os.listdir(out) == [])  # was: test/ left
        assert str(err.value).startswith(f"none of the 3 training images of {src} could be read (first error: ")
    for i in range(3):  # no image file left in train/: was "no readable image (first error: none)"
        (src / "train" / f"f{i}.png").rename(src / "train" / f"f{i}.txt")
    with pytest.raises(UserError) as err:
        main([str(src), str(out), "--kind", "folder", "--quiet"])
    assert str(err.value) == f"the train split of {src} holds no images."
    assert os.path.isdir(out) == out_exists and (not out_exists or os.listdir(out) == [])


def test_an_interrupted_write_is_removed(tmp_path, monkeypatch):
    from genscale.data import write_shards as module

    src = tmp_path / "imgs"
    for i in range(6):
        save(str(src / f"{i}.png"), np.full((3, 3), i, np.uint8))
    real = module.write_split

    def interrupted(samples, split_dir, **kw):  # Ctrl-C while the test split is written
        if split_dir.endswith("test"):
            raise KeyboardInterrupt
        return real(samples, split_dir, **kw)

    monkeypatch.setattr(module, "write_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_shards(str(src), str(tmp_path / "out"), test_fraction=0.5, progress=False)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(module, "write_split", real)
    assert write_shards(str(src), str(tmp_path / "out"), test_fraction=0.5, progress=False)["counts"] == \
        {"train": 3, "test": 3}


def test_an_empty_class_folder_is_skipped_with_a_note(tmp_path, capsys):
    src = tmp_path / "classes"
    for c, name in enumerate(["cat", "dog"]):
        for i in range(3):
            save(str(src / name / f"{i}.png"), np.full((4, 4), c * 100 + i, np.uint8))
    (src / "aardvark").mkdir()  # sorts first: counted, it shifted every label by one
    (src / "aardvark" / "notes.txt").write_text("no images here")
    out = tmp_path / "out"
    assert main([str(src), str(out), "--kind", "classes", "--test-fraction", "0", "--quiet"]) == 0
    info = info_of(out)
    assert info["num_classes"] == 2 and info["class_names"] == ["cat", "dog"]
    assert {int(s["cls"]): json.loads(s["json"])["class"] for s in read_split(out, "train")} == {0: "cat", 1: "dog"}
    assert "note: skipped 1 class folder(s) without images, so they are no class: aardvark" in capsys.readouterr().err


def test_transparent_images_are_composited_onto_white(tmp_path):
    # A transparent TIFF is re-encoded by the writer; a transparent PNG is stored as it is and
    # the loader composites it. Either way a transparent black pixel comes out white.
    src = tmp_path / "imgs"
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[:2, :, :] = (0, 0, 0, 0)
    rgba[2:, :, :] = (30, 60, 90, 255)
    save(str(src / "a.tif"), rgba)
    save(str(src / "b.png"), rgba)
    out = tmp_path / "out"
    write_shards(str(src), str(out), test_fraction=0.0, progress=False)
    from genscale.data import make_loader

    batch = next(iter(make_loader(resolve_data(str(out)), image_size=4, channels=3, batch_size=2,
                                  batches_per_epoch=1, seed=0, epoch=0, rank=0, world_size=1, num_workers=0,
                                  resampled=False)))
    pixels_255 = ((batch["image"] + 1) * 127.5).round().int()
    assert (pixels_255[:, :, :2] == 255).all()  # was 0: the black RGB under alpha 0
    assert pixels_255[:, :, 2:].reshape(2, 3, -1)[:, :, 0].tolist() == [[30, 60, 90]] * 2


def test_help_describes_the_tool_in_whole_sentences(capsys):
    from genscale.data.write_shards import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "an .npz, a torchvision dataset on disk, or a folder of side-by-side A|B pairs." in text  # was cut after "torchvision"
