"""Evaluate a run or a set of samples: FID/KID, judge accuracy and coverage, PSNR, L1, ELBO.

FID and KID go through clean-fid; the judge scores class-conditional samples (accuracy) and
unconditional ones (classes); psnr fills holes of held-out images (inpainting runs); translation
scores an image-to-image run against copying its input; nelbo is a VAE's held-out bound.

    python genscale/evaluate.py --run runs/ddpm --metric fid --num 1000
    python genscale/evaluate.py --run runs/vae --metric classes --num 200
    python genscale/evaluate.py --run runs/vae --metric nelbo
    python genscale/evaluate.py --run runs/inpaint --metric psnr --mask centre
    python genscale/evaluate.py --run runs/pix2pix --metric translation
    accelerate launch genscale/evaluate.py --run runs/ddpm --metric kid --features inception
    python genscale/evaluate.py --samples samples.npz --metric accuracy
    python genscale/evaluate.py --samples FOLDER --reference FOLDER --metric fid

Under ``accelerate launch`` sample generation and feature extraction are split across the
processes and gathered; the result equals the one-process result for the same seed (samples
are a function of (seed, sample index), see genscale.metrics.sharded). The reference is a
split of a data set (default: the run's own data, test split) or a folder of images. Every
score is printed with its number of samples and its floor: real images of the other split
against the reference, with the same features and number of images. ``--samples`` takes an
ADM-style .npz (``arr_0`` uint8 N x H x W x C, optional ``arr_1`` int labels) or a folder.
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
    from genscale.cli import quiet_interrupt_while_starting

    quiet_interrupt_while_starting()

import argparse  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402

from genscale.cli import ArgumentParser, output_file  # noqa: E402
from genscale.diffusion.samplers import SAMPLERS  # noqa: E402
from genscale.errors import UserError  # noqa: E402
from genscale.metrics.evaluation import DEFAULT_CHUNK, METRICS  # noqa: E402
from genscale.metrics.features import FEATURES  # noqa: E402

DEFAULT_NUM = 1000


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


def make_accelerator():
    """One process group for the launch: on a machine without CUDA, N gloo processes."""
    from genscale.launch import new_accelerator

    return new_accelerator(share_cores=False)  # one process alone honours OMP_NUM_THREADS, as before


def _folder_shape(folder: str) -> tuple[int, int, int]:
    """(H, W, C) of the first image of a folder, C as the data pipeline would read it."""
    from genscale.data.transforms import decode_image, image_channels
    from genscale.metrics.features import list_image_files

    first = list_image_files(folder)[0]
    try:
        img = decode_image(Path(first).read_bytes())  # a grey palette PNG is grey, as in training
    except OSError as err:  # PIL's UnidentifiedImageError is one
        raise UserError(f"{first} cannot be read as an image ({type(err).__name__}).") from None
    return img.height, img.width, image_channels(img)


def _run_record(run: str) -> dict:
    path = Path(run) / "config.json"
    if not path.is_file():
        raise UserError(f"{run} is not a genscale run (no config.json).")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict):
        raise UserError(f"{path} is damaged and cannot be read.")
    return record


def evaluate(args: argparse.Namespace, acc) -> dict:
    """Compute ``args.metric``; every rank returns the same dict."""
    from genscale.metrics.evaluation import (EvalSetup, Evaluator, array_images, family_images, folder_images,
                                             needs_input_images)

    family = labels = images = None
    record = {}
    if args.run:
        if not Path(args.run).is_dir():
            raise UserError(f"The run folder {args.run} does not exist.")
        from genscale.sample import check_sampling_options, load_family, parse_labels

        record = _run_record(args.run)
        family, info, step = load_family(args.run, acc.device)
        check_sampling_options(family, args.sampling_steps, cfg_scale=args.cfg_scale, sampler=args.sampler)
        shape = (info.image_size, info.image_size, info.channels)
        # The family, not the data, says whether samples have labels (as in sample.generate): a
        # vae or gan on the labelled digits draws without them, and "accuracy" would score chance.
        classes = int(getattr(family, "num_classes", info.num_classes) or 0)  # Family declares it; stubs may not
        labels = parse_labels(None if classes == 0 and args.labels == "all" else args.labels, args.num, classes)
        num = args.num
    elif Path(args.samples).is_dir():
        shape, num = _folder_shape(args.samples), None
    else:
        images, labels = load_samples(args.samples)
        shape, num = images.shape[1:], min(args.num, len(images)) if args.num else len(images)
        images, labels = images[:num], None if labels is None else labels[:num]
    train = record.get("train", {})
    if not (args.reference or train.get("data") or args.dataset) and shape[2] != 1:
        # --samples alone is compared with the embedded digits (the result says so): grey images only
        raise UserError(f"--samples holds {shape[2]}-channel images, and without --reference they would be "
                        "compared with the embedded digits (greyscale); give --reference (a folder or a data set).")
    reference_flag = "--reference" if args.reference else "the run's --data" if train.get("data") else "--dataset"
    setup = EvalSetup(metric=args.metric, features=args.features,
                      reference=args.reference or train.get("data") or args.dataset or "digits",
                      reference_flag=reference_flag,
                      split=args.reference_split, image_size=shape[0], channels=shape[2],
                      judge_dataset=args.dataset, seed=args.seed, chunk_size=args.chunk_size,
                      cache_dir=train.get("cache_dir") or None, use_cache=not args.recompute_reference)
    ev = Evaluator(setup, acc)
    desc = f"{args.metric} samples"
    opts = dict(cfg_scale=args.cfg_scale, sampler=args.sampler, sampling_steps=args.sampling_steps)
    if args.metric in ("fid", "kid"):
        if family is not None and needs_input_images(family, info):
            raise UserError(f"--metric {args.metric} needs a run that generates from noise; {family.name} "
                            "transforms input images (use --metric psnr for inpainting runs).")
        if family is not None:
            feats = ev.features_of(family_images(family, labels, args.seed, opts), num, desc)
        elif images is not None:
            feats = ev.features_of(array_images(images), num, desc)
        else:
            from genscale.metrics.reference import folder_features

            feats = folder_features(args.samples, ev.extractor, acc, args.chunk_size, limit=args.num).feats
        result = ev.distance(feats, noise_shape=tuple(shape))
    elif args.metric == "accuracy":
        if family is not None and labels is None:
            raise UserError(f"The accuracy metric needs a class-conditional run; {args.run} draws samples "
                            "without labels.")
        if images is None and family is None:
            raise UserError("The accuracy metric needs the intended class of every sample: give an .npz with "
                            "its labels (arr_1), not a folder of images.")
        if labels is None or (np.asarray(labels) < 0).any():
            raise UserError("The accuracy metric needs the intended class of every sample (arr_1).")
        source = family_images(family, labels, args.seed, opts) if family is not None else array_images(images)
        result = ev.accuracy(source, np.asarray(labels), desc)
    elif args.metric == "classes":
        if family is not None and needs_input_images(family, info):
            raise UserError(f"--metric classes needs a run that generates from noise; {family.name} "
                            "transforms input images.")
        if family is not None:
            source = family_images(family, labels, args.seed, opts)
        elif images is not None:
            source = array_images(images)
        else:
            from genscale.metrics.features import list_image_files

            files = list_image_files(args.samples)[:args.num]  # --num: the first N (None: all)
            source, num = folder_images(files), len(files)
        result = ev.classes(source, num, desc)
    elif args.metric == "translation":
        if family is None or not hasattr(family, "translate"):
            raise UserError("--metric translation needs --run with an image-to-image run (pix2pix).")
        result = ev.translation(family, args.num if args.num_given else None, desc)
    elif args.metric == "nelbo":
        if family is None or not hasattr(family, "test_elbo"):
            raise UserError("--metric nelbo needs --run with a vae run (one that has an evidence lower bound).")
        result = dict(family.test_elbo(args.reference_split, args.seed))
    else:
        if family is None:
            raise UserError("--metric psnr needs --run (an inpainting run), not --samples.")
        mask = args.mask or record.get("options", {}).get("mask") or "mixed"
        result = ev.psnr(family, num, mask, desc)
    result = {"metric": args.metric, "source": args.samples or args.run, **result}
    if args.run:
        result["step"] = step
        result["generation"] = {k: getattr(args, k) for k in
                                ("num", "labels", "seed", "cfg_scale", "sampler", "sampling_steps", "chunk_size")}
    result["world_size"] = acc.num_processes
    return result


def _g(value: float) -> str:
    return f"{value:.6g}" if abs(value) < 0.01 else f"{value:.4f}"


def describe(result: dict) -> list[str]:
    metric = result["metric"]
    if metric in ("fid", "kid"):
        name = metric.upper()
        lines = [f"{name} {_g(result[metric])} ({result['features']} features; {result['num']} samples vs "
                 f"{result['num_reference']} real images of {result['reference']})"]
        if f"{metric}_floor" in result:
            lines.append(f"floor, real vs real: {name} {_g(result[metric + '_floor'])} ({result['floor_num']} real "
                         f"images of {result['floor_source']} vs the same {result['num_reference']})")
        else:
            lines.append("floor: none (a folder reference has no second split to compare with)")
        if f"{metric}_noise" in result:
            lines.append(f"Gaussian noise: {name} {_g(result[metric + '_noise'])} ({result['num']} images)")
        return lines
    if metric == "accuracy":
        hist = " ".join(f"{c}:{n}" for c, n in enumerate(result["histogram"]))
        per_class = " ".join(f"{c}:{a:.2f}" for c, a in result["per_class"].items())
        return [
            f"sample accuracy: {result['accuracy']:.4f} ({result['num']} samples)",
            f"floor, real images: {result['accuracy_floor']:.4f} ({result['floor_num']} real images of "
            f"{result['floor_source']}; judge test accuracy on {result['judge_dataset']}: "
            f"{result['judge_test_accuracy']:.4f})",
            f"predicted-class histogram: {hist}",
            f"per-class accuracy: {per_class}",
        ]
    if metric == "classes":
        hist = " ".join(f"{c}:{n}" for c, n in enumerate(result["histogram"]))
        real = " ".join(f"{c}:{n}" for c, n in enumerate(result["floor_histogram"]))
        return [
            f"classes present: {result['classes_present']} of {result['num_classes']} ({result['num']} samples; "
            f"rarest class {100 * result['rarest_share']:.1f}%)",
            f"judge-predicted histogram: {hist}",
            f"real images ({result['floor_num']} of {result['floor_source']}): {real}",
        ]
    if metric == "translation":
        return [
            f"translation: L1 {result['l1']:.4f}, PSNR {result['psnr']:.3f} dB ({result['num']} held-out pairs of "
            f"{result['reference']})",
            f"baseline, copying the input: L1 {result['l1_copy']:.4f}, PSNR {result['psnr_copy']:.3f} dB",
        ]
    if metric == "nelbo":
        return [
            f"negative ELBO: {result['nelbo_nats']:.3f} nats per image, {result['bits_per_dim']:.4f} bits/dim "
            f"({result['num']} images of the {result['split']} split; reconstruction {result['rec_nats']:.3f} "
            f"+ KL {result['kl_nats']:.3f} nats, {result['elbo_samples']} z samples per image)",
        ]
    return [
        f"hole PSNR: {result['psnr']:.3f} dB ({result['num']} images of {result['reference']}, "
        f"{result['mask']} masks, {100 * result['hole_fraction']:.1f}% holes)",
        f"baseline, biharmonic inpainting on the same images and masks: {result['psnr_biharmonic']:.3f} dB",
        f"known pixels changed by the model: {result['known_changed']} of {result['known_values']} values",
    ]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="evaluate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--metric", choices=METRICS, default="fid")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--samples", help="an .npz (arr_0 uint8 N x H x W x C, arr_1 int labels) or a folder")
    source.add_argument("--run", help="a run folder to draw fresh samples from")
    parser.add_argument("--num", type=int, default=None,
                        help=f"samples to draw (--run: default {DEFAULT_NUM}; psnr: test images to inpaint)")
    parser.add_argument("--reference", default=None,
                        help="real images: a data spec (default: the run's data, or --dataset) or an image folder")
    parser.add_argument("--reference-split", default="test", choices=["train", "test"])
    parser.add_argument("--features", choices=FEATURES, default="judge",
                        help="judge (offline default) or inception (clean-fid's InceptionV3)")
    parser.add_argument("--labels", default=None, help="class labels to draw (--run only; default 0..K-1 in turn)")
    parser.add_argument("--seed", type=int, default=0, help="sampling, mask and KID-subset seed")
    parser.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (--run only)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help="diffusion runs: ddim, ddpm or dpm++2m")
    parser.add_argument("--sampling-steps", type=int, default=None, help="sampler steps (--run only)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK,
                        help="samples per seeded chunk (part of what the samples are a function of)")
    parser.add_argument("--mask", default=None, help="psnr: mask kind (box, stroke, pixel, mixed, centre); default the run's")
    parser.add_argument("--dataset", default=None, help="the data set whose judge to use (default: the reference's)")
    parser.add_argument("--recompute-reference", action="store_true", help="ignore cached reference features")
    parser.add_argument("--min-accuracy", type=float, default=None, help="exit 1 if the accuracy is below this")
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = parser.parse_args(argv)
    if args.num is not None and args.num <= 0:
        parser.error("--num must be positive")
    args.num_given = args.num is not None
    if args.run and args.num is None:
        args.num = DEFAULT_NUM
    if args.chunk_size <= 0:
        parser.error("--chunk-size must be positive")
    if not 0 <= args.seed < 2**63:  # as sample.py: the seed feeds 64-bit generators
        parser.error(f"--seed must be between 0 and 2**63 - 1, got {args.seed}")
    if args.min_accuracy is not None and args.metric != "accuracy":
        parser.error("--min-accuracy applies to --metric accuracy only")
    if args.sampling_steps is not None and args.sampling_steps <= 0:
        parser.error("--sampling-steps must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.json is not None:  # before the evaluation, which can take hours, not after it
            output_file(args.json, "--json")
        acc = make_accelerator()
        result = evaluate(args, acc)
        if acc.is_main_process:
            for line in describe(result):
                print(line)
            if args.json is not None:
                try:
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
    from genscale.cli import run_main  # noqa: E402 - Ctrl-C: "interrupted" and exit 130, no traceback

    run_main(main, memory_hint="use a smaller --chunk-size")
