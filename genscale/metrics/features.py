"""Feature extractors for FID and KID, run through clean-fid's own code path.

Every image goes the same way, whether it is an in-memory array or a file in a folder (files
are read by clean-fid's own loader): uint8 H x W x 3 (grey repeated, as clean-fid's
``convert("RGB")`` does) -> clean-fid's "clean" resize (PIL bicubic on float32 channels, no
quantisation in between) to the extractor's input size -> float [0, 255] N x 3 x S x S ->
features, returned as float64.

Two extractors:

- ``inception``: clean-fid's InceptionV3 (the StyleGAN2 torchscript of the TF-slim weights,
  2048-d pool features) at 299 x 299, exactly clean-fid's "clean" mode. Its weights are one
  file, ``inception-2015-12-05.pt``, that clean-fid downloads into /tmp on first use; where
  that is impossible the user is told which file to put where (``$GENSCALE_INCEPTION_DIR``
  overrides the folder).
- ``judge``: the penultimate layer (128-d) of the judge classifier trained on the reference
  data set's training split (genscale.metrics.judge), at the judge's 8 x 8 input. It needs no
  download, so it is the default; judges exist for the data sets in ``judge.DATASETS``.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from genscale.errors import UserError

FEATURES = ("judge", "inception")
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
INCEPTION_SIZE = 299
DOWNLOAD_TIMEOUT_S = 60


@dataclass
class FeatureExtractor:
    """A feature network behind clean-fid's resize: ``model`` maps float [0, 255] N x 3 x S x S
    on ``device`` to N x ``dim`` features."""

    name: str  # "judge" or "inception"
    tag: str  # names the exact weights, for the reference-statistics cache
    size: int  # input side S the clean resize produces
    dim: int
    model: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def resizer(self) -> Callable[[np.ndarray], np.ndarray]:
        """clean-fid's "clean" resize (its own function) to this extractor's input size."""
        from cleanfid.resize import build_resizer, make_resizer

        if self.size == INCEPTION_SIZE:
            return build_resizer("clean")
        return make_resizer("PIL", False, "bicubic", (self.size, self.size))

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch)


def inception_dir() -> Path:
    """Where clean-fid's Inception weights are looked for: $GENSCALE_INCEPTION_DIR, else /tmp
    (the folder clean-fid itself downloads into on Linux)."""
    return Path(os.environ.get("GENSCALE_INCEPTION_DIR") or "/tmp")


def inception_missing_message(folder: Path, flag: str = "--features", dataset: str | None = None) -> str:
    """Where to put the weights; the judge is offered only where ``dataset`` has one (otherwise
    the judge's own error would send the user back here)."""
    from genscale.metrics.judge import DATASETS

    judge = f", or use {flag} judge" if dataset in DATASETS else ""
    return (f"clean-fid's Inception weights are missing and cannot be downloaded here: place {INCEPTION_FILE} "
            f"(from {INCEPTION_URL}) in {folder}/ (or set GENSCALE_INCEPTION_DIR to its folder){judge}.")


def ensure_inception_weights(download: bool = True, flag: str = "--features", dataset: str | None = None) -> Path:
    """The path of the Inception weights, downloading them with clean-fid's helper if absent."""
    folder = inception_dir()
    path = folder / INCEPTION_FILE
    if path.is_file():
        return path
    if download:
        from cleanfid.downloads_helper import check_download_inception

        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # clean-fid's urlopen has no timeout of its own
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return Path(check_download_inception(fpath=str(folder)))
        except Exception:  # noqa: BLE001 -- no network, DNS, HTTP, disk: all mean "place it by hand"
            path.unlink(missing_ok=True)  # never leave a partial download that looks complete
        finally:
            socket.setdefaulttimeout(previous)
    raise UserError(inception_missing_message(folder, flag, dataset))


def inception_extractor(device: torch.device, download: bool = True, dataset: str | None = None) -> FeatureExtractor:
    from cleanfid.inception_torchscript import InceptionV3W

    path = ensure_inception_weights(download, dataset=dataset)
    try:
        net = InceptionV3W(str(path.parent), download=False, resize_inside=False).to(device).eval()
    except Exception as err:  # noqa: BLE001 -- torch.jit.load raises many types on a bad file
        raise UserError(f"{path} could not be loaded ({type(err).__name__}); delete it and place a fresh copy "
                        f"of {INCEPTION_FILE} from {INCEPTION_URL} there.") from None
    return FeatureExtractor("inception", "inception-2015-12-05", INCEPTION_SIZE, 2048, net, device)


def judge_extractor(dataset: str, device: torch.device) -> FeatureExtractor:
    from genscale.metrics.judge import DATASETS, INPUT_SIZE, JUDGE_VERSION, load_or_train_judge

    if dataset not in DATASETS:
        raise UserError(f"No judge classifier is defined for the data set {dataset!r} (judges exist for "
                        f"{', '.join(sorted(DATASETS))}); use --features inception.")
    judge = load_or_train_judge(dataset).to(device).eval()

    def model(x: torch.Tensor) -> torch.Tensor:
        return judge.features(x / 127.5 - 1.0)

    return FeatureExtractor("judge", f"judge-{dataset}-v{JUDGE_VERSION}", INPUT_SIZE, judge.feature_dim, model,
                            device)


def check_features_available(name: str, dataset: str, flag: str = "--features") -> None:
    """Fail now (one sentence) if ``build_extractor(name, dataset)`` could not work, without
    loading anything heavy: for a training run that would otherwise die at its first evaluation."""
    if name not in FEATURES:
        raise UserError(f"{flag} must be one of {', '.join(FEATURES)}, got {name!r}.")
    if name == "judge":
        from genscale.metrics.judge import DATASETS

        if dataset not in DATASETS:
            raise UserError(f"No judge classifier is defined for the data set {dataset!r} (judges exist for "
                            f"{', '.join(sorted(DATASETS))}); use inception features.")
    else:
        ensure_inception_weights(download=True, flag=flag, dataset=dataset)


def build_extractor(name: str, dataset: str, device: torch.device | str = "cpu") -> FeatureExtractor:
    """The extractor ``name`` (judge or inception); ``dataset`` picks the judge."""
    device = torch.device(device)
    if name == "judge":
        return judge_extractor(dataset, device)
    if name == "inception":
        return inception_extractor(device, dataset=dataset)
    raise UserError(f"--features must be one of {', '.join(FEATURES)}, got {name!r}.")


def to_rgb_uint8(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """uint8 N x H x W x C (C = 1 or 3) or float N x C x H x W in [-1, 1] -> uint8 N x H x W x 3.

    Float images are quantised as writing them to PNG would (genscale.run_files.to_uint8).
    """
    if torch.is_tensor(images) and images.is_floating_point():
        from genscale.run_files import to_uint8

        images = to_uint8(images)
    x = np.asarray(images)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise UserError(f"images must be uint8 N x H x W x C with C = 1 or 3, got {x.dtype} {x.shape}.")
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def image_features(images: np.ndarray | torch.Tensor, extractor: FeatureExtractor,
                   batch_size: int = 128) -> np.ndarray:
    """Features (float64, N x dim) of in-memory images, through clean-fid's resize and batching."""
    from cleanfid.fid import get_batch_features

    x = to_rgb_uint8(images)
    resize = extractor.resizer()
    out = [np.zeros((0, extractor.dim))]
    for i in range(0, len(x), batch_size):
        # clean-fid resizes one H x W x 3 image at a time (float32 out), then stacks as CHW.
        resized = np.stack([resize(img) for img in x[i:i + batch_size]]).astype(np.float32)
        batch = torch.from_numpy(resized).permute(0, 3, 1, 2).contiguous()
        out.append(get_batch_features(batch, extractor, extractor.device).astype(np.float64))
    return np.concatenate(out)


def list_image_files(folder: str | os.PathLike) -> list[str]:
    """The image files of a folder (recursively, clean-fid's extensions in any case), in a fixed order."""
    from cleanfid.utils import EXTENSIONS

    extensions = {e.lower() for e in EXTENSIONS}  # clean-fid lists "PNG" and "JPG" but not "Png" or "BMP"
    root = Path(folder)
    files = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix[1:].lower() in extensions)
    if not files:
        raise UserError(f"{folder} holds no image files.")
    return files


def file_features(files: list[str], extractor: FeatureExtractor, batch_size: int = 128) -> np.ndarray:
    """Features (float64) of image files, read and resized by clean-fid's own file loader."""
    from cleanfid.fid import get_files_features

    if not files:
        return np.zeros((0, extractor.dim))
    try:
        feats = get_files_features(files, model=extractor, num_workers=0, batch_size=batch_size,
                                   device=extractor.device, mode="clean", custom_fn_resize=extractor.resizer(),
                                   verbose=False)
    except OSError as err:  # PIL's UnidentifiedImageError is one; its message names the file
        raise UserError(f"an image cannot be read: {err}") from None
    return feats.astype(np.float64)
