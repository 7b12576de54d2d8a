"""What a run writes for people to read: config.json, metrics.jsonl, grids and loss curves."""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genscale.errors import UserError

LIBRARIES = ("torch", "accelerate", "webdataset", "triton", "numpy", "einops", "clean-fid")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_commit() -> str:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW float -> uint8 NHWC (the on-disk and ADM-npz convention)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid_image(images: np.ndarray, nrow: int, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile uint8 NHWC images into one HWC image, ``nrow`` images per row."""
    n, h, w, c = images.shape
    nrow = max(1, min(nrow, n))
    rows = math.ceil(n / nrow)
    canvas = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        canvas[y:y + h, x:x + w] = images[i]
    if scale > 1:
        canvas = canvas.repeat(scale, 0).repeat(scale, 1)
    return canvas


def save_png(path: Path, image_hwc: np.ndarray) -> None:
    from PIL import Image

    arr = image_hwc[..., 0] if image_hwc.shape[-1] == 1 else image_hwc
    tmp = path.with_name(path.name + ".tmp.png")
    try:
        Image.fromarray(arr).save(tmp)
        os.replace(tmp, path)
    except OSError as err:  # a folder of that name, a full disk: one sentence, and no stray temporary
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UserError(f"cannot write {path} ({err.strerror or err})", exit_code=1) from None


def save_npz(path: Path, *arrays: np.ndarray, **named: np.ndarray) -> None:
    """np.savez to exactly ``path`` (numpy would append ".npz" to a name ending in ".NPZ"), through
    a temporary file, so that an interrupted write leaves no truncated archive under that name."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, *arrays, **named)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UserError(f"cannot write {path} ({err.strerror or err})", exit_code=1) from None


def save_grid(path: Path, images: torch.Tensor, nrow: int) -> None:
    """Save [-1,1] images as a grid PNG, upscaled so small images stay visible."""
    arr = to_uint8(images)
    scale = max(1, 128 // arr.shape[1]) if arr.shape[1] < 64 else 1
    save_png(path, grid_image(arr, nrow, scale=min(scale, 8)))


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl (main process only)."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill
                continue
        return rows

    def truncate_after(self, step: int) -> None:
        """Drop records newer than the checkpoint a run starts from, so the curve has no duplicate steps."""
        if not self.path.exists():
            return
        rows = [r for r in self.read() if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.path)


def plot_losses(metrics: list[dict[str, Any]], path: Path) -> None:
    """Write ``loss_figure(metrics)`` to ``path`` (atomically); nothing when no loss was logged."""
    fig = loss_figure(metrics)  # it selects the Agg backend before pyplot is imported
    if fig is None:
        return
    import matplotlib.pyplot as plt

    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def loss_figure(metrics: list[dict[str, Any]]):
    """One curve per logged loss (keys containing 'loss'), smoothed, against the step; the learning
    rate dashed on a second axis, so a loss that turns with the schedule can be read as such."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in metrics if "step" in r and r.get("kind", "train") == "train"]
    keys = sorted({k for r in train for k in r if "loss" in k and isinstance(r[k], (int, float))})
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        pts = [(r["step"], r[key]) for r in train if key in r and math.isfinite(r[key])]
        if not pts:
            continue
        steps, vals = zip(*pts)
        ax.plot(steps, vals, alpha=0.3)
        k = max(1, len(vals) // 20)
        smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, label=key, color=ax.lines[-1].get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper left")
    rates = [(r["step"], r["lr"]) for r in train if isinstance(r.get("lr"), (int, float)) and math.isfinite(r["lr"])]
    if rates:
        lr_ax = ax.twinx()
        lr_ax.plot(*zip(*rates), color="grey", linestyle="--", linewidth=1, label="learning rate")
        lr_ax.set_ylabel("learning rate")
        lr_ax.set_ylim(bottom=0)
        lr_ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
