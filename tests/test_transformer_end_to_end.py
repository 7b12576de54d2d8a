"""The transformer through train.py: exact resume and a two-process launch."""
from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_inpaint_end_to_end import TINY, launch_two_processes, train


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_resumed_transformer_run_equals_the_uninterrupted_one(cache, tmp_path):
    train("transformer", tmp_path / "full", cache, steps=4)
    train("transformer", tmp_path / "cut", cache, steps=2)
    train("transformer", tmp_path / "cut", cache, steps=4)
    name = Path("checkpoints") / "step-00000004" / "model.safetensors"
    a, b = load_file(str(tmp_path / "full" / name)), load_file(str(tmp_path / "cut" / name))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_two_process_transformer_is_one_job(cache, tmp_path):
    config = launch_two_processes("transformer", tmp_path / "ddp", cache, 29581, *TINY["transformer"])
    assert config["world_size"] == 2
