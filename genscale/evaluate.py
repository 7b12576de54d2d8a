"""Measure samples, read from an .npz or freshly drawn from a run: judge accuracy, later FID/KID/PSNR.

    python genscale/evaluate.py --metric accuracy --samples samples.npz
    python genscale/evaluate.py --metric accuracy --run runs/ddpm --num 200 --json out.json

Samples follow the ADM convention: ``arr_0`` uint8 N x H x W x C, ``arr_1`` int labels.
``accuracy`` is GAN-test accuracy: the share of class-conditional samples that a judge
classifier, trained on the real training split, labels as their intended class. Metrics are
entries of ``METRICS``; each takes the samples and returns a JSON-able dict.
"""
from __future__ import annotations

import sys
from pathlib import Path

if not __package__:
    # Run as a script, Python puts genscale/ itself first on sys.path: `import genscale` would
    # fail and genscale/data, genscale/models ... would shadow top-level packages. Put the
    # repository root there instead.
    _PACKAGE_DIR = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _PACKAGE_DIR]
    sys.path.insert(0, str(_PACKAGE_DIR.parent))

import argparse  # noqa: E402
import json  # noqa: E402
from typing import Callable, NamedTuple  # noqa: E402

import numpy as np  # noqa: E402

from genscale.errors import UserError  # noqa: E402


def check_samples(images: np.ndarray, labels: np.ndarray | None, source: str) -> None:
    """Raise UserError unless images are uint8 N x H x W x C (C = 1 or 3) with N int labels."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise UserError(
            f"The images in {source} must be uint8 N x H x W x C with C = 1 or 3, "
            f"got {images.dtype} of shape {images.shape}."
        )
    if len(images) == 0:
        raise UserError(f"{source} holds no images.")
    if labels is not None and (
        labels.ndim != 1 or len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer)
    ):
        raise UserError(
            f"The labels in {source} must be {len(images)} integers (one per image), "
            f"got {labels.dtype} of shape {labels.shape}."
        )


def load_samples(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 NHWC, labels or None) from an ADM-style .npz (arr_0, optional arr_1)."""
    if not Path(path).is_file():
        raise UserError(f"The samples file {path} does not exist.")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 -- numpy raises many types on a non-npz file
        raise UserError(f"{path} is not a readable .npz file ({type(err).__name__}).") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise UserError(f"{path} is a single array, not an .npz with arr_0 (images) and arr_1 (labels).")
    with npz:
        if "arr_0" not in npz.files:
            raise UserError(f"{path} has no arr_0 (the images); it holds {', '.join(npz.files) or 'nothing'}.")
        try:
            images = npz["arr_0"]
            labels = npz["arr_1"] if "arr_1" in npz.files else None
        except Exception as err:  # noqa: BLE001 -- object arrays, truncated members
            raise UserError(f"{path} holds an array that cannot be read ({type(err).__name__}).") from None
    check_samples(images, labels, path)
    return images, labels


def generate_samples(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw ``args.num`` samples from the run in ``args.run`` through genscale.sample."""
    if not Path(args.run).is_dir():
        raise UserError(f"The run folder {args.run} does not exist.")
    from genscale.sample import generate  # lazy: sampling pulls in the whole model stack

    images, labels = generate(
        args.run,
        args.num,
        labels=args.labels,
        seed=args.seed,
        cfg_scale=args.cfg_scale,
        sampler=args.sampler,
        sampling_steps=args.sampling_steps,
    )
    images, labels = np.asarray(images), None if labels is None else np.asarray(labels)
    check_samples(images, labels, f"the samples from {args.run}")
    return images, labels


def accuracy_metric(images: np.ndarray, labels: np.ndarray | None, args: argparse.Namespace) -> dict:
    """Judge accuracy of class-conditional samples, with the judge's own test accuracy."""
    if labels is None or (labels < 0).any():
        raise UserError("The accuracy metric needs the intended class of every sample (arr_1).")
    from genscale.metrics.judge import judge_accuracy, load_or_train_judge

    judge = load_or_train_judge(args.dataset)
    result = judge_accuracy(judge, images, labels)
    return {"judge_dataset": args.dataset, "judge_test_accuracy": judge.test_accuracy, **result}


def describe_accuracy(result: dict) -> list[str]:
    hist = " ".join(f"{c}:{n}" for c, n in enumerate(result["histogram"]))
    per_class = " ".join(f"{c}:{a:.2f}" for c, a in result["per_class"].items())
    return [
        f"judge test accuracy (held-out real {result['judge_dataset']}): {result['judge_test_accuracy']:.4f}",
        f"sample accuracy: {result['accuracy']:.4f} ({result['num']} samples)",
        f"predicted-class histogram: {hist}",
        f"per-class accuracy: {per_class}",
    ]


class Metric(NamedTuple):
    compute: Callable[[np.ndarray, np.ndarray | None, argparse.Namespace], dict]
    describe: Callable[[dict], list[str]]


# name -> how to compute it and how to print it; fid, kid and psnr join here.
METRICS: dict[str, Metric] = {"accuracy": Metric(accuracy_metric, describe_accuracy)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--metric", choices=sorted(METRICS), default="accuracy")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--samples", help="an .npz: arr_0 uint8 N x H x W x C, arr_1 int labels")
    source.add_argument("--run", help="a run folder to draw fresh samples from")
    parser.add_argument("--num", type=int, default=200, help="samples to draw (--run only)")
    parser.add_argument("--labels", default="all", help="class labels to draw (--run only); all = 0..9 in turn")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (--run only)")
    parser.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (--run only)")
    parser.add_argument("--sampler", default=None, help="sampler name, e.g. ddpm or ddim (--run only)")
    parser.add_argument("--sampling-steps", type=int, default=None, help="sampler steps (--run only)")
    parser.add_argument("--dataset", default="digits", help="the real data set the judge is trained on")
    parser.add_argument("--min-accuracy", type=float, default=None, help="exit 1 if the accuracy is below this")
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    if args.num <= 0:
        parser.error("--num must be positive")
    if args.min_accuracy is not None and args.metric != "accuracy":
        parser.error("--min-accuracy applies to --metric accuracy only")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        images, labels = load_samples(args.samples) if args.samples else generate_samples(args)
        metric = METRICS[args.metric]
        result = {"metric": args.metric, "source": args.samples or args.run, **metric.compute(images, labels, args)}
        if args.run:
            result["generation"] = {
                k: getattr(args, k) for k in ("num", "labels", "seed", "cfg_scale", "sampler", "sampling_steps")
            }
        for line in metric.describe(result):
            print(line)
        if args.json:
            try:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
            except OSError as err:
                raise UserError(f"Cannot write {args.json}: {err.strerror}.") from None
    except UserError as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        return err.exit_code
    if args.min_accuracy is not None and result["accuracy"] < args.min_accuracy:
        print(f"accuracy {result['accuracy']:.4f} is below the required {args.min_accuracy}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
