"""Images into the applications (a file or the run's held-out split) and grids/arrays out of them."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from genscale.errors import UserError
from genscale.cli import output_files
from genscale.run_files import grid_image, save_npz, save_png, to_uint8


def run_data(run_dir: str) -> str:
    """The --data a run was trained on (for its held-out split)."""
    try:
        return json.loads((Path(run_dir) / "config.json").read_text())["train"]["data"]
    except (OSError, KeyError, json.JSONDecodeError):
        raise UserError(f"{run_dir} is not a readable genscale run (config.json)") from None


def _fit_channels(images: np.ndarray, channels: int, what: str) -> np.ndarray:
    if images.shape[-1] == channels:
        return images
    if channels == 1 and images.shape[-1] in (3, 4):  # colour -> grey (ITU-R 601 luma)
        grey = images[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        return np.round(grey)[..., None].astype(np.uint8)
    if channels == 3 and images.shape[-1] == 1:
        return np.repeat(images, 3, -1)
    raise UserError(f"{what} has {images.shape[-1]} channels but the run works on {channels}")


def load_images(spec: str | None, run_dir: str, image_size: int, channels: int,
                num: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x H x W x C images and int labels (-1 unknown) from ``spec``.

    ``spec``: IMAGES.npz (arr_0 uint8 N x H x W [x C], optional arr_1 labels), one IMAGE.png, or
    None for the first ``num`` images of the held-out (test) split of the run's data.
    """
    if spec is None:
        from genscale.metrics.reference import load_split

        _, images, labels = load_split(run_data(run_dir), "test", image_size, channels, limit=num)
        return images, labels.astype(np.int64)
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"--input file {spec} does not exist")
    labels = None
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                images = data["arr_0"]
                labels = data["arr_1"] if "arr_1" in data else None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # truncated / not a zip
            raise UserError(f"--input {spec} is not a readable .npz with an arr_0 array") from None
    elif path.suffix.lower() in (".png", ".jpg", ".jpeg"):
        from PIL import Image

        try:
            images = np.array(Image.open(path))[None]  # a writable copy (torch warns on a read-only one)
        except OSError:
            raise UserError(f"--input {spec} is not a readable image") from None
    else:
        raise UserError(f"--input must be an .npz or a .png, got {spec}")
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise UserError(f"--input must hold uint8 N x H x W x C images, got {images.dtype} {images.shape}")
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[1:3] != (image_size, image_size):
        raise UserError(f"the run works on {image_size} x {image_size} images, --input holds "
                        f"{images.shape[1]} x {images.shape[2]}")
    images = _fit_channels(images, channels, f"--input {spec}")
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
