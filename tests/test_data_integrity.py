"""What resolve_data finds out from every shard before training: archives damaged in the middle
(which tarfile reads as shorter ones without a word) and the labels of all the shards, not just
the first one's."""
from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest

from genscale.data import resolve_data
from genscale.data import shardset
from genscale.data.writer import encode_png, write_info, write_split
from genscale.errors import UserError


def grey(i: int) -> bytes:
    return encode_png(np.full((6, 6), i % 256, np.uint8))


def shards(tmp_path, labels_per_shard, name="ds") -> str:
    """A folder without info.json, one shard per list of labels (None = no label member)."""
    folder = tmp_path / name
    folder.mkdir()
    for n, labels in enumerate(labels_per_shard):
        samples = [{"__key__": f"s{n}k{i:03d}", "png": grey(i)} for i in range(len(labels))]
        for sample, label in zip(samples, labels):
            if label is not None:
                sample["cls"] = label
        write_split(samples, str(tmp_path / "tmp"))
        os.replace(tmp_path / "tmp" / "000000.tar", folder / f"{n:06d}.tar")
    return str(folder)


def member_offsets(path) -> list[int]:
    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers()]


def damage_header(data: bytearray, offset: int) -> None:
    data[offset + 3] ^= 1  # one bit of the member name: the header checksum no longer matches


def overwrite(data: bytearray, offset: int) -> None:
    data[offset:offset + 4000] = bytes((i * 37 + 11) % 256 for i in range(4000))


def zero_block(data: bytearray, offset: int) -> None:
    data[offset:offset + 512] = bytes(512)  # tarfile takes a zero block for the end of the archive


@pytest.fixture
def fresh_warnings(monkeypatch):
    # A warning is given once per process: each test starts with none given, as rank 0.
    monkeypatch.setattr(shardset, "_WARNED", set(), raising=False)
    monkeypatch.delenv("RANK", raising=False)


@pytest.mark.parametrize("damage", [damage_header, overwrite, zero_block])
def test_a_shard_damaged_midway_is_refused_naming_it(tmp_path, damage):
    folder = shards(tmp_path, [[0, 1, 2] * 6, [0, 1, 2] * 6])
    path = os.path.join(folder, "000001.tar")
    data = bytearray(open(path, "rb").read())
    damage(data, member_offsets(path)[20])
    open(path, "wb").write(bytes(data))
    with tarfile.open(path) as tar:  # what went unnoticed: a shorter archive, no error
        assert len(tar.getmembers()) == 20
    with pytest.raises(UserError, match="000001.tar is damaged") as err:
        resolve_data(folder)
    assert err.value.exit_code == 2 and "\n" not in str(err.value)
    assert "a reader stops without an error after 10 samples;" in str(err.value)


def test_damaged_image_bytes_are_not_a_damaged_archive(tmp_path):
    # The headers are intact: the loader skips and counts the one unreadable image instead.
    folder = shards(tmp_path, [[0, 1] * 5])
    path = os.path.join(folder, "000000.tar")
    data = bytearray(open(path, "rb").read())
    data[member_offsets(path)[2] + 512 + 30] ^= 0xFF
    open(path, "wb").write(bytes(data))
    assert resolve_data(folder).num_classes == 2
    truncated = bytearray(data)
    zero_block(truncated, member_offsets(path)[4])
    open(path, "wb").write(bytes(truncated))
    with pytest.raises(UserError, match="is damaged"):
        resolve_data(folder)


def test_long_names_and_pax_headers_are_walked_by_tarfile(tmp_path, monkeypatch):
    # Names over 100 bytes need GNU or PAX extension headers, which the quick walk leaves to
    # tarfile; the labels behind them are still counted, and damage is still found.
    folder = tmp_path / "long"
    folder.mkdir()
    path = folder / "000000.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i in range(6):
            for ext, data in (("png", grey(i)), ("cls", str(i % 3).encode())):
                info = tarfile.TarInfo(f"{'d' * 120}/k{i}.{ext}")
                info.size, info.mtime = len(data), 1.5  # a float mtime: a PAX record per member
                tar.addfile(info, io.BytesIO(data))
    whole = path.read_bytes()
    assert resolve_data(str(folder)).num_classes == 3
    data = bytearray(whole)
    damage_header(data, member_offsets(path)[6])
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="000000.tar is damaged"):
        resolve_data(str(folder))
    from genscale.data import tarscan

    path.write_bytes(whole)
    walks = []
    monkeypatch.setattr(tarscan, "_tarfile_members", lambda fh, real=tarscan._tarfile_members: walks.append(1) or real(fh))
    scan = tarscan.scan_shard(str(path))
    assert walks == [1] and (scan.samples, dict(scan.counts)) == (6, {0: 2, 1: 2, 2: 2})


@pytest.mark.parametrize("last_shard, classes", [([0, 1, 2], 3), ([2, 3, 4], 5)])
def test_labels_are_counted_over_every_shard(tmp_path, last_shard, classes):
    # Class-sorted shards: the first holds classes 0 and 1 only.
    folder = shards(tmp_path, [[0, 1] * 10, last_shard * 5])
    assert resolve_data(folder).num_classes == classes
    assert resolve_data(os.path.join(folder, "{000000..000001}.tar")).num_classes == classes


def test_info_json_with_too_few_classes_is_refused(tmp_path, capsys, fresh_warnings):
    folder = shards(tmp_path, [[0, 1, 4, 2]])
    write_info(folder, {"name": "ds", "channels": 1, "image_size": 6, "num_classes": 3})
    with pytest.raises(UserError, match=r"hold label 4, but .*info.json says num_classes 3") as err:
        resolve_data(folder)
    assert "\n" not in str(err.value)
    # agreeing with its info.json: accepted as it says, without a word
    write_info(folder, {"name": "ds", "channels": 1, "image_size": 6, "num_classes": 5, "counts": {"train": 4}})
    got = resolve_data(folder)
    assert (got.num_classes, got.num_samples) == (5, 4) and capsys.readouterr().err == ""


def test_labels_written_as_digit_strings_are_read(tmp_path):
    folder = tmp_path / "strjson"
    write_split([{"__key__": f"k{i}", "png": grey(i), "json": {"label": str(i % 4)}} for i in range(8)],
                str(folder))
    assert resolve_data(str(folder)).num_classes == 4


def test_partly_labelled_data_warns_once(tmp_path, capsys, fresh_warnings):
    folder = shards(tmp_path, [[0, None, 2, None, 1, None]])
    for _ in range(2):
        assert resolve_data(folder).num_classes == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: 3 of 6 samples of ds have no label; they train as unlabelled images."]


def test_unreadable_labels_are_warned_about(tmp_path, capsys, fresh_warnings):
    folder = tmp_path / "cats"
    write_split([{"__key__": f"k{i}", "png": grey(i), "json": {"label": "cat"}} for i in range(4)], str(folder))
    assert resolve_data(str(folder)).num_classes == 0
    err = capsys.readouterr().err
    assert "4 of 4 samples of cats carry a label the loader cannot read (e.g. '{\"label\": \"cat\"}'" in err
    # some readable, some not: labelled data with a hole
    mixed = tmp_path / "mixed"
    write_split([{"__key__": f"k{i}", "png": grey(i), "cls": "x" if i % 2 else str(i)} for i in range(4)],
                str(mixed))
    assert resolve_data(str(mixed)).num_classes == 3
    assert "2 of 4 samples of mixed have no label the loader can read (e.g. 'x')" in capsys.readouterr().err
    # a caption-only json (img2dataset) is no label at all, and says nothing
    web = tmp_path / "web"
    write_split([{"__key__": f"k{i}", "png": grey(i), "json": {"caption": "c"}} for i in range(3)], str(web))
    assert resolve_data(str(web)).num_classes == 0 and capsys.readouterr().err == ""


def test_a_walked_shard_is_not_walked_again_until_it_changes(tmp_path, monkeypatch):
    """A resume (a new process) reads the kept record instead of walking the headers again; a
    shard written anew is walked again, and a damaged copy is still refused."""
    from genscale.data import tarscan

    monkeypatch.setenv("GENSCALE_CACHE", str(tmp_path / "cache"))
    path = os.path.join(shards(tmp_path, [[0, 1, 2, 2]]), "000000.tar")
    walks = []
    real_scan = tarscan._scan
    monkeypatch.setattr(tarscan, "_scan", lambda p: walks.append(p) or real_scan(p))
    for _ in range(2):
        monkeypatch.setattr(tarscan, "_SCANNED", {})  # a new process: nothing in memory
        labels = tarscan.scan_shard(path)
        assert (labels.samples, dict(labels.counts)) == (4, {0: 1, 1: 1, 2: 2})
    assert walks == [path]
    data = bytearray(open(path, "rb").read())
    damage_header(data, member_offsets(path)[3])
    with open(path, "wb") as fh:
        fh.write(bytes(data))
    os.utime(path, ns=(1, 1))  # another modification time, whatever the clock's resolution
    monkeypatch.setattr(tarscan, "_SCANNED", {})
    with pytest.raises(UserError, match="is damaged"):
        tarscan.scan_shard(path)
    assert walks == [path, path]


def test_a_shard_without_images_is_refused_naming_it(tmp_path):
    """Shards are split across ranks: a rank whose share held only such a shard waited for a batch
    forever, and the other ranks hung in their first collective."""
    folder = shards(tmp_path, [[0, 1]])
    empty = os.path.join(folder, "000001.tar")
    with tarfile.open(empty, "w") as tar:
        for i in range(3):
            info = tarfile.TarInfo(f"k{i}.txt")
            info.size = 5
            tar.addfile(info, io.BytesIO(b"hello"))
    with pytest.raises(UserError, match=r"000001\.tar holds no images"):
        resolve_data(folder)
