"""Images into the applications (a file or the run's held-out split) and grids/arrays out of them."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from genscale.cli import output_files
from genscale.data.transforms import IMAGE_EXTENSIONS, decode_image, flatten_alpha, to_channels
from genscale.errors import UserError
from genscale.run_files import grid_image, save_npz, save_png, to_uint8


def run_data(run_dir: str) -> str:
    """The --data a run was trained on (for its held-out split)."""
    try:
        return json.loads((Path(run_dir) / "config.json").read_text())["train"]["data"]
    except (OSError, KeyError, json.JSONDecodeError):
        raise UserError(f"{run_dir} is not a readable genscale run (config.json)") from None


# What --input reads: an .npz of images, or one image file of a kind the data pipeline decodes.
IMAGE_SUFFIXES = tuple("." + e for e in IMAGE_EXTENSIONS)
INPUT_KINDS = ".npz or an image (" + ", ".join(IMAGE_SUFFIXES) + ")"


def input_file(spec: str, flag: str = "--input") -> Path:
    """The path of ``spec``, refused in one sentence when it is a folder, missing or of a kind we cannot read."""
    path = Path(spec)
    if path.is_dir():
        raise UserError(f"{flag} {spec} is a folder, not a file")
    if not path.is_file():
        raise UserError(f"{flag} file {spec} does not exist")
    if path.suffix.lower() not in (".npz", *IMAGE_SUFFIXES):
        raise UserError(f"{flag} must be an {INPUT_KINDS}, got {spec}")
    return path


def read_image_file(path: Path, flag: str = "--input") -> np.ndarray:
    """One image file as uint8 H x W x C (C = 1 grey, 3 colour), decoded exactly as the training data
    is (genscale.data.transforms.decode_image: palettes expanded, transparency composited onto
    white, 16-bit greys rescaled, CMYK converted), so an input shows the pixels the run learnt from."""
    from PIL import Image

    try:
        img = decode_image(path.read_bytes())
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # PIL's ways to fail on bad bytes
        raise UserError(f"{flag} {path} is not a readable image") from None
    pixels = np.array(img)  # a writable copy (torch warns on a read-only one)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def read_npz_images(path: Path, flag: str = "--input") -> tuple[np.ndarray, np.ndarray | None]:
    """arr_0 (uint8 N x H x W [x C]) and arr_1 (labels, or None) of an .npz holding at least one image."""
    try:
        with np.load(path, allow_pickle=False) as data:
            images = data["arr_0"]
            labels = data["arr_1"] if "arr_1" in data else None
    except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile):  # truncated / not a zip
        raise UserError(f"{flag} {path} is not a readable .npz with an arr_0 array") from None
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise UserError(f"{flag} must hold uint8 N x H x W x C images, got {images.dtype} {images.shape}")
    if len(images) == 0:  # would print PSNR nan and write empty files
        raise UserError(f"{flag} {path} holds no images (arr_0 has shape {images.shape})")
    return (images[..., None] if images.ndim == 3 else images), labels


def fit_channels(images: np.ndarray, channels: int, what: str) -> np.ndarray:
    """uint8 N x H x W x C images with the run's channels, converted as the data pipeline converts a
    decoded image (transparency composited onto white, colour -> grey by PIL's ITU-R 601 luma)."""
    if images.shape[-1] == channels:
        return images
    if images.shape[-1] not in (1, 2, 3, 4) or channels not in (1, 3):
        raise UserError(f"{what} has {images.shape[-1]} channels but the run works on {channels}")
    from PIL import Image

    out = []
    for image in images:  # 1 -> L, 2 -> LA, 3 -> RGB, 4 -> RGBA (PIL infers the mode)
        img = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        if img.mode in ("LA", "RGBA"):
            img = flatten_alpha(img)
        out.append(np.asarray(to_channels(img, channels)).reshape(*image.shape[:2], channels))
    return np.stack(out)


def load_images(spec: str | None, run_dir: str, image_size: int, channels: int,
                num: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x H x W x C images and int labels (-1 unknown) from ``spec``.

    ``spec``: IMAGES.npz (arr_0 uint8 N x H x W [x C], optional arr_1 labels), one image file
    (.png, .jpg, .jpeg, .webp), or None for the first ``num`` images of the held-out (test) split
    of the run's data.
    """
    if spec is None:
        from genscale.metrics.reference import load_split

        _, images, labels = load_split(run_data(run_dir), "test", image_size, channels, limit=num)
        return images, labels.astype(np.int64)
    path = input_file(spec)
    if path.suffix.lower() == ".npz":
        images, labels = read_npz_images(path)
    else:
        images, labels = read_image_file(path)[None], None
    if images.shape[1:3] != (image_size, image_size):
        raise UserError(f"the run works on {image_size} x {image_size} images, --input holds "
                        f"{images.shape[1]} x {images.shape[2]}")
    images = fit_channels(images, channels, f"--input {spec}")
    if labels is None or labels.shape != (len(images),):
        labels = np.full(len(images), -1)
    return images, labels.astype(np.int64)


def to_tensor(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1


def columns_grid(columns: list[np.ndarray | torch.Tensor]) -> np.ndarray:
    """One row per image, one column per stage: the uint8 HWC grid of equally long uint8/float batches."""
    cols = [to_uint8(c) if torch.is_tensor(c) else c for c in columns]
    n, h, w, c = cols[0].shape
    tiles = np.stack(cols, 1).reshape(-1, h, w, c)
    return grid_image(tiles, len(cols), scale=max(1, min(8, 64 // h)))


def write_task_outputs(out: str, grid: np.ndarray, arrays: np.ndarray | torch.Tensor,
                       extra: dict[str, np.ndarray | torch.Tensor] | None = None) -> list[Path]:
    """``out``.png <- the grid; ``out``.npz <- arr_0 uint8 N x H x W x C plus the named ``extra``
    arrays (image tensors are stored as uint8 NHWC like arr_0)."""
    files = output_files(out)
    written = []
    if ".png" in files:
        save_png(files[".png"], grid)
        written.append(files[".png"])
    if ".npz" in files:
        named = {k: to_uint8(v) if torch.is_tensor(v) else np.asarray(v) for k, v in (extra or {}).items()}
        save_npz(files[".npz"], to_uint8(arrays) if torch.is_tensor(arrays) else arrays, **named)
        written.append(files[".npz"])
    return written
