"""``--init-from RUN``: a new run whose networks start from another run's trained weights.

Fine-tuning on one's own images starts here: train on a large shard set (or take a colleague's
run folder), then train a new run from it. What carries over is the networks' weights only: the
optimizer state, the step counter, the data stream and the EMA start afresh, as in any new run
(the EMA copies are made from the loaded networks). Each network with an EMA copy starts from the
checkpoint's EMA weights, the ones sample.py draws from and evaluate.py scores; a network without
one (a GAN's discriminator) from its trained weights, Accelerate's ``model_<i>.safetensors``.

It applies only when ``--out`` holds no checkpoint yet: re-running the same command resumes the new
run from its own checkpoints, as every run does. The source must be a run of the same model with
the same model options, except those a resume may change too (the family's RESUME_MAY_CHANGE);
anything else would give the weights another meaning (a --schedule, a --prediction) or another
shape, and is refused naming the options to give.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from genscale import checkpoints as ckpt
from genscale.config import RunConfig, changed_options
from genscale.errors import UserError


def source_checkpoint(spec: str) -> Path:
    """A run folder's latest checkpoint, or the checkpoint folder given (OUT/checkpoints/step-N, best)."""
    path = Path(spec)
    if (path / "meta.json").is_file() and (path / "ema.pt").is_file():
        return path
    latest = ckpt.latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise UserError(f"--init-from {spec} is neither a run folder with a complete checkpoint nor a checkpoint "
                        "folder (RUN/checkpoints/step-N)")
    return latest


def check_same_model(run: RunConfig, source: Path, spec: str, free: tuple[str, ...]) -> None:
    """The source run's config.json names the same model and options (but those in ``free``)."""
    try:
        record = json.loads((source.parent.parent / "config.json").read_text())
        old_model, old = record["train"]["model"], record["options"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"--init-from {spec}: its run's config.json is missing or damaged, so what its weights "
                        "mean is unknown") from None
    if old_model != run.train.model:
        raise UserError(f"--init-from {spec} holds a {old_model} run; a {run.train.model} run cannot start from it")
    was = changed_options(old, run.options, free) if isinstance(old, dict) else ""
    if was:
        raise UserError(f"--init-from {spec} was trained with {was}; give the same to start from its weights")


def load_weights(run: RunConfig, family, free: tuple[str, ...] = ()) -> Path:
    """Put the source checkpoint's weights into ``family``'s networks (before the trainer prepares
    them and copies them for the EMA); returns the checkpoint used."""
    spec = run.train.init_from
    source = source_checkpoint(spec)
    check_same_model(run, source, spec, free)
    try:
        ema = torch.load(source / "ema.pt", map_location="cpu", weights_only=True)
        states = {}
        for index, name in enumerate(family.nets):
            if name in ema:
                states[name] = ema[name]
            else:
                from safetensors.torch import load_file

                states[name] = load_file(str(source / f"model{f'_{index}' if index else ''}.safetensors"))
    except Exception:  # noqa: BLE001 - a missing or damaged file: one sentence
        raise UserError(f"--init-from {spec}: checkpoint {source} is damaged or incomplete") from None
    for name, net in family.nets.items():
        mine = {k: tuple(v.shape) for k, v in net.state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in states[name].items()}
        if mine != theirs:
            raise UserError(f"--init-from {spec}: its {name} network has another shape than these flags build "
                            "(another --image-size, or data with other channels or classes?)")
        net.load_state_dict(states[name])
    return source
