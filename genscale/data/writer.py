"""Writing samples into WebDataset shards: ``DIR/<split>/NNNNNN.tar`` plus ``DIR/info.json``.

Shared by the embedded datasets (builtin.py) and the shard-writer command (write_shards.py).
A sample handed to ``write_split`` is a dict with ``__key__`` and byte, str, int or dict fields
named by extension (``png``, ``cls``, ``json``, ``src.png`` ...); everything is encoded here so
that a tar member is always ``KEY.EXT`` with plain bytes (never a pickle).
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Iterable

import numpy as np
import webdataset as wds
from PIL import Image

from genscale.errors import UserError

SHARD_PATTERN = "%06d.tar"
INFO_FILE = "info.json"
SPLITS = ("train", "test")
FORMAT_VERSION = 1  # of the layout and info.json
# A fixed member mtime makes two writes of the same samples byte-identical.
_FIXED_MTIME = 946684800  # an int: a float mtime costs a PAX header per member


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 HW (grey) or HWC (1, 3 or 4 channels) array."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def check_key(key: str) -> str:
    """WebDataset splits member names at the first dot, so a key must hold none."""
    if not key or "." in key:
        raise ValueError(f"sample key {key!r} is empty or contains a dot")
    return key


def _field_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, (bool, np.bool_)):
        raise TypeError("booleans are not a shard field type")
    if isinstance(value, (int, np.integer)):
        return str(int(value)).encode()
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True).encode("utf-8")
    raise TypeError(f"cannot store a {type(value).__name__} in a shard")


def write_split(samples: Iterable[dict], split_dir: str, *, maxcount: int = 10000,
                maxsize: float = 1e9, progress: Any = None) -> int:
    """Write ``samples`` (in the given order) to ``split_dir/NNNNNN.tar``; return how many.

    ``progress`` is an optional tqdm-like object whose ``update(1)`` is called per sample.
    A split with no samples leaves no folder behind.
    """
    os.makedirs(split_dir, exist_ok=True)
    count = 0
    writer = wds.ShardWriter(os.path.join(split_dir, SHARD_PATTERN), maxcount=maxcount,
                             maxsize=maxsize, verbose=0, encoder=False, mtime=_FIXED_MTIME)
    try:
        for sample in samples:
            record = {"__key__": check_key(sample["__key__"])}
            for name, value in sample.items():
                if not name.startswith("__"):
                    record[name] = _field_bytes(value)
            writer.write(record)
            count += 1
            if progress is not None:
                progress.update(1)
    finally:
        writer.close()
    if count == 0:  # ShardWriter opens its first tar eagerly: drop the empty one
        for name in os.listdir(split_dir):
            os.remove(os.path.join(split_dir, name))
        os.rmdir(split_dir)
    return count


def write_info(dataset_dir: str, info: dict) -> None:
    """Write ``info.json`` (write-then-rename, so a reader never sees half a file)."""
    path = os.path.join(dataset_dir, INFO_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_info(dataset_dir: str) -> dict | None:
    """The folder's ``info.json`` as a dict, or None when there is none."""
    path = os.path.join(dataset_dir, INFO_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            info = json.load(f)
    except (OSError, ValueError) as exn:
        raise UserError(f"{path} is not readable JSON ({exn}).") from None
    if not isinstance(info, dict):
        raise UserError(f"{path} does not hold a JSON object.")
    return info


def split_indices(n: int, test_fraction: float, seed: int,
                  labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled (train, test) index arrays; stratified by ``labels`` when given.

    The test split gets round(test_fraction * n) samples (at least one when test_fraction > 0
    and n > 1), shared among classes in proportion to their sizes (largest remainders first),
    and no class gives away its last sample. Both halves come back shuffled: a shard is read
    front to back, so its order is the only shuffling a reader without a buffer gets.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"--test-fraction must be in [0, 1), got {test_fraction}.")
    rng = np.random.default_rng(seed)
    labels = np.zeros(n, np.int64) if labels is None else np.asarray(labels)
    groups = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    sizes = np.array([len(g) for g in groups], dtype=np.int64)
    total = int(round(test_fraction * n))
    if test_fraction > 0 and n > 1:
        total = max(total, 1)
    exact = test_fraction * sizes
    quota = np.minimum(np.floor(exact).astype(np.int64), np.maximum(sizes - 1, 0))
    for c in np.argsort(-(exact - quota), kind="stable"):  # hand out the remainder
        if quota.sum() >= total:
            break
        if quota[c] < sizes[c] - 1:
            quota[c] += 1
    test = [g[:k] for g, k in zip(groups, quota)]
    train = [g[k:] for g, k in zip(groups, quota)]
    train_idx = rng.permutation(np.concatenate(train)).astype(np.int64)
    test_idx = rng.permutation(np.concatenate(test)).astype(np.int64)
    return train_idx, test_idx
