"""Write WebDataset shards from an image folder, a class-per-folder tree, an .npz, a torchvision
dataset on disk, or a folder of side-by-side A|B pairs.

    python -m genscale.data.write_shards SRC OUT_DIR [--kind auto|folder|classes|npz|torchvision|side-by-side]
        [--maxcount N] [--maxsize BYTES] [--test-fraction F] [--seed S] [--dataset NAME] [--direction AtoB|BtoA]

Writes OUT_DIR/train/NNNNNN.tar, OUT_DIR/test/NNNNNN.tar (unless the test split is empty) and
OUT_DIR/info.json. Samples are shuffled before writing (a shard is read front to back, so its
order is all the shuffling a streaming reader starts from). The test split is drawn with
--test-fraction (stratified by label) unless the source fixes one (torchvision's train/test,
a folder's train/ and test/ or val/ sub-folders). Unreadable images are skipped and counted.
A class folder without images is skipped (with a note), so it is no class.

Transparent images (RGBA, grey with alpha, GIF/PNG palette transparency) are composited onto
white: PNG, JPEG and WebP files are stored as they are and the loader composites them when it
decodes them; other formats are flattened that way before they are stored as PNG.

A refused or interrupted write removes what it wrote, so the same command can simply be re-run.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from collections import Counter
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from genscale.data.sources import KINDS, Record, Source, read_source
from genscale.data.transforms import decode_image
from genscale.data.writer import FORMAT_VERSION, INFO_FILE, SPLITS, split_indices, write_info, write_split
from genscale.cli import ArgumentParser, run_main
from genscale.errors import UserError


def assign_splits(records: list[Record], test_fraction: float, seed: int) -> dict[str, list[Record]]:
    """Records per split, each list shuffled with ``seed``."""
    rng = np.random.default_rng(seed)
    if all(r.split is not None for r in records):
        out = {s: [r for r in records if r.split == s] for s in SPLITS}
        return {s: [rs[i] for i in rng.permutation(len(rs))] for s, rs in out.items()}
    labels = None
    if all(r.label is not None for r in records):
        labels = np.array([r.label for r in records])
    train, test = split_indices(len(records), test_fraction, seed, labels)
    return {"train": [records[i] for i in train], "test": [records[i] for i in test]}


class _Stats:
    """What info.json says about the images, gathered while they are written."""

    def __init__(self) -> None:
        self.modes: Counter = Counter()
        self.sizes: Counter = Counter()
        self.failed = 0
        self.first_error = ""

    def samples(self, records: list[Record], split: str) -> Iterator[dict]:
        for index, record in enumerate(records):
            try:
                fields = record.load()
                image = next(v for k, v in fields.items() if k.rsplit(".", 1)[-1] in ("png", "jpg", "webp")
                             and not k.startswith("src"))
                img = decode_image(image)
            except Exception as exn:  # an unreadable source image: skip it, say so at the end
                self.failed += 1
                # PIL names the in-memory buffer (<_io.BytesIO object at 0x...>), not the file
                reason = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exn))
                self.first_error = self.first_error or (f"{record.origin}: {reason}" if record.origin else reason)
                continue
            self.modes[img.mode] += 1
            self.sizes[min(img.size)] += 1
            sample = {"__key__": f"{split}{index:08d}", **fields}
            if record.label is not None:
                sample["cls"] = record.label
            yield sample


def write_shards(src: str, out_dir: str, kind: str = "auto", maxcount: int = 10000, maxsize: float = 1e9,
                 test_fraction: float = 0.1, seed: int = 0, dataset: str | None = None,
                 direction: str = "AtoB", progress: bool = True) -> dict:
    """Write the shards and info.json; return the info dict."""
    if maxcount < 1 or maxsize < 1:
        raise UserError("--maxcount and --maxsize must be positive.")
    if not 0.0 <= test_fraction < 1.0:
        raise UserError(f"--test-fraction must be in [0, 1), got {test_fraction}.")
    if os.path.exists(os.path.join(out_dir, INFO_FILE)):
        raise UserError(f"{out_dir} already holds shards; choose an empty folder.")
    if any(os.path.exists(os.path.join(out_dir, s)) for s in SPLITS):  # info.json is written last
        raise UserError(f"{out_dir} already holds shards of an unfinished write (no {INFO_FILE}); "
                        "remove it or choose an empty folder.")
    source = read_source(src, kind, dataset=dataset, direction=direction)
    splits = assign_splits(source.records, test_fraction, seed)
    created = not os.path.exists(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exn:
        raise UserError(f"cannot create {out_dir} ({exn.strerror}).") from None
    try:
        return _write(src, out_dir, source, splits, maxcount, maxsize, progress)
    except BaseException:  # a refusal, an error or Ctrl-C: else the re-run finds an "unfinished write"
        _remove_written(out_dir, created)
        raise


def _remove_written(out_dir: str, created: bool) -> None:
    # The split folders and info.json did not exist before (write_shards checks): all this write's.
    for split in SPLITS:
        shutil.rmtree(os.path.join(out_dir, split), ignore_errors=True)
    for name in (INFO_FILE, INFO_FILE + ".tmp"):
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    if created:
        try:
            os.rmdir(out_dir)
        except OSError:  # something else appeared in it meanwhile: leave it
            pass


def _write(src: str, out_dir: str, source: Source, splits: dict[str, list[Record]], maxcount: int, maxsize: float,
           progress: bool) -> dict:
    stats = _Stats()
    counts = {}
    with tqdm(total=len(source.records), desc=f"writing {os.path.basename(os.path.normpath(out_dir))}",
              unit="img", disable=not progress or None) as bar:
        for split in SPLITS:
            counts[split] = write_split(stats.samples(splits[split], split), os.path.join(out_dir, split),
                                        maxcount=maxcount, maxsize=maxsize, progress=bar)
            if counts["train"] == 0:  # refuse before writing a test split that would be removed
                if splits["train"]:
                    raise UserError(f"none of the {len(splits['train'])} training images of {src} could be "
                                    f"read (first error: {stats.first_error}).")
                raise UserError(f"the train split of {src} holds no images.")
    labelled = all(r.label is not None for r in source.records)
    num_classes = len(source.class_names) if labelled else 0
    info = {"name": os.path.basename(os.path.abspath(out_dir)), "channels": 3 if stats.modes.get("RGB") else 1,
            "image_size": stats.sizes.most_common(1)[0][0], "num_classes": num_classes,
            "class_names": source.class_names if labelled else [], "paired": source.paired,
            "counts": counts, "skipped": stats.failed, "format_version": FORMAT_VERSION,
            "source": f"{os.path.abspath(src)} ({source.kind})"}
    write_info(out_dir, info)
    if stats.failed:
        print(f"skipped {stats.failed} unreadable image(s), e.g.: {stats.first_error}", file=sys.stderr)
    return info


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and write the shards; a UserError propagates (see ``cli``)."""
    parser = ArgumentParser(prog="python -m genscale.data.write_shards", description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("src", help="image folder, class-per-folder tree, .npz file or torchvision root "
                        "(transparent images are composited onto white)")
    parser.add_argument("out_dir", help="where train/, test/ and info.json go")
    parser.add_argument("--kind", choices=KINDS, default="auto")
    parser.add_argument("--maxcount", type=int, default=10000, help="samples per shard at most")
    parser.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard at most")
    parser.add_argument("--test-fraction", type=float, default=0.1, help="share of samples for test")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and the shuffle")
    parser.add_argument("--dataset", help="torchvision class name (MNIST, CIFAR10, ...) for --kind torchvision")
    parser.add_argument("--direction", choices=("AtoB", "BtoA"), default="AtoB",
                        help="side-by-side: AtoB = left half is the source")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    info = write_shards(args.src, args.out_dir, args.kind, args.maxcount, args.maxsize, args.test_fraction,
                        args.seed, args.dataset, args.direction, progress=not args.quiet)
    counts = info["counts"]
    print(f"wrote {counts['train']} train and {counts['test']} test samples to {args.out_dir}")
    return 0


def cli() -> None:
    """Console-script entry point (``genscale-shards``): errors as one line, exit 2."""
    run_main(main)


if __name__ == "__main__":
    cli()
