"""Checkpoint folders of a run: atomic writes, finding the latest, pruning, loading weights.

Layout: OUT/checkpoints/step-00001000/ holds Accelerate's state (models, optimizers, scaler,
RNG, registered objects), ``ema.pt`` (the EMA weights, what sample.py loads) and ``meta.json``.
A checkpoint is written under a temporary name and renamed only when complete, so a kill at
any moment leaves the previous checkpoint as the latest.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from genscale.errors import UserError

_NAME = re.compile(r"^step-(\d{8})$")
TMP_PREFIX = ".tmp-step-"


def checkpoint_root(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def final_name(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def temp_name(root: Path, step: int) -> Path:
    return root / f"{TMP_PREFIX}{step:08d}"


def list_checkpoints(out: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (they have meta.json), oldest first."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _NAME.match(child.name)
        if m and (child / "meta.json").is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(out: str | Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


def write_meta(path: Path, step: int, extra: dict | None = None) -> None:
    meta = {"step": step, **(extra or {})}
    tmp = path / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, path / "meta.json")


def publish(tmp: Path, final: Path) -> None:
    """Make a fully written temporary checkpoint visible under its final name."""
    if final.exists():  # the same step saved twice (e.g. a stop right after a periodic save)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def keep_as_best(out: str | Path, step: int) -> None:
    """Copy checkpoint ``step`` to checkpoints/best (atomically: copy, then rename over the old)."""
    root = checkpoint_root(out)
    tmp, best = root / ".tmp-best", root / "best"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(final_name(root, step), tmp)
    old = root / ".old-best"
    if best.exists():
        os.rename(best, old)
    os.rename(tmp, best)
    shutil.rmtree(old, ignore_errors=True)


def prune(out: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints and any leftover temporaries."""
    found = list_checkpoints(out)
    for _, path in found[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    clean_temporaries(out)


def clean_temporaries(out: str | Path) -> None:
    root = checkpoint_root(out)
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(TMP_PREFIX) or child.name in (".tmp-best", ".old-best"):
                shutil.rmtree(child, ignore_errors=True)


def save_ema_weights(path: Path, ema_state: dict[str, dict[str, torch.Tensor]]) -> None:
    torch.save({name: {k: v.detach().cpu() for k, v in sd.items()} for name, sd in ema_state.items()},
               path / "ema.pt")


def load_ema_weights(run_dir: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], int]:
    """The EMA weights of a run's latest checkpoint, and its step (UserError if unusable)."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise UserError(f"run {run_dir} has no complete checkpoint yet", exit_code=1)
    try:
        state = torch.load(ckpt / "ema.pt", map_location="cpu", weights_only=True)
        step = int(json.loads((ckpt / "meta.json").read_text())["step"])
    except Exception:  # noqa: BLE001 - any failure here means a damaged checkpoint
        raise UserError(f"checkpoint {ckpt} is damaged and cannot be loaded", exit_code=1) from None
    return state, step
