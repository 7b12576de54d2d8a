"""Entry point: ``accelerate launch genscale/train.py --model ddpm [options]``.

Builds the data stream, the family and the trainer from the command line, records the
resolved configuration in OUT/config.json and trains; the same command with the same --out
resumes from the latest checkpoint.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # run as a script: import the package, not the files beside this one
    sys.path[0] = str(Path(__file__).resolve().parent.parent)
    from genscale.cli import quiet_interrupt_while_starting

    quiet_interrupt_while_starting()

import dataclasses
import json
import os
from typing import Iterator

import torch

from genscale import init_from, run_status
from genscale.cli import check_output_path, make_folder, run_main
from genscale.config import RunConfig, TrainConfig, changed_options, flag_with_value, parse_train_args
from genscale.errors import UserError
from genscale.families import family_module
from genscale.families.base import Batch, DataInfo
from genscale.run_files import git_commit, library_versions, write_json_atomic
from genscale.run_lock import lock_run_folder


def batch_stream(cfg: TrainConfig, shards, info: DataInfo, rank: int, world: int):
    """Return start_step -> iterator of batches, deterministic per (seed, epoch, rank)."""
    from genscale.data import make_loader

    def stream(start_step: int) -> Iterator[Batch]:
        epoch, skip = divmod(start_step * cfg.grad_accum, cfg.batches_per_epoch)
        while True:
            loader = make_loader(shards, image_size=cfg.image_size, channels=info.channels,
                                 batch_size=cfg.batch_size, batches_per_epoch=cfg.batches_per_epoch,
                                 seed=cfg.seed, epoch=epoch, rank=rank, world_size=world,
                                 num_workers=cfg.num_workers, shuffle_buffer=cfg.shuffle_buffer,
                                 flip=cfg.flip, resampled=True)
            for i, batch in enumerate(loader):
                if i >= skip:
                    yield batch
            skip, epoch = 0, epoch + 1

    return stream


# Flags that shape the data stream or the random draws: changing them on resume is allowed
# (e.g. to train longer) but the resumed run no longer equals an uninterrupted one.
STREAM_FLAGS = ("data", "seed", "batch_size", "grad_accum", "num_workers", "batches_per_epoch", "image_size",
                "shuffle_buffer", "flip")


def _saved_train_flags(run: RunConfig) -> dict | None:
    path = Path(run.train.out) / "config.json"
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())["train"]
        old["model"]
    except (json.JSONDecodeError, KeyError, TypeError):  # TypeError: valid JSON but not a mapping
        raise UserError(f"{path} is damaged; remove it or choose another --out", exit_code=1) from None
    return old


# Train flags that can change the networks' shapes (the channels and the size of the images).
SHAPE_FLAGS = ("image_size", "data")


def check_same_run(run: RunConfig) -> None:
    """Refuse to resume a run folder that holds a different model."""
    old = _saved_train_flags(run)
    if old is not None and old["model"] != run.train.model:
        raise UserError(f"{run.train.out} holds a {old['model']} run; choose another --out for {run.train.model}")


def reached_last_step(cfg: TrainConfig) -> bool:
    """Whether the run folder's latest checkpoint is at or past --steps (the trainer then has
    nothing to do)."""
    from genscale.checkpoints import list_checkpoints

    found = list_checkpoints(cfg.out)
    return bool(found) and found[-1][0] >= cfg.steps


def check_same_options(run: RunConfig) -> None:
    """Refuse to resume checkpoints with model options that give their weights another meaning.

    A resume takes its options from the flags (and presets), not from the run's config.json: a
    run trained with --schedule linear and resumed without it went on under the cosine schedule,
    and even a finished run re-run with other flags had config.json rewritten, so that sample.py
    read its weights under the new options (judge accuracy 0.98 -> 0.32). Shape changes are also
    caught later by check_checkpoint_fits; the family lists what may change (RESUME_MAY_CHANGE)."""
    from genscale.checkpoints import latest_checkpoint

    if latest_checkpoint(run.train.out) is None:  # nothing trained yet: the options start afresh
        return
    try:
        old = json.loads((Path(run.train.out) / "config.json").read_text())["options"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no readable record (check_same_run refuses a damaged one): the shape check remains
    if not isinstance(old, dict):
        return
    was = changed_options(old, run.options, getattr(family_module(run.train.model), "RESUME_MAY_CHANGE", ()))
    if was:
        raise UserError(f"the checkpoints in {run.train.out} were trained with {was}; resume with {was} (or "
                        f"--config {Path(run.train.out) / 'config.json'}) or choose another --out")


def warn_changed_stream(run: RunConfig) -> None:
    """Warn when a resumed run's data stream changes (after the checks that could still refuse it)."""
    from genscale.checkpoints import latest_checkpoint

    if latest_checkpoint(run.train.out) is None:  # nothing to resume: the run starts afresh
        return
    old = _saved_train_flags(run)
    changed = [k for k in STREAM_FLAGS if old is not None and k in old and old[k] != getattr(run.train, k)]
    if changed:
        print(f"warning: resuming {run.train.out} with changed {', '.join(changed)}; the run continues but "
              "will not match an uninterrupted one", file=sys.stderr)


def check_attention_levels(family) -> None:
    """--attention-res names pixel resolutions of U-Net levels; one that no level has would silently
    build no attention (the 8 px preset's 4 at --image-size 32, say)."""
    net = family.nets.get("model")
    net = getattr(net, "unet", net)  # ldm: the U-Net inside the latent model
    refuse_unused_attention(getattr(net, "unused_attention", ()), getattr(net, "level_resolutions", []))


def refuse_unused_attention(unused, levels: list[int]) -> None:
    if unused:
        raise UserError(f"--attention-res {','.join(map(str, unused))} is not a resolution of this U-Net, whose levels "
                        f"work at {','.join(map(str, levels))} px; choose among those (e.g. --attention-res "
                        f"{levels[-1]}), or --attention-res '' for none")


def check_checkpoint_fits(run: RunConfig, family) -> None:
    """Refuse to resume when the latest checkpoint's networks have other shapes than the ones these
    flags build (e.g. a changed --base-width): found here, before config.json is rewritten with the
    new flags, the run stays readable by sample.py and the message names the flags to restore."""
    from genscale.checkpoints import latest_checkpoint

    latest = latest_checkpoint(run.train.out)
    if latest is None:
        return
    try:
        saved = torch.load(latest / "ema.pt", map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a damaged checkpoint: the trainer's resume names it
        return
    fits = all(name in family.nets and {k: tuple(v.shape) for k, v in family.nets[name].state_dict().items()}
               == {k: tuple(v.shape) for k, v in state.items()} for name, state in saved.items())
    if fits:
        return
    changed = ""
    try:
        record = json.loads((Path(run.train.out) / "config.json").read_text())
        old = {**{k: record["train"][k] for k in SHAPE_FLAGS if k in record["train"]}, **record["options"]}
        new = json.loads(json.dumps({**{k: getattr(run.train, k) for k in SHAPE_FLAGS},
                                     **dataclasses.asdict(run.options)}))
        changed = " ".join(flag_with_value(k, old[k]) for k in sorted(old) if k in new and old[k] != new[k])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    hint = f"resume with {changed}" if changed else "resume with the run's original options"
    raise UserError(f"the checkpoints in {run.train.out} hold networks of another shape than these options "
                    f"build; {hint} or choose another --out")


def check_tracker(log_with: str) -> None:
    """Accelerate only warns when the tracker's package is missing and then logs nowhere: a run
    that asked for tensorboard would end without its logs."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    missing = {"tensorboard": ("tensorboard", is_tensorboard_available, "pip install -e .[tracking]"),
               "wandb": ("wandb", is_wandb_available, "pip install wandb")}.get(log_with)
    if missing and not missing[1]():
        raise UserError(f"--log-with {log_with} needs the {missing[0]} package ({missing[2]}), which is not installed")


def grid_labels(info: DataInfo, per_class: int = 8) -> torch.Tensor | None:
    """One row per class (at most 10 classes shown), or None for an unconditional model."""
    if info.num_classes == 0:
        return None
    classes = min(info.num_classes, 10)
    return torch.arange(classes).repeat_interleave(per_class)


def main(argv: list[str] | None = None) -> int:
    run = parse_train_args(argv)
    if run.train.model == "ldm" and not (run.options.autoencoder or run.options.autoencoder_config):
        check_before_writing(run)  # the ldm run's own checks, before minutes of autoencoder training
        autoencoder = train_autoencoder_first(run)
        if autoencoder is None:  # stopped (SIGTERM, Ctrl-C) while training it: the same command resumes
            return 0
        run.options.autoencoder = autoencoder
    if train(run) and os.environ.get("RANK", "0") == "0":
        run_status.report_finished()  # complete: a SLURM job warned of its time limit needs no requeue
    return 0


def train_autoencoder_first(run: RunConfig) -> str | None:
    """``--model ldm`` without --autoencoder: train the ldm family's KL autoencoder recipe on the
    same data into OUT/autoencoder (a vae run of its own, resumed like any run); its folder, or
    None when it was stopped before its last step."""
    from genscale.families.ldm import AUTOENCODER_FOLDER, AUTOENCODER_RECIPE
    from genscale.models.unet import level_resolutions

    cfg = run.train
    # Refused now rather than after the autoencoder's minutes of training: the U-Net's levels
    # follow from the recipe's latent size.
    latent = max(2, cfg.image_size // int(AUTOENCODER_RECIPE["downsample"]))  # 1x1 latents are folded to 2x2
    levels = level_resolutions(latent, run.options.channel_mults)
    refuse_unused_attention(tuple(r for r in run.options.attention_res if r not in levels), levels)
    out = Path(cfg.out) / AUTOENCODER_FOLDER
    # The data stream's flags carry over; batch size, lr and steps are the vae preset's (the recipe's
    # optimisation was measured with them), steps overridable with --autoencoder-steps.
    argv = ["--model", "vae", "--data", cfg.data, "--image-size", str(cfg.image_size), "--seed", str(cfg.seed),
            "--num-workers", str(cfg.num_workers), "--shuffle-buffer", str(cfg.shuffle_buffer),
            "--batches-per-epoch", str(cfg.batches_per_epoch), "--flip" if cfg.flip else "--no-flip",
            "--out", str(out)]
    if cfg.log_with:
        argv += ["--log-with", cfg.log_with]
    if cfg.channels_last is not None:  # not given: the autoencoder's run takes the default too
        argv.append("--channels-last" if cfg.channels_last else "--no-channels-last")
    for flag, value in AUTOENCODER_RECIPE.items():
        argv += [f"--{flag}", value]
    if cfg.cache_dir:
        argv += ["--cache-dir", cfg.cache_dir]
    if run.options.autoencoder_steps:
        argv += ["--steps", str(run.options.autoencoder_steps)]
    ae_run = parse_train_args(argv)
    if os.environ.get("RANK", "0") == "0":
        print(f"ldm: no --autoencoder given, so a KL autoencoder is trained first into {out} "
              f"({ae_run.train.steps} steps, --autoencoder-steps to change)", flush=True)
    # Whether it finished comes from the training loop, which every rank left at the same step,
    # not from each rank's directory listing (a shared filesystem's cache can differ per node).
    return str(out) if train(ae_run, last=False) else None


def check_before_writing(run: RunConfig) -> None:
    """What can be refused from the flags and the run folder alone."""
    check_output_path(run.train.out, "--out", folder=True)
    check_tracker(run.train.log_with)
    check_same_run(run)
    check_same_options(run)


def train(run: RunConfig, last: bool = True) -> bool:
    """Train one run: True when it reached its last step, False when a stop request (SIGTERM,
    Ctrl-C) ended it first, on every rank alike. ``last`` False keeps the process group for a run
    that follows in the same launch."""
    cfg = run.train
    check_before_writing(run)
    from genscale.checkpoints import latest_checkpoint
    from genscale.data import resolve_data
    from genscale.launch import make_accelerator
    from genscale.trainer import Trainer

    shards = resolve_data(cfg.data, "train", cfg.cache_dir or None)
    module = family_module(cfg.model)
    info = shards.data_info(image_size=cfg.image_size)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and every re-run
    try:
        family = module.FAMILY(cfg, run.options, info)
    except ValueError as err:  # e.g. an image size the networks cannot take
        raise UserError(str(err)) from None
    check_attention_levels(family)
    if shards.image_size and shards.image_size != cfg.image_size and os.environ.get("RANK", "0") == "0":
        # Presets are sized for the embedded digits (8 px): say so when the data is larger or smaller
        # (after the checks above: a refused --image-size gets its one sentence alone).
        print(f"note: {cfg.data} holds {shards.image_size} px images; training at --image-size {cfg.image_size} "
              "(resized)", file=sys.stderr)
    check_checkpoint_fits(run, family)
    if cfg.init_from and latest_checkpoint(cfg.out) is None:  # a new run: a resume has weights of its own
        source = init_from.load_weights(run, family, getattr(module, "RESUME_MAY_CHANGE", ()))
        if os.environ.get("RANK", "0") == "0":
            print(f"starting from the weights of {source}", file=sys.stderr)
    if os.environ.get("RANK", "0") == "0":
        warn_changed_stream(run)
    if cfg.eval_every > 0:  # before the run folder and the process group: nothing to clean up
        from genscale.metrics.training import check_family_fits, check_settings

        check_family_fits(cfg.eval_metric, family, cfg.model)
        check_settings(run, info)

    out = Path(cfg.out)
    if os.environ.get("RANK", "0") == "0":  # the launch's main process; the others follow it
        lock_run_folder(out)
    make_folder(out, "--out")
    acc = make_accelerator(cfg.grad_accum, out, cfg.log_with)
    stream = batch_stream(cfg, shards, info, acc.process_index, acc.num_processes)
    evaluator = None
    if cfg.eval_every > 0:
        from genscale.metrics.training import TrainingEvaluator

        evaluator = TrainingEvaluator(run, info, acc)
    trainer = Trainer(run, family, stream, acc, grid_labels(info), evaluator)
    if acc.is_main_process and not reached_last_step(cfg):  # a finished run keeps the record of its weights
        record = run.to_dict()
        record.update({
            "data_info": dataclasses.asdict(info),
            "world_size": acc.num_processes,
            "num_machines": _num_machines(acc.num_processes),
            "distributed_type": str(acc.distributed_type),
            "mixed_precision": acc.mixed_precision,
            "device": str(acc.device),
            "versions": library_versions(),
            "git_commit": git_commit(),
            "slurm": {k: os.environ[k] for k in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "SLURM_JOB_NODELIST")
                      if k in os.environ},
            "parameters": {n: sum(p.numel() for p in m.parameters()) for n, m in family.nets.items()},
        })
        write_json_atomic(out / "config.json", record)
    if cfg.log_with:
        acc.init_trackers(out.name, config=run.to_dict()["train"])
    trainer.fit(end_training=last)
    return trainer.finished


def _num_machines(world: int) -> int:
    """Machines in the job: the launcher exports the processes per machine as LOCAL_WORLD_SIZE."""
    return max(1, world // int(os.environ.get("LOCAL_WORLD_SIZE", world) or world))


if __name__ == "__main__":
    run_main(main)
