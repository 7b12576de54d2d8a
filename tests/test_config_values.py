"""Values in a --config file are read as strictly as the same flags on the command line: a value
that is not of the option's type, or that is left empty (null), is refused in one sentence instead
of being coerced (``steps: 4.7`` trained 4 steps, ``flip: ture`` turned flips off, ``batch_size:
true`` gave batch size 1) or crashing later (``data:`` gave a TypeError in the data loader). Also
the --seed range, which torch.manual_seed overflowed with a traceback after the run folder was made."""
from __future__ import annotations

import pytest

from genscale.config import RunConfig, parse_train_args
from genscale.errors import UserError


def from_file(tmp_path, text: str, *flags: str):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text + "\n")
    return parse_train_args(["--config", str(cfg), *flags])


def option(run, name: str):
    return getattr(run.train, name) if hasattr(run.train, name) else getattr(run.options, name)


def refused(tmp_path, text: str, shown: str) -> None:
    name = text.split(":")[0]
    with pytest.raises(UserError, match=rf"^option {name} in the configuration has a bad value ") as err:
        from_file(tmp_path, text)
    assert shown in str(err.value) and "\n" not in str(err.value), str(err.value)


def taken(tmp_path, text: str, value) -> None:
    got = option(from_file(tmp_path, text), text.split(":")[0])
    assert got == value and type(got) is type(value), (text, got)


def test_int_options_take_whole_numbers_only(tmp_path):
    refused(tmp_path, "steps: 4.7", "4.7")  # trained int(4.7) = 4 steps
    refused(tmp_path, "batch_size: true", "True")  # was batch size 1
    refused(tmp_path, "steps: .inf", "inf")  # was an OverflowError traceback
    refused(tmp_path, "channel_mults: [1.5, 2]", "[1.5, 2]")
    refused(tmp_path, "channel_mults: [true, 2]", "[True, 2]")
    taken(tmp_path, "steps: 4.0", 4)  # an integral float is that integer
    taken(tmp_path, "channel_mults: [1.0, 2]", (1, 2))  # likewise in a list (was refused)
    taken(tmp_path, "steps: '12'", 12)  # the text the flag takes
    taken(tmp_path, "channel_mults: '1,2,2'", (1, 2, 2))
    # a quoted value is the flag's text, read the same way: argparse's int() refuses these too
    for text in ("4.7", "true", "1e3"):
        refused(tmp_path, f"steps: '{text}'", text)
        with pytest.raises(UserError):
            parse_train_args(["--steps", text])


def test_bool_options_take_the_usual_spellings_only(tmp_path):
    for spelling, value in [("true", True), ("false", False), ("yes", True), ("no", False), ("on", True),
                            ("off", False), ("1", True), ("0", False), ("'True'", True), ("'OFF'", False),
                            ("'1'", True), ("'no'", False)]:
        taken(tmp_path, f"flip: {spelling}", value)
    refused(tmp_path, "flip: ture", "'ture'")  # a typo: was flips off
    refused(tmp_path, "flip: 2", "2")  # was flips off
    refused(tmp_path, "flip: 0.5", "0.5")
    refused(tmp_path, "keep_best: maybe", "'maybe'")


def test_float_and_text_options_refuse_other_types(tmp_path):
    refused(tmp_path, "lr: true", "True")  # was lr 1.0
    refused(tmp_path, "data: true", "True")  # was the data spec "True"
    refused(tmp_path, "data: [a, b]", "['a', 'b']")  # was the data spec "['a', 'b']"
    refused(tmp_path, "out: 0755", "493")  # YAML 1.1 reads an octal int: the folder would have been 493
    taken(tmp_path, "lr: '1e-3'", 1e-3)  # YAML 1.1 reads 1e-3 as a string; --lr 1e-3 takes it
    taken(tmp_path, "lr: 1", 1.0)
    taken(tmp_path, "out: '0755'", "0755")


@pytest.mark.parametrize("text", ["steps: 4\ndata:", "out:", "steps:", "flip:", "lr: null", "channel_mults:",
                                  "schedule: ~", "model:"])
def test_an_empty_value_is_refused(tmp_path, text):
    # data: null crashed in the data loader, steps: null in validation; out: null silently meant
    # runs/MODEL, flip: null false, model: null ddpm. Leaving the key out is how to get the default.
    name = text.splitlines()[-1].split(":")[0]
    with pytest.raises(UserError, match=rf"^option {name} in the configuration has no value; give one or leave "
                                        rf"the key out for the default$"):
        from_file(tmp_path, text)


def test_a_flag_fills_a_key_the_file_left_empty(tmp_path):
    with pytest.raises(UserError, match="option data in the configuration has no value"):
        from_file(tmp_path, "data:")
    # the command line takes precedence over the file, so the flag's value is the one used
    assert from_file(tmp_path, "data:", "--data", "digits").train.data == "digits"


@pytest.mark.parametrize("seed", [str(10**20), str(2**63), "-1"])
def test_a_seed_out_of_range_is_refused(tmp_path, seed):
    # 10**20 raised "Overflow when unpacking long long" from torch.manual_seed after the run folder was made
    with pytest.raises(UserError, match=rf"^--seed must be between 0 and 2\*\*63 - 1, got {seed}$"):
        parse_train_args(["--seed", seed, "--out", str(tmp_path / "r")])
    with pytest.raises(UserError, match="--seed must be between"):
        from_file(tmp_path, f"seed: {seed}")
    assert parse_train_args(["--seed", str(2**63 - 1)]).train.seed == 2**63 - 1


def test_a_run_config_json_with_an_empty_value_is_refused():
    # sample.py reads config.json through RunConfig.from_dict: a hand-edited null is named, not a TypeError later
    with pytest.raises(UserError, match="^option steps in config.json has no value"):
        RunConfig.from_dict({"train": {"model": "ddpm", "steps": None}, "options": {}})
