"""Real images and their features: the reference side of FID/KID, cached on disk.

A reference is one split of a data set read exactly as training reads it (the same decoding
and resizing to the run's resolution and channel count), quantised to uint8 like a PNG, then
featurised through clean-fid (genscale.metrics.features). Features are cached per (data set,
split, feature weights, resolution, channels) under ``<cache>/fid_stats/`` (``<cache>`` =
``$GENSCALE_CACHE`` or ~/.cache/genscale), with the mean and covariance beside them.

Computing one is sharded: each rank reads its own part of the split (make_loader with
``resampled=False`` gives every sample to exactly one (rank, worker)), featurises it, and the
parts are gathered in one collective and put in a fixed order (by sample key), so the result
does not depend on the number of processes.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from genscale.errors import UserError
from genscale.metrics.features import FeatureExtractor, file_features, image_features, list_image_files
from genscale.metrics.sharded import any_rank, gather_objects, sharded_rows

CACHE_VERSION = 1
LOAD_BATCH = 256


@dataclass
class RealFeatures:
    """Features (float64, N x D) of real images, with what they are for printing."""

    feats: np.ndarray
    description: str  # e.g. "digits test" or a folder path

    @property
    def num(self) -> int:
        return len(self.feats)


def cache_root(cache_dir: str | None = None) -> Path:
    from genscale.data import default_cache_dir

    return Path(cache_dir or default_cache_dir())


def dataset_key(spec: str) -> str:
    """A file-name-safe name for a data spec: the embedded name, or folder name + path hash."""
    from genscale.data import BUILTIN_NAMES

    if spec in BUILTIN_NAMES:
        return spec
    path = os.path.abspath(spec)
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(path).name)[:40] or "data"
    return f"{stem}-{hashlib.sha1(path.encode()).hexdigest()[:10]}"


def stats_path(spec: str, split: str, extractor: FeatureExtractor, image_size: int, channels: int,
               cache_dir: str | None = None) -> Path:
    name = f"{dataset_key(spec)}-{split}-{extractor.tag}-{image_size}px-{channels}ch-v{CACHE_VERSION}.npz"
    return cache_root(cache_dir) / "fid_stats" / name


def _read_cache(path: Path, dim: int) -> np.ndarray | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            feats = np.asarray(npz["feats"], np.float64)
    except Exception:  # noqa: BLE001 -- missing, truncated or foreign files are recomputed
        return None
    return feats if feats.ndim == 2 and feats.shape[1] == dim and len(feats) > 1 else None


def _write_cache(path: Path, feats: np.ndarray, keys: list[str]) -> None:
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
    os.close(fd)
    try:
        np.savez(tmp, feats=feats, keys=np.asarray(keys, dtype=str), mu=feats.mean(0),
                 sigma=np.cov(feats, rowvar=False))
        os.replace(tmp, path)  # readers never see half a file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def iter_split(spec: str, split: str, image_size: int, channels: int, rank: int = 0, world_size: int = 1,
               cache_dir: str | None = None):
    """Batches (keys, uint8 N x H x W x C, labels) of this rank's part of a split, read once."""
    from genscale.data import make_loader, resolve_data
    from genscale.run_files import to_uint8

    shards = resolve_data(spec, split, cache_dir)
    if shards.paired:
        raise UserError(f"{spec} holds image pairs; FID/KID of image-to-image runs is not supported yet.")
    loader = make_loader(shards, image_size=image_size, channels=channels, batch_size=LOAD_BATCH,
                         batches_per_epoch=1, seed=0, epoch=0, rank=rank, world_size=world_size, num_workers=0,
                         resampled=False)
    for batch in loader:
        yield list(batch["key"]), to_uint8(batch["image"]), batch["label"].numpy()


def load_split(spec: str, split: str, image_size: int, channels: int, cache_dir: str | None = None,
               limit: int | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The whole split (or its first ``limit`` images) in key order, read by this process alone."""
    keys, images, labels = [], [], []
    for k, x, y in iter_split(spec, split, image_size, channels, cache_dir=cache_dir):
        keys += k
        images.append(x)
        labels.append(y)
    if not keys:
        raise UserError(f"the {split} split of {spec} holds no readable images.")
    images, labels = np.concatenate(images), np.concatenate(labels)
    order = sorted(range(len(keys)), key=lambda i: (keys[i], _tie(images[i])))[:limit]
    return [keys[i] for i in order], images[order], labels[order]


def _tie(image: np.ndarray) -> bytes:
    """What orders images with the same key: a digest of their pixels (same order on every rank)."""
    return hashlib.sha256(image.tobytes()).digest()


def split_features(spec: str, split: str, extractor: FeatureExtractor, image_size: int, channels: int,
                   accelerator=None, cache_dir: str | None = None, use_cache: bool = True) -> RealFeatures:
    """Features of every image of a split, from the cache or computed across ranks and cached.

    Every rank must call this (it may run collectives). The main process writes the cache.
    """
    path = stats_path(spec, split, extractor, image_size, channels, cache_dir)
    feats = _read_cache(path, extractor.dim) if use_cache else None
    # Ranks must agree on cached-or-not: otherwise one would wait alone in the gather below.
    if any_rank(feats is None, accelerator):
        rank, world = (0, 1) if accelerator is None else (accelerator.process_index, accelerator.num_processes)
        part: list[tuple[str, bytes, np.ndarray]] = []
        error: BaseException | None = None
        try:
            for keys, images, _ in iter_split(spec, split, image_size, channels, rank, world, cache_dir):
                f = image_features(images, extractor)
                # a digest breaks ties between equal keys: gathering the images themselves sent every
                # image to every rank (~10 GB per GPU for 50k images of 256 px)
                part += [(k, _tie(images[i]), f[i]) for i, k in enumerate(keys)]
        except Exception as err:  # noqa: BLE001 -- re-raised once every rank knows
            error = err
        if any_rank(error is not None, accelerator):
            if error is not None:
                raise error
            raise UserError("reading the reference images failed on another process.", exit_code=1)
        rows = sorted(gather_objects(part, accelerator), key=lambda r: (r[0], r[1]))
        if len(rows) < 2:
            raise UserError(f"the {split} split of {spec} holds fewer than 2 readable images.")
        feats = np.stack([r[2] for r in rows])
        if accelerator is None or accelerator.is_main_process:
            _write_cache(path, feats, [r[0] for r in rows])
    return RealFeatures(feats, f"{spec} {split}")


def folder_features(folder: str, extractor: FeatureExtractor, accelerator=None, chunk_size: int = 256,
                    limit: int | None = None) -> RealFeatures:
    """Features of the image files of a folder (clean-fid's loader), sharded by file index."""
    files = list_image_files(folder)[:limit]

    def compute(k: int, start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(file_features(files[start:stop], extractor))

    feats = sharded_rows(len(files), chunk_size, extractor.dim, compute, accelerator)
    return RealFeatures(feats, str(folder))


def is_image_folder(spec: str) -> bool:
    """A folder holding image files and no .tar shards (a data spec otherwise)."""
    path = Path(spec)
    if not path.is_dir() or any(path.rglob("*.tar")):
        return False
    try:
        list_image_files(path)
    except UserError:
        return False
    return True
