"""The streaming loader: values, splits across ranks and workers, determinism, corrupt samples."""
from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from genscale.data import ShardSet, make_loader, resolve_data
from genscale.data.transforms import decode_image
from genscale.data.writer import encode_png, write_split
from genscale.errors import UserError


def grey_sample(i: int, size: int = 8) -> dict:
    # Pixel value = the sample's index (mod 256): every decoded image says which sample it is.
    return {"__key__": f"s{i:04d}", "png": encode_png(np.full((size, size), i % 256, np.uint8)), "cls": i % 5}


def shard_set(tmp_path, samples, maxcount, name="ds", **kw) -> ShardSet:
    write_split(samples, str(tmp_path / name), maxcount=maxcount)
    urls = sorted(str(p) for p in (tmp_path / name).iterdir())
    return ShardSet(urls=urls, name=name, channels=kw.pop("channels", 1), image_size=8,
                    num_classes=kw.pop("num_classes", 5), **kw)


def loader(shards, **kw):
    args = dict(image_size=8, channels=1, batch_size=4, batches_per_epoch=6, seed=0, epoch=0, rank=0,
                world_size=1, num_workers=0, shuffle_buffer=20)
    args.update(kw)
    return make_loader(shards, **args)


def collect(batches) -> list[tuple]:
    return [(tuple(b["key"]), b["image"].numpy().tobytes(), tuple(b["label"].tolist())) for b in batches]


@pytest.fixture
def forty(tmp_path):
    return shard_set(tmp_path, [grey_sample(i) for i in range(40)], maxcount=10)  # 4 shards


def test_eval_stream_reads_every_sample_once_with_exact_values(forty):
    batches = list(loader(forty, resampled=False, batch_size=3))
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == [f"s{i:04d}" for i in range(40)]
    assert [len(b["key"]) for b in batches][-1] == 40 % 3  # the last batch is short
    for b in batches:
        assert b["image"].dtype == torch.float32 and b["image"].shape[1:] == (1, 8, 8)
        assert b["label"].dtype == torch.int64 and b["skipped"] == 0
        for key, img, label in zip(b["key"], b["image"], b["label"]):
            i = int(key[1:])
            expected = np.float64(i) / 127.5 - 1.0
            assert torch.allclose(img.double(), torch.full_like(img.double(), expected), atol=1e-6)
            assert label.item() == i % 5


@pytest.mark.parametrize("n_shards", [4, 1])  # 4 shards: parted by shard; 1 shard: parted by sample
def test_two_ranks_two_workers_cover_the_split_without_duplicates(tmp_path, n_shards):
    shards = shard_set(tmp_path, [grey_sample(i) for i in range(40)], maxcount=40 // n_shards)
    keys = []
    for rank in range(2):
        for b in loader(shards, resampled=False, rank=rank, world_size=2, num_workers=2):
            keys += b["key"]
    assert len(keys) == 40 and sorted(keys) == [f"s{i:04d}" for i in range(40)]


def test_resampled_stream_is_deterministic_for_0_1_2_workers(forty):
    runs = {}
    for workers in (0, 1, 2):
        a = collect(loader(forty, num_workers=workers, flip=True, random_crop=True))
        b = collect(loader(forty, num_workers=workers, flip=True, random_crop=True))
        assert a == b and len(a) == 6, f"num_workers={workers}"
        runs[workers] = a
    assert runs[0] == runs[1]  # no worker and one worker: the same stream
    assert runs[2] != runs[0]
    # the same loader iterated twice replays the same epoch
    same = loader(forty, num_workers=0)
    assert collect(same) == collect(same)


STREAM_DIGEST = """
import hashlib, sys
from genscale.data import ShardSet, make_loader
shards = ShardSet(urls=sys.argv[1:], name="ds", channels=1, image_size=8, num_classes=5)
h = hashlib.sha256()
for b in make_loader(shards, image_size=8, channels=1, batch_size=4, batches_per_epoch=6, seed=0, epoch=0,
                     rank=0, world_size=1, num_workers=2, shuffle_buffer=20, flip=True, random_crop=True):
    h.update(b["image"].numpy().tobytes()); h.update(repr(b["key"]).encode())
print(h.hexdigest())
"""


def test_stream_is_identical_in_a_fresh_process(forty):
    # A resumed run rebuilds the loader in a new process, with another PYTHONHASHSEED and clock.
    import hashlib
    import os
    import subprocess
    import sys

    h = hashlib.sha256()
    for b in loader(forty, num_workers=2, flip=True, random_crop=True):
        h.update(b["image"].numpy().tobytes())
        h.update(repr(b["key"]).encode())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", STREAM_DIGEST, *forty.urls], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == h.hexdigest()


def test_seed_epoch_and_rank_each_change_the_stream(forty):
    base = collect(loader(forty))
    assert collect(loader(forty, seed=1)) != base
    assert collect(loader(forty, epoch=1)) != base
    r0 = {k for b in loader(forty, rank=0, world_size=2) for k in b["key"]}
    r1 = {k for b in loader(forty, rank=1, world_size=2) for k in b["key"]}
    assert r0 and r1 and not r0 & r1  # 4 shards: each rank draws from its own half


def test_ranks_sharing_one_shard_still_differ(tmp_path):
    shards = shard_set(tmp_path, [grey_sample(i) for i in range(40)], maxcount=40)
    a = collect(loader(shards, rank=0, world_size=2))
    b = collect(loader(shards, rank=1, world_size=2))
    assert [x[0] for x in a] != [x[0] for x in b]


def test_epoch_length_is_per_loader_not_per_worker(forty):
    assert len(list(loader(forty, num_workers=2, batches_per_epoch=5))) == 5


def test_loader_leaves_global_rng_alone(forty):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    list(loader(forty, num_workers=0, flip=True))
    assert torch.equal(torch.get_rng_state(), state)


def test_corrupt_png_is_skipped_and_counted(tmp_path):
    samples = [grey_sample(i) for i in range(12)]
    samples[5]["png"] = samples[5]["png"][:40]  # truncated: the header parses, the pixels do not
    samples[9]["png"] = b"not an image at all"
    shards = shard_set(tmp_path, samples, maxcount=100)
    batches = list(loader(shards, resampled=False, batch_size=4))
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == [f"s{i:04d}" for i in range(12) if i not in (5, 9)]
    assert sum(b["skipped"] for b in batches) == 2
    # training keeps going over the bad samples and reports them as they pass
    train = list(loader(shards, batch_size=4, batches_per_epoch=12, num_workers=1))
    assert len(train) == 12 and sum(b["skipped"] for b in train) >= 2
    assert not {"s0005", "s0009"} & {k for b in train for k in b["key"]}


def test_resize_and_channel_conversion(tmp_path):
    rgb = np.zeros((6, 12, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    shards = shard_set(tmp_path, [{"__key__": "c", "png": encode_png(rgb)}], maxcount=10, channels=3)
    (b,) = list(loader(shards, resampled=False, image_size=16, channels=3, batch_size=1))
    assert b["image"].shape == (1, 3, 16, 16) and b["label"].tolist() == [-1]
    expected = torch.tensor([200, 100, 50], dtype=torch.float64) / 127.5 - 1
    assert torch.allclose(b["image"][0].double().mean(dim=(1, 2)), expected, atol=2 / 255)
    (g,) = list(loader(shards, resampled=False, image_size=4, channels=1, batch_size=1))
    luma = (0.299 * 200 + 0.587 * 100 + 0.114 * 50) / 127.5 - 1
    assert g["image"].shape == (1, 1, 4, 4) and abs(g["image"].mean().item() - luma) < 1.5 / 127.5
    grey = shard_set(tmp_path, [grey_sample(77)], maxcount=10, name="g")
    (c,) = list(loader(grey, resampled=False, channels=3, batch_size=1))
    assert torch.equal(c["image"][0, 0], c["image"][0, 1]) and torch.equal(c["image"][0, 1], c["image"][0, 2])


def test_labels_from_json_and_unlabelled_web_samples(tmp_path):
    jpg = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(jpg, format="JPEG")
    samples = [{"__key__": "w0", "jpg": jpg.getvalue(), "txt": "a caption", "json": {"caption": "x"}},
               {"__key__": "w1", "png": grey_sample(3)["png"], "json": {"label": 7}},
               {"__key__": "w2", "webp": _webp(), "json": {"cls": 2}}]
    shards = shard_set(tmp_path, samples, maxcount=10, channels=3, num_classes=8)
    (b,) = list(loader(shards, resampled=False, channels=3, batch_size=3))
    assert dict(zip(b["key"], b["label"].tolist())) == {"w0": -1, "w1": 7, "w2": 2}
    (u,) = list(loader(shards, resampled=False, channels=3, batch_size=3, class_cond=False))
    assert u["label"].tolist() == [-1, -1, -1]


def _webp() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 30, np.uint8)).save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def test_paired_samples_stay_aligned_under_crop_and_flip(tmp_path):
    rng = np.random.default_rng(0)
    samples = []
    for i in range(6):
        img = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        samples.append({"__key__": f"p{i}", "src.png": encode_png(img), "tgt.png": encode_png(img), "cls": 1})
    shards = shard_set(tmp_path, samples, maxcount=10, channels=3, paired=True)
    seen = 0
    for b in loader(shards, channels=3, flip=True, random_crop=True, batches_per_epoch=4, batch_size=3):
        assert b["source"].shape == b["image"].shape == (3, 3, 8, 8)
        assert torch.equal(b["source"], b["image"])  # same crop box, same flip
        seen += b["image"].shape[0]
    assert seen == 12


def test_flip_is_seeded_and_used(tmp_path):
    left_dark = np.zeros((8, 8), np.uint8)
    left_dark[:, 4:] = 255
    shards = shard_set(tmp_path, [{"__key__": f"f{i}", "png": encode_png(left_dark)} for i in range(20)],
                       maxcount=20)
    batches = list(loader(shards, flip=True, batch_size=10, batches_per_epoch=4))
    left = torch.cat([b["image"][:, 0, 0, 0] for b in batches])
    assert 5 < int((left > 0).sum()) < 35  # about half flipped
    assert collect(batches) == collect(loader(shards, flip=True, batch_size=10, batches_per_epoch=4))
    unflipped = torch.cat([b["image"][:, 0, 0, 0] for b in loader(shards, batch_size=10, batches_per_epoch=4)])
    assert (unflipped < 0).all()  # default: no flips (digits would change meaning)


def test_builtin_digits_through_the_loader(tmp_path):
    shards = resolve_data("digits", "test", cache_dir=str(tmp_path))
    keys = [k for b in loader(shards, resampled=False, batch_size=64, image_size=32) for k in b["key"]]
    assert len(keys) == len(set(keys)) == shards.num_samples
    b = next(iter(loader(shards, image_size=32, batch_size=16)))
    assert b["image"].shape == (16, 1, 32, 32) and -1 <= b["image"].min() < b["image"].max() <= 1
    assert set(b["label"].tolist()) <= set(range(10))


@pytest.mark.parametrize("workers", [0, 1])
def test_all_corrupt_data_fails_instead_of_spinning(tmp_path, monkeypatch, workers):
    from genscale.data import stream

    monkeypatch.setattr(stream, "MAX_FAILURES_IN_A_ROW", 50)  # a forked worker inherits it
    shards = shard_set(tmp_path, [{"__key__": f"b{i}", "png": b"garbage"} for i in range(10)], maxcount=10)
    with pytest.raises(UserError, match="in a row could not be read") as err:
        list(loader(shards, num_workers=workers))
    # raised in a worker, it still reaches the user as one sentence, not the worker's traceback
    assert "\n" not in str(err.value) and err.value.exit_code == 1


@pytest.mark.parametrize("workers", [0, 1])
def test_a_label_past_the_last_class_stops_with_one_sentence(tmp_path, workers):
    # Unchecked, label 7 of 5 classes was an IndexError mid-training (or, as label 5, the
    # null label of a class-conditional diffusion model: silently trained as unconditional).
    samples = [grey_sample(i) for i in range(8)]
    samples[5]["cls"] = 7
    shards = shard_set(tmp_path, samples, maxcount=10)
    with pytest.raises(UserError) as err:
        list(loader(shards, resampled=False, batch_size=3, num_workers=workers))
    assert str(err.value) == (f"sample s0005 of {shards.urls[0]} has label 7, but the data has 5 classes "
                              "(0 to 4); fix the label or the num_classes of the data's info.json.")
    assert err.value.exit_code == 1
    keys = [k for b in loader(shards, resampled=False, batch_size=3, class_cond=False) for k in b["key"]]
    assert len(keys) == 8  # an unconditional stream ignores labels


def test_labels_the_loader_cannot_read_are_no_labels(tmp_path):
    png = grey_sample(0)["png"]
    samples = [{"__key__": "a", "png": png, "cls": "abc"}, {"__key__": "b", "png": png, "json": {"label": "3"}},
               {"__key__": "c", "png": png, "json": {"label": -2}}, {"__key__": "d", "png": png, "json": {"cls": True}},
               {"__key__": "e", "png": png, "cls": " 4\n"}]
    shards = shard_set(tmp_path, samples, maxcount=10)
    (b,) = list(loader(shards, resampled=False, batch_size=5))
    assert dict(zip(b["key"], b["label"].tolist())) == {"a": -1, "b": 3, "c": -1, "d": -1, "e": 4}
    assert b["skipped"] == 0  # "abc" used to drop its sample


def _png(array: np.ndarray, mode: str, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG", **save)
    return buf.getvalue()


def test_transparent_pixels_are_composited_onto_white():
    rgba = np.array([[[0, 0, 0, 0], [200, 0, 0, 255]], [[0, 0, 0, 128], [10, 20, 30, 0]]], np.uint8)
    img = decode_image(_png(rgba, "RGBA"))
    assert img.mode == "RGB"
    got = np.asarray(img).astype(int)
    assert got[0, 0].tolist() == [255, 255, 255] and got[0, 1].tolist() == [200, 0, 0]
    assert got[1, 1].tolist() == [255, 255, 255] and np.abs(got[1, 0] - 127).max() <= 1
    la = np.array([[[0, 0], [50, 255]]], np.uint8)  # grey + alpha stays grey
    img = decode_image(_png(la, "LA"))
    assert img.mode == "L" and np.asarray(img).tolist() == [[255, 50]]
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([0, 0, 0, 90, 90, 90] + [0] * 762)
    buf = io.BytesIO()
    palette.save(buf, format="PNG", transparency=0)  # palette entry 0 is transparent
    img = decode_image(buf.getvalue())
    assert img.mode == "L" and np.asarray(img).tolist() == [[255, 90]]


def test_every_shard_is_drawn_equally_often_across_ranks():
    """Each rank draws the same number of shards uniformly from its own list. Split 6 shards over 4
    ranks (slices of 2, 2, 1, 1), the shards of the short slices were drawn twice as often as the
    others; now a rank keeps a disjoint slice only when the shards divide evenly."""
    from collections import Counter
    from itertools import islice

    from genscale.data.stream import _ShardSource

    def drawn(shards: int, world: int, draws: int = 1200) -> Counter:
        urls = tuple(f"s{i}.tar" for i in range(shards))
        counts: Counter = Counter()
        for rank in range(world):
            source = _ShardSource(urls=urls, resampled=True, seed=1, epoch=0, rank=rank, world_size=world,
                                  split_shards=False)
            counts.update(d["url"] for d in islice(source(), draws))
        return counts

    uneven = drawn(6, 4)
    expected = 4 * 1200 / 6
    assert set(uneven) == {f"s{i}.tar" for i in range(6)}
    assert all(abs(n - expected) < 0.15 * expected for n in uneven.values()), uneven
    even = drawn(8, 4)  # divides evenly: disjoint slices of 2, each shard still drawn equally often
    assert all(abs(n - 4 * 1200 / 8) < 0.15 * 4 * 1200 / 8 for n in even.values()), even


ORPHAN = """
import multiprocessing, os, signal, sys
from genscale.data import ShardSet, make_loader
shards = ShardSet(urls=sys.argv[1:], name="ds", channels=1, image_size=8, num_classes=5)
batches = iter(make_loader(shards, image_size=8, channels=1, batch_size=4, batches_per_epoch=10**6, seed=0,
                           epoch=0, rank=0, world_size=1, num_workers=1, shuffle_buffer=20, resampled=True))
next(batches)
print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer does
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_loader_workers_die_with_a_killed_trainer(forty):
    """A trainer killed outright left its worker running (deaf to SIGTERM, holding the shell's pipe)."""
    import os
    import subprocess
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    # Not subprocess.run: it waits for the end of the output, which a worker left alive holds open.
    proc = subprocess.Popen([sys.executable, "-c", ORPHAN, *forty.urls], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert proc.wait(timeout=120) == -9 and pids
    finally:
        proc.stdout.close()

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
        except OSError:
            return False

    deadline = time.monotonic() + 3  # the loader's own watchdog would notice only after 5 s, if ever
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)
