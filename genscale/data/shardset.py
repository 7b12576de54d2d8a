"""Turning a data spec (an embedded name, a folder, a tar, a brace pattern) into shard URLs."""
from __future__ import annotations

import glob
import os
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass, field

import braceexpand

from genscale.data.builtin import BUILTIN_NAMES, builtin_dir
from genscale.data.tarscan import ShardLabels, scan_shard
from genscale.data.transforms import IMAGE_EXTENSIONS, SOURCE_FIELDS, TARGET_FIELDS, decode_image
from genscale.data.writer import INFO_FILE, SPLITS, read_info
from genscale.errors import UserError
from genscale.families.base import DataInfo

PEEK_SAMPLES = 64
_WARNED: set[tuple[str, ...]] = set()  # shard lists already warned about (one warning per process)


@dataclass
class ShardSet:
    """The shards of one split and what is known about the images in them."""

    urls: list[str]
    name: str
    channels: int
    image_size: int  # native size (shorter side of the first image when not recorded)
    num_classes: int  # 0 = unlabelled
    paired: bool = False
    split: str = "train"
    num_samples: int | None = None  # None when no info.json records it
    class_names: list[str] = field(default_factory=list)

    def data_info(self, image_size: int | None = None, channels: int | None = None) -> DataInfo:
        """The family-facing DataInfo, at the training resolution/channels if they differ."""
        return DataInfo(name=self.name, channels=channels or self.channels,
                        image_size=image_size or self.image_size, num_classes=self.num_classes,
                        paired=self.paired)


def resolve_data(spec: str, split: str = "train", cache_dir: str | None = None, flag: str = "--data") -> ShardSet:
    """Shards of ``split`` for ``spec``: an embedded dataset name (digits, faces, photos,
    photos-paired), a folder of shards (its ``train/`` and ``test/`` subfolders if present,
    else all its tars as the train split), a single .tar, or a brace pattern
    ``path/{000000..000009}.tar`` (the last two are train-only). ``flag`` names the option the
    spec came from in error messages."""
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use 'train' or 'test'.")
    if spec in BUILTIN_NAMES:
        return _from_folder(builtin_dir(spec, cache_dir), split, name=spec)
    if "{" in spec and ".." in spec:
        urls = list(braceexpand.braceexpand(spec))
        missing = [u for u in urls if not os.path.exists(u)]
        if missing:
            raise UserError(f"shard pattern {spec} names {len(missing)} missing file(s), e.g. {missing[0]}.")
        return _from_files(urls, split, spec, name=_name_of(os.path.dirname(urls[0])))
    if os.path.isdir(spec):
        return _from_folder(spec, split, name=_name_of(spec))
    if os.path.isfile(spec):
        return _from_files([spec], split, spec, name=os.path.splitext(os.path.basename(spec))[0])
    raise UserError(f"{flag} {spec!r} is neither an embedded dataset ({', '.join(BUILTIN_NAMES)}) "
                    "nor an existing folder, .tar file or shard pattern.")


def _name_of(path: str) -> str:
    path = os.path.normpath(os.path.abspath(path))
    if os.path.basename(path) in SPLITS:  # .../NAME/train/*.tar is named NAME
        path = os.path.dirname(path)
    return os.path.basename(path) or "data"


def _tars(folder: str) -> list[str]:
    return sorted(glob.glob(os.path.join(glob.escape(folder), "*.tar")))


def _from_folder(folder: str, split: str, name: str) -> ShardSet:
    has_splits = any(os.path.isdir(os.path.join(folder, s)) for s in SPLITS)
    if has_splits:
        split_dir = os.path.join(folder, split)
        urls = _tars(split_dir) if os.path.isdir(split_dir) else []
        if not urls:
            raise UserError(f"{folder} has no {split} split (no .tar files in {split_dir}).")
    else:
        urls = _tars(folder)
        if not urls:
            hint = ""
            if any(e.lower().endswith((".png", ".jpg", ".jpeg", ".webp")) for e in os.listdir(folder)):
                # the likeliest mistake: a folder of images where shards are expected
                hint = f"; write shards from its images with: python -m genscale.data.write_shards {folder} SHARDS"
            raise UserError(f"{folder} holds no .tar shards (nor train/ and test/ subfolders with some){hint}.")
        if split != "train":
            raise UserError(f"{folder} has no {split} split: put its shards in train/ and test/ subfolders.")
    labels = _check_tars(urls)
    return _described(urls, split, name, folder, count=True, labels=labels)


def _described(urls: list[str], split: str, name: str, folder: str, count: bool, labels: ShardLabels) -> ShardSet:
    """From the folder's info.json when it has one, else from a peek into the shards."""
    info = read_info(folder)
    if info is None:
        return _noted(_peeked(urls, split, name, labels), labels)
    path = os.path.join(folder, INFO_FILE)
    try:
        counts = info.get("counts") or {}
        shards = ShardSet(urls=urls, name=str(info.get("name", name)), channels=int(info["channels"]),
                          image_size=int(info["image_size"]), num_classes=int(info.get("num_classes", 0)),
                          paired=bool(info.get("paired", False)), split=split,
                          num_samples=counts.get(split) if count else None,
                          class_names=list(info.get("class_names") or []))
    except KeyError as exn:
        raise UserError(f"{path} lacks a {exn.args[0]!r} entry.") from None
    except (TypeError, ValueError) as exn:  # e.g. "channels": "x"
        raise UserError(f"{path} holds a value of the wrong type ({exn}).") from None
    top = max(labels.counts, default=-1)
    if shards.num_classes and top >= shards.num_classes:  # else refused mid-training by the stream
        raise UserError(f"the shards of {folder} hold label {top}, but {path} says num_classes "
                        f"{shards.num_classes}; correct its num_classes (and class_names).")
    return _noted(shards, labels)


def _noted(shards: ShardSet, labels: ShardLabels) -> ShardSet:
    """Warn once when labels are unreadable, or when only some samples of labelled data have one.

    Not refused: the families train an unlabelled sample on purpose (diffusion as its null
    label, cgan as 'some real class'), but the user should know that part of the data does."""
    unlabelled = labels.samples - labels.labelled
    if labels.unreadable and not shards.num_classes:
        what = f"carry a label the loader cannot read (e.g. {labels.example!r}; a label is a non-negative integer)"
        outcome = "the data is used unlabelled"
    elif shards.num_classes and unlabelled:
        what = "have no label" + (f" the loader can read (e.g. {labels.example!r})" if labels.unreadable else "")
        outcome = "they train as unlabelled images"
    else:
        return shards
    key = tuple(shards.urls)
    if key not in _WARNED and os.environ.get("RANK", "0") == "0":  # once, not once per process of a job
        _WARNED.add(key)
        count = labels.unreadable if not shards.num_classes else unlabelled
        print(f"warning: {count} of {labels.samples} samples of {shards.name} {what}; {outcome}.", file=sys.stderr)
    return shards


def _from_files(urls: list[str], split: str, spec: str, name: str) -> ShardSet:
    if split != "train":
        raise UserError(f"{spec} has no {split} split: give a folder with train/ and test/ subfolders.")
    labels = _check_tars(urls)
    # Shards picked from a written dataset (NAME/train/000003.tar) still have its info.json.
    split_dir = os.path.dirname(os.path.abspath(urls[0]))
    for folder in (split_dir, os.path.dirname(split_dir)):
        if os.path.isfile(os.path.join(folder, INFO_FILE)):
            return _described(urls, split, name, folder, count=False, labels=labels)
    return _noted(_peeked(urls, split, name, labels), labels)


def _check_tars(urls: list[str]) -> ShardLabels:
    """Refuse a shard that is not a whole tar; return the labels of all of them."""
    labels = ShardLabels()
    for url in urls:
        if not os.path.isfile(url):
            raise UserError(f"{url} is not a file.")
        if not tarfile.is_tarfile(url):
            raise UserError(f"{url} is not a tar archive.")
        if not _ends_like_a_tar(url):
            raise UserError(f"{url} is cut short (it lacks the end-of-archive blocks of a complete tar); "
                            "copy it again or write the shards anew.")
        found = scan_shard(url)  # also refuses a shard damaged in the middle
        if found.samples == 0:
            # A rank whose share of the shards holds no image would wait for a batch forever while
            # the others hang in their first collective (shards are split across ranks).
            raise UserError(f"{url} holds no images ({', '.join(IMAGE_EXTENSIONS)}); remove it from the data or "
                            "write the shards anew.")
        labels.add(found)
    return labels


def _ends_like_a_tar(path: str) -> bool:
    """A complete tar is whole 512-byte blocks ending in two zero blocks (the end-of-archive
    marker). A shard cut short by an interrupted copy lacks them, and tarfile and WebDataset would
    read it as a shorter archive without a word: training would silently see fewer images."""
    size = os.path.getsize(path)
    if size < 1024 or size % 512:
        return False
    with open(path, "rb") as fh:
        fh.seek(size - 1024)
        return not any(fh.read(1024))


def _peeked(urls: list[str], split: str, name: str, labels: ShardLabels) -> ShardSet:
    """What the first shard's first samples say (channels, native size, pairing) and what the
    labels of every shard say (a class-sorted shard set puts its last classes in its last shards)."""
    groups: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(urls[0]) as tar:
            for member in tar:
                if not member.isfile() or "." not in os.path.basename(member.name):
                    continue
                key, ext = _split_name(member.name)
                ext = ext.lower()
                if len(groups) >= PEEK_SAMPLES and key not in groups:
                    break  # enough images to peek at; the scan has counted the labels
                if _is_image(ext):
                    groups.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except (OSError, tarfile.TarError) as exn:
        raise UserError(f"cannot read {urls[0]} ({exn}).") from None
    modes: Counter = Counter()
    sizes: list[int] = []
    paired = False
    for fields in groups.values():
        plain = [f for f in fields if f in IMAGE_EXTENSIONS]
        pair = [f for f in fields if f in TARGET_FIELDS]
        if not plain and pair and any(f in SOURCE_FIELDS for f in fields):
            paired = True
        for f in (plain or pair)[:1]:
            try:
                img = decode_image(fields[f])
            except Exception:  # a corrupt sample is the loader's business, not the peek's
                continue
            modes[img.mode] += 1
            sizes.append(min(img.size))
    if not sizes:
        raise UserError(f"{urls[0]} holds no readable images among its first {PEEK_SAMPLES} samples.")
    num_classes = max(labels.counts) + 1 if labels.counts else 0
    return ShardSet(urls=urls, name=name, channels=3 if modes.get("RGB") else 1,
                    image_size=Counter(sizes).most_common(1)[0][0], num_classes=num_classes,
                    paired=paired, split=split)


def _split_name(path: str) -> tuple[str, str]:
    # As WebDataset does: the key is everything before the first dot of the file name.
    folder, base = os.path.split(path)
    key, ext = base.split(".", 1)
    return os.path.join(folder, key), ext


def _is_image(ext: str) -> bool:
    return ext.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS
