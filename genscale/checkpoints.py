"""Checkpoint folders of a run: atomic writes, finding the latest, pruning, loading weights.

Layout: OUT/checkpoints/step-00001000/ holds Accelerate's state (models, optimizers, scaler,
RNG), the trainer's own state (``trainer_state.pt``: step counter, EMA, best score), ``ema.pt``
(the EMA weights, what sample.py loads) and ``meta.json``. Everything in it loads with
``weights_only=True``.

A checkpoint is written under a temporary name, fsynced, and renamed only when complete, so a
kill at any moment leaves the previous checkpoint as the latest. A folder that must be replaced
(the same step saved twice, ``best``) is first renamed aside and deleted only after the new one
is in place; ``clean_temporaries`` puts an aside folder back when a kill came in between.
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
OLD_PREFIX = ".old-"  # a published folder moved aside while its replacement is renamed in
TRAINER_STATE = "trainer_state.pt"
# Checkpoints written before trainer_state.pt held these (Accelerate's custom-object registry).
LEGACY_OBJECTS = "custom_checkpoint_0.pkl"


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


def read_meta(path: Path) -> dict:
    """A checkpoint's meta.json (step, world size); {} when it cannot be read."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def write_meta(path: Path, step: int, extra: dict | None = None) -> None:
    meta = {"step": step, **(extra or {})}
    tmp = path / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, path / "meta.json")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under ``path`` and the folders themselves to disk, so that the rename
    that publishes them cannot reach the disk before their contents (a power cut would otherwise
    leave a published checkpoint of empty files)."""
    for folder, _, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _replace_dir(new: Path, final: Path) -> None:
    """Rename complete folder ``new`` to ``final``; an existing ``final`` is moved aside first and
    deleted only once ``new`` is in place, so a kill at any moment leaves a whole copy behind."""
    aside = final.parent / f"{OLD_PREFIX}{final.name}"
    if final.exists():
        shutil.rmtree(aside, ignore_errors=True)  # a stale leftover; ``final`` is the live copy
        os.rename(final, aside)
    os.rename(new, final)
    _fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def publish(tmp: Path, final: Path) -> None:
    """Make a fully written temporary checkpoint visible under its final name (fsynced first).
    ``final`` may exist: the same step saved twice (e.g. a stop right after a periodic save)."""
    fsync_tree(tmp)
    _replace_dir(tmp, final)


def keep_as_best(out: str | Path, step: int) -> None:
    """Copy checkpoint ``step`` to checkpoints/best: copy, fsync, then replace the old best."""
    root = checkpoint_root(out)
    tmp = root / ".tmp-best"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(final_name(root, step), tmp)
    fsync_tree(tmp)
    _replace_dir(tmp, root / "best")


def prune(out: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints and any leftover temporaries."""
    found = list_checkpoints(out)
    for _, path in found[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    clean_temporaries(out)


def clean_temporaries(out: str | Path) -> None:
    """Undo what a kill in the middle of a save left: a folder moved aside whose replacement never
    arrived goes back under its name; half-written temporaries and superseded copies go."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return
    for child in sorted(root.iterdir()):
        if child.name.startswith(OLD_PREFIX):
            original = root / child.name[len(OLD_PREFIX):]
            if not original.exists():
                os.rename(child, original)
                _fsync_dir(root)
    for child in root.iterdir():
        if child.name.startswith((TMP_PREFIX, OLD_PREFIX)) or child.name == ".tmp-best":
            shutil.rmtree(child, ignore_errors=True)


def save_trainer_state(path: Path, state: dict) -> None:
    """The trainer's own state (plain dicts of numbers, strings and tensors)."""
    torch.save(state, path / TRAINER_STATE)


def load_trainer_state(path: Path) -> dict:
    """What ``save_trainer_state`` wrote, loaded with ``weights_only=True`` (never arbitrary pickles)."""
    return torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)


def is_legacy(path: Path) -> bool:
    """Written by an older genscale that registered its objects with Accelerate."""
    return (path / LEGACY_OBJECTS).is_file() and not (path / TRAINER_STATE).is_file()


def save_ema_weights(path: Path, ema_state: dict[str, dict[str, torch.Tensor]]) -> None:
    # contiguous: a channels_last run's weights are saved in the NCHW layout that sample.py and
    # evaluate.py build, so the file does not depend on the layout the run trained in
    torch.save({name: {k: v.detach().cpu().contiguous() for k, v in sd.items()} for name, sd in ema_state.items()},
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
