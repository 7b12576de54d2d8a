"""Readers for the shard writer: each turns one kind of source into a list of lazy records.

Kinds: ``folder`` (images, unlabelled), ``classes`` (one sub-folder per class, labels in sorted
folder-name order), ``npz`` (``images``/``arr_0`` uint8 NHW or NHWC, optional
``labels``/``arr_1``), ``torchvision`` (a torchvision dataset already on disk, opened with
download=False) and ``side-by-side`` (pix2pix's A|B images, cut into ``src``/``tgt`` halves).
A folder holding ``train/`` plus ``test/`` (or ``val/``) keeps that split instead of drawing one.
"""
from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from PIL import Image

from genscale.data.transforms import decode_image
from genscale.data.writer import encode_png
from genscale.errors import UserError

KINDS = ("auto", "folder", "classes", "npz", "torchvision", "side-by-side")
FILE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
# Formats stored as they are; any other is decoded and re-encoded as PNG.
KEPT_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
# Folder that marks a torchvision dataset root -> the torchvision class that reads it.
TORCHVISION_MARKERS = {"MNIST": "MNIST", "FashionMNIST": "FashionMNIST", "KMNIST": "KMNIST",
                       "cifar-10-batches-py": "CIFAR10", "cifar-100-python": "CIFAR100"}


@dataclass
class Record:
    """One sample to be: ``load()`` gives its image fields (bytes by extension) and metadata."""

    load: Callable[[], dict]
    label: int | None = None
    split: str | None = None  # a split fixed by the source; None = drawn by the writer
    origin: str = ""  # the file it comes from, named when it cannot be read


@dataclass
class Source:
    records: list[Record]
    kind: str
    class_names: list[str] = field(default_factory=list)
    paired: bool = False


def read_source(src: str, kind: str = "auto", dataset: str | None = None, direction: str = "AtoB") -> Source:
    """The records of ``src`` read as ``kind`` (guessed when "auto")."""
    if not os.path.exists(src):
        raise UserError(f"{src} does not exist.")
    if kind == "auto":
        kind = guess_kind(src)
    if kind == "npz":
        return _npz(src)
    if not os.path.isdir(src):
        raise UserError(f"{src} must be a folder for --kind {kind}.")
    if kind == "torchvision":
        return _torchvision(src, dataset)
    splits = _predefined_splits(src)
    class_names: list[str] = []
    if kind == "classes":
        records, class_names = _class_records(splits)
    elif kind in ("folder", "side-by-side"):
        records = [_file_record(p, split, paired=kind == "side-by-side", direction=direction)
                   for split, folder in splits for p in _image_files(folder)]
    else:
        raise UserError(f"unknown --kind {kind}; choose one of {', '.join(KINDS)}.")
    if not records:
        raise UserError(f"{src} holds no image files ({', '.join(FILE_EXTENSIONS)}).")
    return Source(records, kind, class_names, paired=kind == "side-by-side")


def guess_kind(src: str) -> str:
    if os.path.isfile(src):
        if src.endswith(".npz"):
            return "npz"
        raise UserError(f"{src} is a file but not an .npz; give a folder or an .npz.")
    if _torchvision_name(src):
        return "torchvision"
    folder = _predefined_splits(src)[0][1]
    entries = sorted(os.listdir(folder))
    if any(_is_image_file(os.path.join(folder, e)) for e in entries):
        return "folder"
    if any(os.path.isdir(os.path.join(folder, e)) for e in entries):
        return "classes"
    raise UserError(f"{src} holds neither image files nor class sub-folders.")


def _predefined_splits(src: str) -> list[tuple[str | None, str]]:
    train = os.path.join(src, "train")
    test = next((os.path.join(src, t) for t in ("test", "val") if os.path.isdir(os.path.join(src, t))), None)
    if os.path.isdir(train) and test:
        return [("train", train), ("test", test)]
    return [(None, src)]


def _is_image_file(path: str) -> bool:
    name = os.path.basename(path)
    return os.path.isfile(path) and name.lower().endswith(FILE_EXTENSIONS) and not name.startswith(".")


def _image_files(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files) if _is_image_file(os.path.join(root, f))]
    return found


def _class_records(splits: list[tuple[str | None, str]]) -> tuple[list[Record], list[str]]:
    """Records of a class-per-folder tree and its class names (labels in sorted name order).

    A class folder without an image in any split is skipped with a note rather than refused: it
    is usually a leftover (a failed download, a class filtered out), and counting it would give
    a conditional model a class it never sees. Refusing would make the user delete it first."""
    names = []
    files: dict[tuple[str | None, str], list[str]] = {}
    for split, folder in splits:
        found = _class_folders(folder)
        if names and found != names:
            raise UserError(f"{folder} has other class folders than {splits[0][1]}.")
        names = found
        for name in names:
            files[split, name] = _image_files(os.path.join(folder, name))
    kept = [n for n in names if any(files[split, n] for split, _ in splits)]
    empty = [n for n in names if n not in kept]
    if empty and kept:
        print(f"note: skipped {len(empty)} class folder(s) without images, so they are no class: "
              f"{', '.join(empty[:5])}{' ...' if len(empty) > 5 else ''}", file=sys.stderr)
    records = [_file_record(p, split, label=label, meta={"class": name})
               for split, _ in splits for label, name in enumerate(kept) for p in files[split, name]]
    return records, kept


def _class_folders(folder: str) -> list[str]:
    names = sorted(e for e in os.listdir(folder) if os.path.isdir(os.path.join(folder, e)) and not e.startswith("."))
    if not names:
        raise UserError(f"{folder} has no class sub-folders.")
    return names


def _file_record(path: str, split: str | None, label: int | None = None, meta: dict | None = None,
                 paired: bool = False, direction: str = "AtoB") -> Record:
    def load() -> dict:
        with open(path, "rb") as f:
            data = f.read()
        info = {"file": os.path.basename(path), **(meta or {})}
        if paired:
            return {**_halves(data, direction), "json": info}
        fmt = Image.open(io.BytesIO(data)).format  # the writer decodes it fully afterwards
        if fmt in KEPT_FORMATS:
            return {KEPT_FORMATS[fmt]: data, "json": info}
        return {"png": encode_png(np.asarray(decode_image(data))), "json": info}

    return Record(load, label, split, origin=path)


def _halves(data: bytes, direction: str) -> dict:
    img = np.asarray(decode_image(data))
    w = img.shape[1]
    if w < 2 or w % 2:
        raise ValueError(f"side-by-side image of odd width {w}")
    a, b = img[:, : w // 2], img[:, w // 2:]
    if direction == "BtoA":
        a, b = b, a
    return {"src.png": encode_png(np.ascontiguousarray(a)), "tgt.png": encode_png(np.ascontiguousarray(b))}


def _npz(path: str) -> Source:
    try:
        arrays = np.load(path, allow_pickle=False)
        names = set(arrays.files)
    except (OSError, ValueError) as exn:
        raise UserError(f"{path} is not a readable .npz without pickles ({exn}).") from None
    key = next((k for k in ("images", "arr_0") if k in names), None)
    if key is None:
        raise UserError(f"{path} holds no 'images' or 'arr_0' array (it has: {', '.join(sorted(names))}).")
    images = arrays[key]
    if images.dtype != np.uint8:
        raise UserError(f"{path}: {key} must be uint8 pixels, not {images.dtype}.")
    if images.ndim == 4 and images.shape[1] in (1, 3) and images.shape[3] not in (1, 3):
        images = images.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[3] not in (1, 3)):
        raise UserError(f"{path}: {key} has shape {images.shape}; expected N x H x W or N x H x W x C, C = 1 or 3.")
    if len(images) == 0:
        raise UserError(f"{path} holds no images ({key} has shape {images.shape}).")
    labels = None
    label_key = next((k for k in ("labels", "arr_1") if k in names), None)
    if label_key is not None:
        labels = np.asarray(arrays[label_key])
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise UserError(f"{path}: {label_key} must be {len(images)} non-negative integers, "
                            f"got {labels.dtype} of shape {labels.shape}.")
    records = [Record((lambda i=i: {"png": encode_png(images[i])}),
                      None if labels is None else int(labels[i])) for i in range(len(images))]
    num_classes = 0 if labels is None else int(labels.max()) + 1
    return Source(records, "npz", [str(c) for c in range(num_classes)])


def _torchvision_name(src: str) -> str | None:
    for marker, name in TORCHVISION_MARKERS.items():
        if os.path.isdir(os.path.join(src, marker)):
            return name
    return None


def _torchvision(src: str, dataset: str | None) -> Source:
    name = dataset or _torchvision_name(src)
    if not name:
        raise UserError(f"cannot tell which torchvision dataset {src} holds; pass --dataset (e.g. MNIST, CIFAR10).")
    try:
        import torchvision.datasets
    except Exception as exn:  # a torchvision built for another torch fails in odd ways
        raise UserError(f"torchvision cannot be imported ({exn}); it is needed for --kind torchvision.") from None
    cls = getattr(torchvision.datasets, name, None)
    if cls is None:
        raise UserError(f"torchvision has no dataset named {name}.")
    records: list[Record] = []
    class_names: list[str] = []
    for split in ("train", "test"):
        try:
            try:
                ds = cls(src, train=split == "train", download=False)
            except TypeError:  # datasets such as SVHN take split= instead of train=
                ds = cls(src, split=split, download=False)
        except (RuntimeError, OSError, ValueError) as exn:
            raise UserError(f"torchvision {name} is not readable under {src} ({str(exn).splitlines()[0]}).") from None
        class_names = [str(c) for c in getattr(ds, "classes", [])] or class_names
        records += [Record((lambda ds=ds, i=i: _torchvision_item(ds, i)), _target(ds, i), split)
                    for i in range(len(ds))]
    return Source(records, "torchvision", class_names)


def _target(ds, i: int) -> int | None:
    targets = getattr(ds, "targets", None)
    if targets is None:
        targets = getattr(ds, "labels", None)
    return None if targets is None else int(targets[i])


def _torchvision_item(ds, i: int) -> dict:
    image, _ = ds[i]
    if not isinstance(image, Image.Image):
        raise ValueError(f"item {i} is a {type(image).__name__}, not a PIL image")
    return {"png": encode_png(np.asarray(to_grey_or_rgb(image)))}


def to_grey_or_rgb(img: Image.Image) -> Image.Image:
    return img if img.mode in ("L", "RGB") else img.convert("RGB")
