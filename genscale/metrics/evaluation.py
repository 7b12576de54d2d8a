"""One evaluation (a metric, a feature space, a reference split), shared by evaluate.py and the
evaluation during training.

Samples are drawn chunk by chunk across ranks (genscale.metrics.sharded): chunk k of a run is
``family.sample(n_k, labels_k, generator=chunk_generator(seed, k))`` with labels cycling
through the classes by sample index, quantised to uint8 like a PNG and featurised on the rank
that drew it; only features (or per-sample numbers) are gathered. Every report carries its
floor: FID/KID of real images of the other split against the reference, with the same number
of images and features; accuracy of the judge on the real reference images; for PSNR the
biharmonic baseline on the same images and masks; for the class histogram of unconditional
samples, the histogram of the real images. Every rank gets the same result dict.
"""
from __future__ import annotations

import inspect
import math
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np
import torch

from genscale.errors import UserError
from genscale.metrics import fid as distances
from genscale.metrics.features import FeatureExtractor, build_extractor, image_features
from genscale.metrics.reference import (RealFeatures, folder_features, is_image_folder, load_split,
                                        split_features)
from genscale.metrics.sharded import NOISE, SAMPLES, any_rank, chunk_generator, sharded_rows

METRICS = ("fid", "kid", "accuracy", "classes", "psnr", "translation", "nelbo")
DISTANCES = ("fid", "kid")
DEFAULT_CHUNK = 100
T = TypeVar("T")

# (chunk k, start, stop) -> uint8 (stop - start) x H x W x C
ImagesFn = Callable[[int, int, int], np.ndarray]


def intended_labels(num: int, num_classes: int) -> torch.Tensor | None:
    """Sample i asks for class i mod K (balanced classes, whatever the number of processes)."""
    return torch.arange(num) % num_classes if num_classes else None


def family_images(family, labels: torch.Tensor | None, seed: int, options: dict | None = None) -> ImagesFn:
    """Chunks of samples of a family, each drawn from its own generator seeded by (seed, k)."""
    from genscale.run_files import to_uint8

    opts = {k: v for k, v in (options or {}).items() if v is not None}

    def draw(k: int, start: int, stop: int) -> np.ndarray:
        lab = None if labels is None else labels[start:stop].to(family.device)
        return to_uint8(family.sample(stop - start, labels=lab, generator=chunk_generator(seed, k, SAMPLES), **opts))

    return draw


def needs_input_images(family, info) -> bool:
    """True for families (instances or classes) whose samples transform given images (pix2pix's
    ``source``, inpainting families' ``image``) rather than come from noise; a family that does
    both (the transformer generates and inpaints) can be scored by FID."""
    params = inspect.signature(family.sample).parameters
    return bool(info.paired) or "image" in params or "source" in params


def noise_images(height: int, width: int, channels: int, seed: int) -> ImagesFn:
    """Standard Gaussian noise clamped to [-1, 1] (a diffusion model's starting point)."""
    from genscale.run_files import to_uint8

    def draw(k: int, start: int, stop: int) -> np.ndarray:
        gen = chunk_generator(seed, k, NOISE)
        return to_uint8(torch.randn(stop - start, channels, height, width, generator=gen).clamp(-1, 1))

    return draw


def array_images(images: np.ndarray) -> ImagesFn:
    return lambda k, start, stop: images[start:stop]


def folder_images(files: list[str]) -> ImagesFn:
    """Chunks of image files decoded as the data pipeline reads them (grey "L" or "RGB",
    transparency onto white) into uint8 N x H x W x C; the files of one chunk must share one size.
    (FID and KID of a folder read files through clean-fid's own loader instead, as clean-fid
    scores them.)"""
    from genscale.data.transforms import decode_image, image_channels

    def read(k: int, start: int, stop: int) -> np.ndarray:
        arrays = []
        for name in files[start:stop]:
            try:
                img = decode_image(Path(name).read_bytes())
            except OSError as err:  # PIL's UnidentifiedImageError is one
                raise UserError(f"{name} cannot be read as an image ({type(err).__name__}).") from None
            arr = np.asarray(img, np.uint8).reshape(img.height, img.width, image_channels(img))
            if arrays and arr.shape != arrays[0].shape:
                raise UserError(f"{name} is {arr.shape[1]} x {arr.shape[0]} x {arr.shape[2]}, unlike "
                                f"{files[start]} ({arrays[0].shape[1]} x {arrays[0].shape[0]} x "
                                f"{arrays[0].shape[2]}): the images of a folder must share one size.")
            arrays.append(arr)
        return np.stack(arrays)

    return read


@dataclass
class EvalSetup:
    metric: str = "fid"
    features: str = "judge"  # judge | inception
    reference: str = "digits"  # a data spec (genscale.data.resolve_data) or a folder of image files
    reference_flag: str = "--reference"  # where the reference came from, for error messages
    split: str = "test"
    image_size: int = 16  # resolution (and channels) the reference split is read at
    channels: int = 1
    judge_dataset: str | None = None  # default: the reference data set's name
    seed: int = 0
    chunk_size: int = DEFAULT_CHUNK
    cache_dir: str | None = None
    use_cache: bool = True

    def check(self) -> None:
        if self.metric not in METRICS:
            raise UserError(f"--metric must be one of {', '.join(METRICS)}, got {self.metric!r}.")
        if self.split not in ("train", "test"):
            raise UserError(f"the reference split must be train or test, got {self.split!r}.")
        if self.chunk_size < 1:
            raise UserError(f"the chunk size must be positive, got {self.chunk_size}.")


class Evaluator:
    """Builds the feature extractor and the reference once; every rank must make the same calls."""

    def __init__(self, setup: EvalSetup, accelerator=None):
        setup.check()
        self.setup = setup
        self.acc = accelerator
        self.device = accelerator.device if accelerator is not None else torch.device("cpu")
        self.folder_reference = is_image_folder(setup.reference)
        self._extractor: FeatureExtractor | None = None
        self._reference: RealFeatures | None = None
        self._floor: RealFeatures | None = None
        self._floor_done = False

    # ---- what is built once ----------------------------------------------------------
    def _main_first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the main process first (it trains the judge, writes the data cache), then
        on the others, which find the result on disk. A failure anywhere raises on every rank
        instead of leaving the others waiting in a collective."""
        if self.acc is None or self.acc.num_processes == 1:
            return fn()
        result, error = None, None
        for turn in (True, False):
            if self.acc.is_main_process == turn:
                try:
                    result = fn()
                except Exception as err:  # noqa: BLE001 -- re-raised below on every rank
                    error = err
            if any_rank(error is not None, self.acc):
                if error is not None:
                    raise error
                raise UserError("the evaluation failed on another process (its error is printed above).",
                                exit_code=1)
        return result

    def judge_dataset(self) -> str:
        if self.setup.judge_dataset:
            return self.setup.judge_dataset
        if self.folder_reference:
            return "digits"
        from genscale.data import resolve_data

        s = self.setup
        return self._main_first(lambda: resolve_data(s.reference, s.split, s.cache_dir, s.reference_flag).name)

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            dataset = self.judge_dataset() if self.setup.features == "judge" else ""
            self._extractor = self._main_first(lambda: build_extractor(self.setup.features, dataset, self.device))
        return self._extractor

    def _split(self, split: str) -> RealFeatures:
        from genscale.data import resolve_data

        s = self.setup
        # writes the embedded shards once
        self._main_first(lambda: resolve_data(s.reference, split, s.cache_dir, s.reference_flag))
        return split_features(s.reference, split, self.extractor, s.image_size, s.channels, self.acc,
                              s.cache_dir, s.use_cache)

    def reference(self) -> RealFeatures:
        if self._reference is None:
            if self.folder_reference:
                self._reference = folder_features(self.setup.reference, self.extractor, self.acc)
            else:
                self._reference = self._split(self.setup.split)
        return self._reference

    def floor_source(self) -> RealFeatures | None:
        """Real images of the other split (None for a folder reference, which has no splits)."""
        if not self._floor_done:
            if not self.folder_reference:
                self._floor = self._split("train" if self.setup.split == "test" else "test")
            self._floor_done = True
        return self._floor

    # ---- metrics ------------------------------------------------------------------------
    def features_of(self, images: ImagesFn, num: int, desc: str = "") -> np.ndarray:
        ext = self.extractor

        def rows(k: int, start: int, stop: int) -> torch.Tensor:
            return torch.from_numpy(image_features(images(k, start, stop), ext))

        return sharded_rows(num, self.setup.chunk_size, ext.dim, rows, self.acc, desc)

    def distance(self, feats: np.ndarray, noise_shape: tuple[int, int, int] | None = None) -> dict:
        """FID or KID of sample features against the reference, with the real-vs-real floor and,
        given (H, W, C), Gaussian noise of that shape, all with the same number of images."""
        metric, seed = self.setup.metric, self.setup.seed
        ref = self.reference()
        n = len(feats)
        out = {metric: distances.distance(metric, feats, ref.feats, seed), "num": n, "num_reference": ref.num,
               "reference": ref.description, "features": self.setup.features}
        floor = self.floor_source()
        if floor is not None:
            m = min(n, floor.num)
            pick = np.sort(np.random.default_rng(seed).choice(floor.num, m, replace=False))
            out[f"{metric}_floor"] = distances.distance(metric, floor.feats[pick], ref.feats, seed)
            out["floor_num"] = m
            out["floor_source"] = floor.description
        if noise_shape is not None:
            noise = self.features_of(noise_images(*noise_shape, seed), n)
            out[f"{metric}_noise"] = distances.distance(metric, noise, ref.feats, seed)
        return out

    def accuracy(self, images: ImagesFn, labels: np.ndarray, desc: str = "") -> dict:
        """Judge accuracy of samples meant to show ``labels``, beside the judge's accuracy on the
        real reference images read at the same resolution."""
        from genscale.metrics.judge import judge_accuracy, load_or_train_judge, predict

        if self.folder_reference:
            raise UserError("--metric accuracy needs a labelled data set as --reference, not a folder of images.")
        dataset = self.judge_dataset()
        judge = self._main_first(lambda: load_or_train_judge(dataset)).to(self.device)
        labels = np.asarray(labels, np.int64)

        def rows(k: int, start: int, stop: int) -> torch.Tensor:
            return torch.from_numpy(predict(judge, images(k, start, stop))).double()[:, None]

        pred = sharded_rows(len(labels), self.setup.chunk_size, 1, rows, self.acc, desc)[:, 0].astype(np.int64)
        num_classes = judge.head.out_features
        if labels.min() < 0 or labels.max() >= num_classes:
            raise UserError(f"Intended labels must lie in 0..{num_classes - 1}; got {labels.min()}..{labels.max()}.")
        hit = pred == labels
        s = self.setup
        _, real, real_labels = self._main_first(
            lambda: load_split(s.reference, s.split, s.image_size, s.channels, s.cache_dir))
        floor = judge_accuracy(judge, real, real_labels)
        return {"accuracy": float(hit.mean()),
                "per_class": {int(c): float(hit[labels == c].mean()) for c in np.unique(labels)},
                "histogram": np.bincount(pred, minlength=num_classes).tolist(), "num": int(len(labels)),
                "accuracy_floor": floor["accuracy"], "floor_num": floor["num"],
                "floor_source": f"{s.reference} {s.split}", "judge_dataset": dataset,
                "judge_test_accuracy": judge.test_accuracy}

    def classes(self, images: ImagesFn, num: int, desc: str = "") -> dict:
        """Which classes the judge sees in ``num`` unconditional samples (do they cover every
        class, or has the model collapsed onto a few?), beside the real reference images."""
        from genscale.metrics.judge import load_or_train_judge, predict

        if self.folder_reference:
            raise UserError("--metric classes needs a labelled data set as --reference, not a folder of images.")
        dataset = self.judge_dataset()
        judge = self._main_first(lambda: load_or_train_judge(dataset)).to(self.device)

        def rows(k: int, start: int, stop: int) -> torch.Tensor:
            return torch.from_numpy(predict(judge, images(k, start, stop))).double()[:, None]

        pred = sharded_rows(num, self.setup.chunk_size, 1, rows, self.acc, desc)[:, 0].astype(np.int64)
        num_classes = judge.head.out_features
        hist = np.bincount(pred, minlength=num_classes)
        s = self.setup
        _, real, _ = self._main_first(lambda: load_split(s.reference, s.split, s.image_size, s.channels, s.cache_dir))
        real_hist = np.bincount(predict(judge, real), minlength=num_classes)
        return {"classes_present": int((hist > 0).sum()), "num_classes": num_classes,
                "rarest_share": float(hist.min() / num), "histogram": hist.tolist(), "num": int(num),
                "floor_histogram": real_hist.tolist(), "floor_num": int(len(real)),
                "floor_source": f"{s.reference} {s.split}", "judge_dataset": dataset,
                "judge_test_accuracy": judge.test_accuracy}

    def translation(self, family, num: int | None, desc: str = "") -> dict:
        """L1 and PSNR of an image-to-image run's translations of the held-out pairs against their
        targets, beside the baseline of copying the input (what the model must beat)."""
        from genscale.data import resolve_data
        from genscale.families.pix2pix import match_channels

        s = self.setup
        try:  # the family's reference falls back to the train split (fine for grids, not for a score)
            self._main_first(lambda: resolve_data(s.reference, "test", s.cache_dir, s.reference_flag))
        except UserError as err:
            raise UserError(f"--metric translation scores held-out pairs, but {err}") from None
        pairs = self._main_first(family.reference)
        sources, targets = pairs["source"], pairs["image"]
        n = len(targets) if num is None else min(num, len(targets))

        def rows(k: int, start: int, stop: int) -> torch.Tensor:
            out = family.translate(sources[start:stop]).float().cpu()
            target = targets[start:stop].float()
            copy = match_channels(sources[start:stop].float(), target.shape[1])
            per_image = [(out - target).abs(), (out - target).square(), (copy - target).abs(), (copy - target).square()]
            return torch.stack([e.flatten(1).sum(1).double() for e in per_image], 1)

        sums = sharded_rows(n, self.setup.chunk_size, 4, rows, self.acc, desc).sum(0)
        values = n * int(targets[0].numel())

        def db(sse: float) -> float:
            return 10 * math.log10(2.0 ** 2 / (sse / values)) if sse > 0 else math.inf  # images in [-1, 1]

        return {"l1": float(sums[0] / values), "psnr": db(float(sums[1])), "l1_copy": float(sums[2] / values),
                "psnr_copy": db(float(sums[3])), "num": int(n), "reference": f"{self.setup.reference} test"}

    def psnr(self, family, num: int, mask_kind: str, desc: str = "") -> dict:
        """Hole PSNR of an inpainting family vs biharmonic inpainting on the reference split."""
        from genscale.metrics.inpainting import check_inpainting_family, inpainting_rows, psnr_result

        check_inpainting_family(family)
        if self.folder_reference:
            raise UserError("--metric psnr needs a data set as --reference, not a folder of images.")
        s = self.setup
        _, images, _ = self._main_first(
            lambda: load_split(s.reference, s.split, s.image_size, s.channels, s.cache_dir, limit=num))
        rows = sharded_rows(len(images), s.chunk_size, 4, inpainting_rows(family, images, mask_kind, s.seed),
                            self.acc, desc)
        return psnr_result(rows, int(np.prod(images.shape[1:])), mask_kind, f"{s.reference} {s.split}")
