"""Embedded datasets: real images that ship inside scikit-learn and scikit-image.

Each is written once to WebDataset shards under ``<cache>/<name>/{train,test}/NNNNNN.tar``
with an ``info.json``, so the first run needs no download. The cache folder is
``cache_dir`` if given, else ``$GENSCALE_CACHE``, else ``~/.cache/genscale``.

- ``digits``: scikit-learn's 1,797 handwritten digits, 8x8 grey, stored at their native size
  (values 0..16 mapped to round(v * 255 / 16)); label = the digit; stratified 80/20 split.
- ``faces``: scikit-image's LFW subset, 200 grey 25x25 crops. The first 100 are faces and the
  last 100 are background patches from the same photographs (checked by eye), so the label is
  1 = face, 0 = background; stratified 80/20 split. Sample class 1 for faces.
- ``photos``: the colour photographs bundled with scikit-image and scikit-learn (PHOTOS below),
  each scaled so its shorter side is 256 px, then cut into 64x64 crops on a 16 px grid. The
  rightmost band of each photo (a quarter of its width, at least 96 px) gives the test crops
  and the rest the train crops, so no test pixel appears in any train crop. Label = the photo's
  index in PHOTOS (class_names in info.json).
- ``photos-paired``: the same crops for image-to-image models: ``KEY.src.png`` is the crop in
  greyscale (one channel), ``KEY.tgt.png`` the colour crop (a colourisation task).

Writers race safely: each builds in a private temporary folder next to the target and renames
it into place; a process that loses the race discards its copy and uses the winner's.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable, Iterator

import numpy as np
from PIL import Image

from genscale.data.writer import (FORMAT_VERSION, INFO_FILE, encode_png, read_info, split_indices, write_info,
                                  write_split)
from genscale.errors import UserError

BUILTIN_NAMES = ("digits", "faces", "photos", "photos-paired")
SPLIT_SEED = 0
TEST_FRACTION = 0.2
# The colour photographs that ship inside the dependencies (retina, mostly black border, and
# the synthetic colorwheel/logo are left out); a label is an index into this tuple.
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
          "motorcycle", "china", "flower")
PHOTO_SHORT_SIDE = 256
CROP = 64
STRIDE = 16
# Several small shards rather than one: resampling then starts each epoch at a random shard
# and ranks/workers can be given disjoint shards, instead of every stream re-reading one file
# from its start (which over-weights the first few hundred samples of short epochs).
SHARD_SAMPLES = 256


def default_cache_dir() -> str:
    """``$GENSCALE_CACHE`` if set, else ``~/.cache/genscale``."""
    return os.environ.get("GENSCALE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "genscale")


def builtin_dir(name: str, cache_dir: str | None = None) -> str:
    """The folder holding the embedded dataset ``name``, writing it first if it is not cached."""
    if name not in BUILTIN_NAMES:
        raise UserError(f"unknown embedded dataset {name!r}; choose one of {', '.join(BUILTIN_NAMES)}.")
    root = os.path.abspath(cache_dir or default_cache_dir())
    target = os.path.join(root, name)
    if _complete(target):
        return target
    if os.path.exists(target):
        raise UserError(f"cache folder {target} exists but holds no {INFO_FILE}; remove it and run again.")
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache may be shared
    except OSError as exn:
        raise UserError(f"cannot write the dataset cache in {root} ({exn.strerror}); "
                        "set GENSCALE_CACHE to a writable folder.") from None
    try:
        _BUILDERS[name](tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not _complete(target):  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _complete(path: str) -> bool:
    # info.json is written last inside the temporary folder, so its presence means complete.
    return os.path.isfile(os.path.join(path, INFO_FILE))


def _info(name: str, channels: int, size: int, class_names: list[str], counts: dict,
          paired: bool = False, source: str = "") -> dict:
    return {"name": name, "channels": channels, "image_size": size, "num_classes": len(class_names),
            "class_names": class_names, "paired": paired, "counts": counts,
            "format_version": FORMAT_VERSION, "source": source}


def _write_arrays(out: str, images: np.ndarray, labels: np.ndarray, prefix: str,
                  maxcount: int = SHARD_SAMPLES) -> dict:
    """Stratified split, then one PNG + .cls per image; returns the per-split counts."""
    counts = {}
    for split, idx in zip(("train", "test"), split_indices(len(images), TEST_FRACTION, SPLIT_SEED, labels)):
        samples = ({"__key__": f"{prefix}{i:05d}", "png": encode_png(images[i]), "cls": int(labels[i])}
                   for i in idx)
        counts[split] = write_split(samples, os.path.join(out, split), maxcount=maxcount)
    return counts


def _build_digits(out: str) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    counts = _write_arrays(out, images, digits.target.astype(np.int64), "digit")
    write_info(out, _info("digits", 1, 8, [str(d) for d in range(10)], counts,
                          source="sklearn.datasets.load_digits"))


def _build_faces(out: str) -> None:
    from skimage.data import lfw_subset

    faces = lfw_subset()  # float in [0, 1] although documented as uint8
    images = np.round(np.clip(faces, 0.0, 1.0) * 255.0).astype(np.uint8)
    labels = (np.arange(len(images)) < 100).astype(np.int64)  # first 100 faces, then background
    counts = _write_arrays(out, images, labels, "lfw", maxcount=64)
    write_info(out, _info("faces", 1, images.shape[1], ["background", "face"], counts,
                          source="skimage.data.lfw_subset"))


def load_photo(name: str) -> np.ndarray:
    """One of PHOTOS as a uint8 HxWx3 array."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        return np.asarray(load_sample_image(f"{name}.jpg"), dtype=np.uint8)
    import skimage.data

    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    return np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)[:, :, :3]


def photo_crops(photo: np.ndarray) -> Iterator[tuple[str, int, int, np.ndarray]]:
    """(split, row, col, crop) for every CROP x CROP crop of one photo, on the STRIDE grid."""
    h, w = photo.shape[:2]
    scale = PHOTO_SHORT_SIDE / min(h, w)
    size = (max(CROP, round(w * scale)), max(CROP, round(h * scale)))
    small = np.asarray(Image.fromarray(photo).resize(size, Image.Resampling.BOX))
    h, w = small.shape[:2]
    test_w = max(96, int(round(0.25 * w / STRIDE)) * STRIDE)
    bands = (("train", 0, w - test_w), ("test", w - test_w, w))
    for split, x0, x1 in bands:
        for y in range(0, h - CROP + 1, STRIDE):
            for x in range(x0, x1 - CROP + 1, STRIDE):
                yield split, y, x, small[y:y + CROP, x:x + CROP]


def _build_photos(out: str, paired: bool) -> None:
    per_split: dict[str, list[dict]] = {"train": [], "test": []}
    for label, name in enumerate(PHOTOS):
        for split, y, x, crop in photo_crops(load_photo(name)):
            sample: dict = {"__key__": f"{name}_{y:04d}_{x:04d}", "cls": label}
            if paired:
                grey = np.asarray(Image.fromarray(crop).convert("L"))
                sample.update({"src.png": encode_png(grey), "tgt.png": encode_png(crop)})
            else:
                sample["png"] = encode_png(crop)
            per_split[split].append(sample)
    counts = {}
    rng = np.random.default_rng(SPLIT_SEED)
    for split, samples in per_split.items():
        order = rng.permutation(len(samples))
        counts[split] = write_split((samples[i] for i in order), os.path.join(out, split),
                                    maxcount=SHARD_SAMPLES)
    name = "photos-paired" if paired else "photos"
    write_info(out, _info(name, 3, CROP, list(PHOTOS), counts, paired=paired,
                          source="skimage.data + sklearn.datasets.load_sample_images"))


_BUILDERS: dict[str, Callable[[str], None]] = {
    "digits": _build_digits,
    "faces": _build_faces,
    "photos": lambda out: _build_photos(out, paired=False),
    "photos-paired": lambda out: _build_photos(out, paired=True),
}


def builtin_info(name: str, cache_dir: str | None = None) -> dict:
    """info.json of an embedded dataset (writing the dataset first if needed)."""
    info = read_info(builtin_dir(name, cache_dir))
    assert info is not None
    return info
