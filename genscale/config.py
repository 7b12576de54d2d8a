"""Typed training configuration: common flags, per-family options and presets, CLI parsing.

Precedence, lowest first: TrainConfig defaults < the family's PRESET < ``--config FILE`` < flags.
Every dataclass field becomes a ``--kebab-case`` flag, so the YAML/JSON keys are the same names
(with ``_`` or ``-``). A file's values are read as strictly as the flags: a whole number for an
integer option (4.0 is 4, 4.7 and true are refused), true/false/yes/no/on/off/1/0 for a switch,
quoted text for a text option, and no empty (null) values: leave a key out to get its default.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genscale.cli import ArgumentParser
from genscale.errors import UserError
from genscale.families import DESCRIPTIONS, FAMILIES, family_module
from genscale.lr_schedule import SCHEDULES


@dataclass
class TrainConfig:
    """Flags shared by every family (per-process numbers unless said otherwise)."""

    model: str = "ddpm"
    data: str = "digits"  # builtin name, folder of shards, one .tar, or a brace pattern
    out: str = ""  # run folder; default runs/<model>
    steps: int = 3000  # optimizer steps
    batch_size: int = 64  # per process and per micro-batch
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    init_from: str = ""  # a run or checkpoint folder whose weights a new run starts from (genscale/init_from.py)
    lr_schedule: str = "constant"  # constant | linear | cosine (decay to 0 at --steps); genscale/lr_schedule.py
    lr_decay_start: int = 0  # the decay starts at the later of this step and the warm-up's end
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    ema_decay: float = 0.999
    image_size: int = 16
    seed: int = 0
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 500  # 0 disables periodic grids
    log_every: int = 10
    num_workers: int = 1  # data loader workers per process
    shuffle_buffer: int = 1000
    batches_per_epoch: int = 100  # per process; every rank reads exactly this many per epoch
    flip: bool = False  # random horizontal flips (off by default: they change digits)
    channels_last: bool | None = None  # NHWC networks and batches; None (not given): off for now
    log_with: str = ""  # "", "tensorboard" or "wandb"
    cache_dir: str = ""  # embedded datasets and judges; default $GENSCALE_CACHE or ~/.cache/genscale
    eval_every: int = 0  # evaluate every N optimizer steps on all ranks (0 = never)
    eval_metric: str = "fid"  # fid | kid | accuracy | psnr (psnr: inpainting runs)
    eval_num: int = 1000  # samples per evaluation, all ranks together
    eval_features: str = "judge"  # judge (offline, digits) | inception (clean-fid's weights)
    keep_best: bool = False  # also keep the checkpoint with the best --eval-metric score


COMMON_HELP = {
    "data": "builtin dataset (digits, faces, photos), a folder of .tar shards, a .tar, or a brace pattern",
    "out": "run folder (default runs/MODEL); re-running with the same folder resumes",
    "steps": "number of optimizer steps",
    "batch_size": "batch size per process and micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "lr_schedule": "learning rate after the warm-up: constant, or a linear or cosine decay to 0 at --steps",
    "lr_decay_start": "step where the decay begins (default: the end of the warm-up)",
    "init_from": "start a new run's networks from this run's (or checkpoint folder's) trained weights; "
                 "same model and options; ignored once --out has checkpoints",
    "grad_clip": "clip the global gradient norm to this value (0 = off)",
    "ckpt_every": "save a checkpoint every N steps",
    "sample_every": "write a sample grid every N steps (0 = never)",
    "log_with": "also log to an accelerate tracker: tensorboard or wandb",
    "batches_per_epoch": "batches each process reads per data epoch",
    "eval_every": "evaluate every N steps on all ranks (0 = never); see --eval-metric, --eval-num",
    "eval_metric": "fid, kid, accuracy or psnr (inpainting runs)",
    "eval_num": "samples per evaluation, all ranks together",
    "eval_features": "judge (offline) or inception (clean-fid's weights)",
    "keep_best": "also keep the checkpoint with the best evaluation score in checkpoints/best",
    "channels_last": "convolutional networks and image batches in channels_last (NHWC) memory "
                     "(default off: its gain on GPUs is not measured yet)",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in str(text).replace(" ", "").strip("()[]").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _converter(tp: Any):
    """argparse type for a dataclass field annotation (bools are handled separately)."""
    if isinstance(tp, str):  # postponed annotations
        tp = eval(tp, {"tuple": tuple, "int": int, "float": float, "str": str, "bool": bool})
    origin = typing.get_origin(tp)
    if origin is tuple:
        return _parse_ints
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _converter(inner[0])
    return tp


def _add_fields(parser: argparse.ArgumentParser, cls: type, helps: dict[str, str]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": helps.get(f.name)}
        if _converter(tp) is bool:  # a switch; bool | None: None (not given) lets the run decide
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(_flag(f.name), type=_converter(tp), metavar=f.name.upper(), **kwargs)


def _load_file(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} {'is a folder' if p.is_dir() else 'does not exist'}")
    try:
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as err:  # noqa: BLE001 - any parse failure is the user's file
        raise UserError(f"config file {path} could not be parsed: {err}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of option names to values")
    if isinstance(data.get("train"), dict) and isinstance(data.get("options"), dict):
        # a run's config.json: its two sections are the flags (a run's own folder resumes it with --out)
        data = {k: v for k, v in {**data["train"], **data["options"]}.items() if k != "out"}
    return {k.replace("-", "_"): v for k, v in data.items()}


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _no_value(name: str, source: str) -> UserError:
    # no option takes None: a key left empty is more likely a value forgotten than a wish for the
    # default (data: null crashed in the loader, out: null silently meant runs/MODEL)
    return UserError(f"option {name} in {source} has no value; give one or leave the key out for the default")


def _file_int(value: Any) -> int:
    """An integer option's value from a file: an int, an integral float (YAML's 4.0 or 1.0e+3),
    or the text the flag would take (argparse's int()). Never a bool, which Python counts as an
    int (``batch_size: true`` was 1), nor a fraction (``steps: 4.7`` trained int(4.7) = 4 steps)."""
    if isinstance(value, bool):
        raise TypeError(value)
    if isinstance(value, float):
        # beyond 2**53 a float no longer says which integer was meant
        if not value.is_integer() or abs(value) > 2**53:
            raise ValueError(value)
        return int(value)
    if isinstance(value, (int, str)):
        return int(value)
    raise TypeError(value)


def _file_bool(value: Any) -> bool:
    """A switch's value from a file: YAML's own booleans or one of their usual spellings. Anything
    else is refused: ``flip: ture`` (a typo) used to mean false."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, (int, str)) else None
    if text not in _TRUE + _FALSE:
        raise ValueError(value)
    return text in _TRUE


def _file_float(value: Any) -> float:
    """A number, or the text the flag would take (YAML 1.1 reads 1e-3 as text); not a bool."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(value)
    return float(value)


def _file_str(value: Any) -> str:
    """Text only: YAML turns an unquoted 0755 into 493 and yes into true, so converting numbers
    and booleans back to text would not give what was typed."""
    if not isinstance(value, str):
        raise TypeError(value)
    return value


def _file_ints(value: Any) -> tuple[int, ...]:
    """A list of integers (each read as ``_file_int``) or the flag's comma-separated text."""
    if isinstance(value, (list, tuple)):
        return tuple(_file_int(v) for v in value)
    if isinstance(value, bool):
        raise TypeError(value)
    return _parse_ints(value)


_FILE_READERS = {int: (_file_int, "a whole number"), float: (_file_float, "a number"),
                 bool: (_file_bool, "true or false"), str: (_file_str, "text (quote it)")}


def _coerce(cls: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """Read file values (and flags, already typed by argparse) as each field's type, refusing
    what is not clearly of that type rather than coercing it."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        if v is None and f.default is None:  # bool | None (--channels-last): null is "not given", as in the
            out[f.name] = None               # config.json of a run recorded before the run resolved it
            continue
        if v is None:
            raise _no_value(f.name, source)
        conv = _converter(hints[f.name])
        read, expected = ((_file_ints, "comma-separated whole numbers") if conv is _parse_ints
                          else _FILE_READERS.get(conv, (conv, f"a {getattr(conv, '__name__', 'value')}")))
        try:
            out[f.name] = read(v)
        except (TypeError, ValueError, OverflowError, argparse.ArgumentTypeError):
            raise UserError(f"option {f.name} in {source} has a bad value {v!r}: expected {expected}") from None
    return out


@dataclass
class RunConfig:
    """The resolved configuration of one run."""

    train: TrainConfig
    options: Any  # the family's Options dataclass
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"train": dataclasses.asdict(self.train), "options": dataclasses.asdict(self.options)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        train_values = _coerce(TrainConfig, data.get("train", {}), "config.json")
        train = TrainConfig(**train_values)
        if train.model not in FAMILIES:
            raise UserError(f"the run was made with model {train.model!r}, which this version does not know")
        module = family_module(train.model)
        options = module.Options(**_coerce(module.Options, data.get("options", {}), "config.json"))
        return cls(train, options)


def model_list() -> str:
    return "\n".join(f"  {name:<12} {DESCRIPTIONS.get(name, '')}" for name in FAMILIES)


def parse_train_args(argv: list[str] | None = None) -> RunConfig:
    """Parse train.py's command line into a RunConfig (raises UserError on bad input)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model")
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    file_values = _load_file(known.config) if known.config else {}
    model = known.model if known.model is not None else file_values.get("model", TrainConfig.model)
    if model is None:  # "model:" left empty in the file: was the default ddpm, silently
        raise _no_value("model", "the configuration")
    if not isinstance(model, str) or model not in FAMILIES:
        raise UserError(f"unknown model {model!r}; choose one of: {', '.join(FAMILIES)}")
    module = family_module(model)

    parser = ArgumentParser(
        prog="genscale/train.py",
        description="Train an image generative model. Models:\n" + model_list(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run with the same --out again to resume. Pass --model NAME --help for that model's options.",
    )
    parser.add_argument("--config", help="YAML or JSON file with the same keys as the flags "
                                         "(leave a key out for its default)")
    common = parser.add_argument_group("training")
    _add_fields(common, TrainConfig, COMMON_HELP)
    fam = parser.add_argument_group(f"{model} options")
    _add_fields(fam, module.Options, getattr(module, "OPTION_HELP", {}))
    try:
        args = vars(parser.parse_args(argv))
    except SystemExit as exit_:  # argparse already printed its one-line usage error
        raise UserError("", exit_code=int(exit_.code or 0)) from None
    args.pop("config", None)

    merged: dict[str, Any] = dict(getattr(module, "PRESET", {}))
    merged.update(file_values)
    merged.update(args)
    merged["model"] = model
    unknown = set(file_values) - {f.name for f in dataclasses.fields(TrainConfig)} - {
        f.name for f in dataclasses.fields(module.Options)}
    if unknown:
        raise UserError(f"config file {known.config} has unknown keys: {', '.join(sorted(unknown))}")
    train = TrainConfig(**_coerce(TrainConfig, merged, "the configuration"))
    options = module.Options(**_coerce(module.Options, merged, "the configuration"))
    if not train.out:
        train.out = str(Path("runs") / model)
    validate(train)
    check_finite(options)
    if hasattr(options, "validate"):
        options.validate()
    return RunConfig(train, options)


def check_finite(values: Any) -> None:
    """Every float option of a config dataclass is finite: nan passes every range check (all
    comparisons are false) and inf turns the loss into inf a few steps later."""
    for f in dataclasses.fields(values):
        value = getattr(values, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{_flag(f.name)} must be a finite number, got {value}")


def validate(cfg: TrainConfig) -> None:
    check_finite(cfg)
    positive = ["steps", "batch_size", "grad_accum", "image_size", "ckpt_every", "batches_per_epoch",
                "keep_checkpoints", "log_every"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UserError(f"{_flag(name)} must be a positive number, got {getattr(cfg, name)}")
    for name in ["eval_every", "sample_every", "warmup_steps", "lr_decay_start", "num_workers", "grad_clip", "weight_decay", "shuffle_buffer"]:
        if getattr(cfg, name) < 0:
            raise UserError(f"{_flag(name)} must not be negative, got {getattr(cfg, name)}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise UserError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    if cfg.lr <= 0:
        raise UserError(f"--lr must be positive, got {cfg.lr}")
    check_lr_schedule(cfg)
    if cfg.init_from and cfg.model == "ldm":  # refused before the autoencoder's minutes of training
        raise UserError("--init-from is not supported for ldm yet (its U-Net is tied to the autoencoder it was "
                        "trained with)")
    # torch.manual_seed overflows past 64 bits (a traceback after the run folder was made); the
    # non-negative int64 range also suits numpy's SeedSequence and the seeds derived from it
    if not 0 <= cfg.seed < 2**63:
        raise UserError(f"--seed must be between 0 and 2**63 - 1, got {cfg.seed}")
    if cfg.keep_best and cfg.eval_every <= 0:
        raise UserError("--keep-best keeps the best evaluated checkpoint, so it needs --eval-every N")
    if cfg.log_with not in ("", "tensorboard", "wandb"):
        raise UserError(f"--log-with must be tensorboard or wandb, got {cfg.log_with!r}")


def check_lr_schedule(cfg: TrainConfig) -> None:
    """A schedule that names a decay must have steps left to decay over."""
    if cfg.lr_schedule not in SCHEDULES:
        raise UserError(f"--lr-schedule must be one of {', '.join(SCHEDULES)}, got {cfg.lr_schedule!r}")
    if cfg.lr_schedule == "constant":
        if cfg.lr_decay_start:
            raise UserError(f"--lr-decay-start {cfg.lr_decay_start} has no effect with --lr-schedule constant; "
                            "add --lr-schedule linear or cosine")
        return
    start = max(cfg.warmup_steps, cfg.lr_decay_start)
    if start >= cfg.steps:
        what = f"--lr-decay-start {cfg.lr_decay_start}" if cfg.lr_decay_start >= cfg.warmup_steps else \
            f"the warm-up (--warmup-steps {cfg.warmup_steps})"
        raise UserError(f"--lr-schedule {cfg.lr_schedule} decays after {what}, which ends at or after "
                        f"--steps {cfg.steps}: the rate would never decay")


def flag_with_value(name: str, value) -> str:
    """The command-line spelling of an option's value, as config.json records it."""
    flag = _flag(name)
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    return f"{flag} {','.join(map(str, value)) if isinstance(value, list) else value}"


def changed_options(old: dict, options: Any, free=()) -> str:
    """The options of a run's config.json (``old``) that ``options`` changes, except those in
    ``free``, spelled as the flags that give the old values back ("" when none changed)."""
    new = json.loads(json.dumps(dataclasses.asdict(options)))  # tuples as config.json has them: lists
    return " ".join(flag_with_value(k, old[k]) for k in sorted(old) if k in new and k not in free and old[k] != new[k])
