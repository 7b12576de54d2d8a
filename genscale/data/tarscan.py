"""One pass over a shard's tar headers: is the archive whole, and which labels does it hold.

tarfile, and WebDataset which reads shards with it, stops at the first header it cannot parse
(or at the first zero block) without raising: a shard damaged in the middle reads as a shorter
one, and training silently sees fewer images. ``scan_shard`` walks the headers as tarfile does
and refuses the shard unless the walk ends at the end-of-archive zero blocks. It reads one
512-byte header per member and seeks over the data, except for the tiny ``.cls`` and ``.json``
members, whose labels it tallies so that every shard's classes are counted, not the first's.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

from genscale.data.transforms import IMAGE_EXTENSIONS, READ_EXTENSIONS, labels_of
from genscale.errors import UserError

BLOCK = 512
# JSON metadata larger than this is not read for a label (img2dataset's is a few hundred bytes).
MAX_LABEL_BYTES = 1 << 20
# Typeflags whose data follows the header (regular files), and those tarfile reads no data
# for (links, devices, folders, fifos). Any other (PAX, GNU long names, sparse files, unknown
# types) sends the whole shard to tarfile's own walk, which is slower but knows them all.
_DATA_TYPES = (b"0", b"\0", b"7")
_NO_DATA_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")
# The size and checksum fields. tarfile also rejects a header whose mode, ids, mtime or device
# numbers do not parse, but those are covered by the checksum: damage that keeps a header's sum
# is vanishingly rare, and parsing them all would make the walk twice as slow.
_SIZE, _CHECKSUM = slice(124, 136), slice(148, 156)
_META = re.compile(r"__[^/]*__($|/)")  # members WebDataset skips


@dataclass
class ShardLabels:
    """What a shard's samples (member groups holding an image) say about their labels."""

    samples: int = 0
    counts: Counter = field(default_factory=Counter)  # label -> samples with it
    unreadable: int = 0  # samples whose label entry the loader cannot read (treated as unlabelled)
    example: str = ""  # one such entry, for the warning

    @property
    def labelled(self) -> int:
        return sum(self.counts.values())

    def add(self, other: "ShardLabels") -> None:
        self.samples += other.samples
        self.counts.update(other.counts)
        self.unreadable += other.unreadable
        self.example = self.example or other.example


class _Unusual(Exception):
    """A header the quick walk leaves to tarfile."""


_SCANNED: dict[tuple, ShardLabels] = {}  # (path, size, mtime) -> labels: one walk per shard and process
_RECORD_VERSION = 1


def scan_shard(path: str) -> ShardLabels:
    """The shard's labels; UserError when its headers do not lead to the end of the archive.

    A walk costs ~0.25 s per 10,000 samples, at every launch and on every rank: ~30 s for an
    ImageNet-sized shard set. A whole shard's result is therefore kept in memory (a process
    resolves the same data several times) and on disk under the cache folder, keyed by the
    shard's path, size and modification time, so a resume or a second rank reads a small record
    instead; a shard written anew (another size or time) is walked again."""
    try:
        stat = os.stat(path)
    except OSError as exn:
        raise UserError(f"cannot read {path} ({exn}).") from None
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SCANNED:
        record = _record_path(key)
        found = _load_record(record)
        if found is None:
            found = _scan(path)
            _save_record(record, found)
        _SCANNED[key] = found
    found = ShardLabels()
    found.add(_SCANNED[key])  # a copy: callers add shards' labels together
    return found


def _record_path(key: tuple) -> str:
    from genscale.data.builtin import default_cache_dir

    digest = hashlib.sha256(repr(key).encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return os.path.join(default_cache_dir(), "shard-scans", digest[:2], digest + ".json")


def _load_record(path: str) -> ShardLabels | None:
    try:
        with open(path) as fh:
            data = json.load(fh)
        if data.get("version") != _RECORD_VERSION:
            return None
        return ShardLabels(samples=int(data["samples"]), counts=Counter({int(k): int(v) for k, v in data["counts"].items()}),
                           unreadable=int(data["unreadable"]), example=str(data["example"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # none yet, or unreadable: walk the shard


def _save_record(path: str, labels: ShardLabels) -> None:
    data = {"version": _RECORD_VERSION, "samples": labels.samples, "counts": dict(labels.counts),
            "unreadable": labels.unreadable, "example": labels.example}
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)  # atomic: ranks writing the same record race harmlessly
    except OSError:  # a read-only cache folder: the walk is simply not kept
        try:
            os.remove(tmp)
        except OSError:
            pass


def _scan(path: str) -> ShardLabels:
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            try:
                labels, end = _tally(fh, _quick_members(fh, size))
            except _Unusual:
                labels, end = _tally(fh, _tarfile_members(fh))
            whole = size - end >= 2 * BLOCK and _zeros_from(fh, end)
    except (OSError, tarfile.TarError) as exn:
        raise UserError(f"cannot read {path} ({exn}).") from None
    if not whole:
        n = labels.samples
        raise UserError(f"{path} is damaged: its tar headers break off at byte {min(end, size)} of {size}, where "
                        f"a reader stops without an error after {n} sample{'' if n == 1 else 's'}; copy it again "
                        "or write the shards anew.")
    return labels


class _Walk:
    """The regular-file members of a tar in order as (name, data offset, data size); afterwards
    ``end`` is the offset where tarfile stops: the first zero block, or the first header it rejects."""

    def __init__(self) -> None:
        self.end = 0


def _quick_members(fh: BinaryIO, size: int) -> tuple[_Walk, Iterator[tuple[str, int, int]]]:
    walk = _Walk()

    def members() -> Iterator[tuple[str, int, int]]:
        offset = 0
        while True:
            walk.end = offset
            fh.seek(offset)
            header = fh.read(BLOCK)
            if len(header) < BLOCK or not any(header):
                return
            try:
                data_size, checksum = _octal(header[_SIZE]), _octal(header[_CHECKSUM])
            except ValueError:
                if header[_SIZE.start] in (0o200, 0o377):
                    raise _Unusual from None  # a base-256 size (a member over 8 GiB)
                return  # tarfile: "invalid header", and it stops here
            if checksum != 256 + sum(header) - sum(header[_CHECKSUM]):  # the field counts as blanks
                raise _Unusual  # maybe the signed checksum old writers used; tarfile decides
            name = _text(header[0:100])
            kind = header[156:157]
            if kind not in _DATA_TYPES + _NO_DATA_TYPES or (kind == b"\0" and name.endswith("/")):
                raise _Unusual
            if header[345]:  # a ustar name prefix; tarfile applies it whatever the magic says
                name = _text(header[345:500]) + "/" + name
            if kind in _DATA_TYPES:  # WebDataset reads regular files only
                yield name, offset + BLOCK, data_size
                offset += -(-data_size // BLOCK) * BLOCK
            offset += BLOCK

    return walk, members()


def _tarfile_members(fh: BinaryIO) -> tuple[_Walk, Iterator[tuple[str, int, int]]]:
    walk = _Walk()

    def members() -> Iterator[tuple[str, int, int]]:
        fh.seek(0)
        tar = tarfile.open(fileobj=fh, mode="r:")
        for member in tar:
            if member.isreg():  # WebDataset reads regular files only
                yield member.name, member.offset_data, member.size
        walk.end = tar.offset

    return walk, members()


def _octal(field: bytes) -> int:
    # tarfile's nti for an octal field: up to the first NUL, blanks stripped, empty = 0
    end = field.find(b"\0")
    return int((field if end < 0 else field[:end]).decode("ascii").strip() or "0", 8)


def _text(field: bytes) -> str:
    end = field.find(b"\0")
    return (field if end < 0 else field[:end]).decode("utf-8", "surrogateescape")


def _tally(fh: BinaryIO, walked: tuple[_Walk, Iterator[tuple[str, int, int]]]) -> tuple[ShardLabels, int]:
    """Group members into samples as WebDataset does (consecutive members sharing the key before
    the first dot of the file name; a repeated extension starts a new sample) and count labels."""
    walk, members = walked
    labels = ShardLabels()
    key, fields = None, {}

    def close() -> None:
        if key is None or not any(e.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS for e in fields):
            return
        labels.samples += 1
        label, present = labels_of(fields.get("cls"), _json(fields.get("json")))
        if label is not None:
            labels.counts[label] += 1
        elif present:
            labels.unreadable += 1
            labels.example = labels.example or _shown(fields)

    for name, offset, size in members:
        if name.startswith("__") and _META.match(name):
            continue  # WebDataset's skip_meta
        start = name.rfind("/") + 1
        dot = name.find(".", start)
        if dot <= start or name[name.rfind(".") + 1:].lower() not in READ_EXTENSIONS:
            continue  # members the loader never reads (".x.png" has no key: WebDataset skips it)
        ext = name[dot + 1:].lower()
        if name[:dot] != key or ext in fields:
            close()
            key, fields = name[:dot], {}
        fields[ext] = b""
        if ext in ("cls", "json") and size <= MAX_LABEL_BYTES:
            fh.seek(offset)
            fields[ext] = fh.read(size)
    close()
    return labels, walk.end


def _json(data: bytes | None):
    if not data:
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None


def _shown(fields: dict) -> str:
    data = fields.get("cls") or fields.get("json") or b""
    text = data.decode("utf-8", "replace").strip()
    return text if len(text) <= 60 else text[:57] + "..."


def _zeros_from(fh: BinaryIO, offset: int) -> bool:
    fh.seek(offset)
    while chunk := fh.read(1 << 16):
        if any(chunk):
            return False
    return True
