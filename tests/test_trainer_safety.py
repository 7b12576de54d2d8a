"""What must never happen to a run's checkpoints: non-finite weights published, compile-wrapper
keys in the saved weights, a best or latest checkpoint lost to a kill between two renames,
a rename reaching the disk before the files, an arbitrary pickle run on resume; and the launch
combinations the trainer refuses (FSDP; fp16 + accumulation with two optimizers)."""
from __future__ import annotations

import json
import os
import shutil
import types

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from genscale import checkpoints as ckpt
from genscale import launch as launch_module
from genscale import trainer as trainer_module
from genscale.config import TrainConfig
from genscale.errors import UserError
from genscale.families import family_module
from genscale.families.base import DataInfo
from genscale.launch import make_accelerator
from genscale.trainer import Trainer
from tests.test_trainer import train_toy, weights
from tests.toy_family import ToyFamily, stream_factory, toy_run

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # each test gets a new Accelerate state


def all_finite(path) -> bool:
    tensors = list(load_file(str(path / "model.safetensors")).values())
    tensors += [t for sd in torch.load(path / "ema.pt", weights_only=True).values() for t in sd.values()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


# ---- 1. divergence --------------------------------------------------------------------------
def poison_call(number: int):
    """A hook making the ``number``-th training_step call (1-based) see NaN inputs."""
    def hook(family):
        original = family.training_step

        def step(batch, optimize):
            if family.calls + 1 == number:
                batch = {**batch, "x": batch["x"] * float("nan")}
            return original(batch, optimize)

        family.training_step = step
    return hook


def test_nan_in_a_micro_batch_before_the_last_stops_the_run(tmp_path):
    # grad_accum 2: call 15 is micro-batch 0 of step 8 (done = 8, a checkpoint step); micro 1 is finite
    with pytest.raises(UserError, match="non-finite at step 8; the last good checkpoint was kept"):
        train_toy(tmp_path, family_hook=poison_call(15), steps=12, grad_accum=2, ckpt_every=4)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4]
    assert all_finite(ckpt.latest_checkpoint(tmp_path))


def test_non_finite_weights_are_never_published_even_with_finite_losses(tmp_path):
    def corrupt_in_step_8(family):
        original = family.training_step

        def step(batch, optimize):
            logs = original(batch, optimize)
            if family.calls == 8:  # a NaN update from a finite loss (e.g. an overflowing gradient)
                with torch.no_grad():
                    family.nets["model"].weight.fill_(float("nan"))
            return logs

        family.training_step = step

    with pytest.raises(UserError, match="a weight became non-finite at step 8; the last good checkpoint"):
        train_toy(tmp_path, family_hook=corrupt_in_step_8, steps=12, jitter=0.0, log_every=100)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4]
    assert all_finite(ckpt.latest_checkpoint(tmp_path))


# ---- 2. torch.compile -------------------------------------------------------------------------
def test_compiled_run_saves_plain_keys_and_resumes(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "EAGER")  # what --dynamo_backend sets
    trainer, _ = train_toy(tmp_path, steps=4, jitter=0.0)
    assert type(trainer.family.nets["model"]).__name__ == "OptimizedModule"  # it really compiled
    ema = torch.load(ckpt.latest_checkpoint(tmp_path) / "ema.pt", weights_only=True)
    assert sorted(ema["model"]) == ["bias", "weight"]
    torch.testing.assert_close(ema["model"]["weight"], trainer.ema.nets["model"].weight)
    resumed, code = train_toy(tmp_path, steps=6, jitter=0.0)
    assert code == 0 and [s for s, _ in ckpt.list_checkpoints(tmp_path)][-1] == 6
    assert resumed.ema.updates == 6  # the EMA state came back from step 4 and went on


@pytest.mark.parametrize("compiled_first", [True, False])
def test_compiled_and_plain_launches_resume_each_other(tmp_path, monkeypatch, compiled_first):
    """The README promises that adding or dropping --dynamo_backend on a resume works."""
    def launch(compiled: bool, steps: int):
        if compiled:
            monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "EAGER")
        else:
            monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
        trainer, code = train_toy(tmp_path, steps=steps, jitter=0.0)
        assert code == 0 and (type(trainer.family.nets["model"]).__name__ == "OptimizedModule") == compiled
        return trainer

    launch(compiled_first, 4)
    resumed = launch(not compiled_first, 6)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)][-1] == 6 and resumed.ema.updates == 6


# ---- 3. FSDP ----------------------------------------------------------------------------------
def test_fsdp_is_refused_in_one_sentence(tmp_path, monkeypatch):
    class FsdpAccelerator(Accelerator):  # FSDP needs GPUs; only the distributed type matters here
        distributed_type = property(lambda self: DistributedType.FSDP)

    monkeypatch.setattr(launch_module, "Accelerator", FsdpAccelerator)
    with pytest.raises(UserError, match=r"^FSDP is not supported yet .*accelerate_configs/multi_gpu\.yaml$"):
        make_accelerator(1, tmp_path)
    assert not (trainer_module.Path(__file__).parents[1] / "accelerate_configs" / "fsdp.yaml").exists()


def test_deepspeed_zero3_counts_as_sharded_and_zero2_does_not():
    from types import SimpleNamespace

    from genscale.launch import sharded_weights

    def launch(kind, stage=None):
        plugin = SimpleNamespace(zero_stage=stage) if stage is not None else None
        return SimpleNamespace(distributed_type=kind, state=SimpleNamespace(deepspeed_plugin=plugin))

    assert sharded_weights(launch(DistributedType.DEEPSPEED, 3)) == "DeepSpeed ZeRO-3"
    assert sharded_weights(launch(DistributedType.DEEPSPEED, 2)) == ""
    assert sharded_weights(launch(DistributedType.FSDP)) == "FSDP"
    assert sharded_weights(launch(DistributedType.MULTI_GPU)) == ""


# ---- 4. fp16 with two optimizers and accumulation ---------------------------------------------
def gan_trainer(tmp_path, grad_accum: int) -> Trainer:
    module = family_module("gan")
    cfg = TrainConfig(model="gan", out=str(tmp_path), image_size=8, batch_size=4, grad_accum=grad_accum)
    family = module.FAMILY(cfg, module.Options(), DataInfo("test", 1, 8, 0))
    run = types.SimpleNamespace(train=cfg, options=module.Options())
    return Trainer(run, family, lambda start: iter(()), make_accelerator(grad_accum, tmp_path))


@pytest.mark.parametrize("precision, accum, refused", [("fp16", 2, True), ("fp16", 1, False), ("bf16", 2, False)])
def test_fp16_accumulation_with_two_optimizers_is_refused(tmp_path, monkeypatch, precision, accum, refused):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", precision)  # what the launcher sets; no GPU needed
    if refused:
        with pytest.raises(UserError, match="fp16 with --grad-accum 2 is not supported .*two optimizers"):
            gan_trainer(tmp_path, accum)
    else:
        assert gan_trainer(tmp_path, accum).acc.mixed_precision == precision


def test_fp16_accumulation_with_one_optimizer_is_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    run = toy_run(str(tmp_path), grad_accum=2)
    trainer = Trainer(run, ToyFamily(run.train, run.options), stream_factory(8, 2), make_accelerator(2, tmp_path))
    assert trainer.acc.mixed_precision == "fp16"


# ---- 5. kills between renames, fsync ----------------------------------------------------------
def fail_on_rename(monkeypatch, source_name: str):
    """os.rename raises (as a kill would stop the process) when it moves ``source_name``."""
    real = os.rename

    def rename(src, dst):
        if os.path.basename(src) == source_name:
            raise KeyboardInterrupt("killed")
        real(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", rename)


def test_kill_while_replacing_a_checkpoint_of_the_same_step_keeps_it(tmp_path, monkeypatch):
    train_toy(tmp_path, steps=4, keep_checkpoints=1)
    root = ckpt.checkpoint_root(tmp_path)
    final = ckpt.final_name(root, 4)
    before = (final / "model.safetensors").read_bytes()
    tmp = ckpt.temp_name(root, 4)
    shutil.copytree(final, tmp)  # the same step saved again (a stop right after a periodic save)
    fail_on_rename(monkeypatch, tmp.name)
    with pytest.raises(KeyboardInterrupt):
        ckpt.publish(tmp, final)
    monkeypatch.undo()
    ckpt.clean_temporaries(tmp_path)  # what the next launch does first
    assert ckpt.latest_checkpoint(tmp_path) == final
    assert (final / "model.safetensors").read_bytes() == before
    assert ckpt.load_ema_weights(tmp_path)[1] == 4
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004"]
    resumed, code = train_toy(tmp_path, steps=6, keep_checkpoints=1)
    assert code == 0 and resumed.progress.step == 6


def test_kill_while_replacing_the_best_keeps_a_best(tmp_path, monkeypatch):
    train_toy(tmp_path, steps=8, ckpt_every=4)
    ckpt.keep_as_best(tmp_path, 4)
    root = ckpt.checkpoint_root(tmp_path)
    fail_on_rename(monkeypatch, ".tmp-best")  # after the old best went aside, before the new one came in
    with pytest.raises(KeyboardInterrupt):
        ckpt.keep_as_best(tmp_path, 8)
    monkeypatch.undo()
    assert not (root / "best").exists()  # the dangerous moment was really reached
    ckpt.clean_temporaries(tmp_path)
    assert json.loads((root / "best" / "meta.json").read_text())["step"] == 4
    assert all_finite(root / "best")
    assert sorted(p.name for p in root.iterdir()) == ["best", "step-00000004", "step-00000008"]
    ckpt.keep_as_best(tmp_path, 8)  # and the next best replaces it normally
    assert json.loads((root / "best" / "meta.json").read_text())["step"] == 8
    assert sorted(p.name for p in root.iterdir()) == ["best", "step-00000004", "step-00000008"]


def test_every_file_is_fsynced_before_the_publishing_rename(tmp_path, monkeypatch):
    train_toy(tmp_path, steps=4)
    root = ckpt.checkpoint_root(tmp_path)
    tmp = ckpt.temp_name(root, 8)
    shutil.copytree(ckpt.final_name(root, 4), tmp)
    synced: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                      real_fsync(fd)))
    order: list[set[str]] = []
    monkeypatch.setattr(ckpt.os, "rename", lambda a, b: (order.append(set(synced)), real_rename(a, b)))
    files = {str(p) for p in tmp.rglob("*") if p.is_file()}
    ckpt.publish(tmp, ckpt.final_name(root, 8))
    assert len(files) >= 4 and files | {str(tmp)} <= order[0]  # files and folder, before the rename
    assert synced[-1] == str(root)  # and the folder holding the new name, after it


# ---- 6. resume loads nothing with weights_only=False; the first log after resume ---------------
class Exploit:
    ran = False

    def __reduce__(self):
        return (setattr, (Exploit, "ran", True))


def test_resume_never_unpickles_arbitrary_objects(tmp_path):
    train_toy(tmp_path, steps=4)
    latest = ckpt.latest_checkpoint(tmp_path)
    state = torch.load(latest / ckpt.TRAINER_STATE, weights_only=True)
    torch.save({**state, "progress": {"step": 4, "eval": Exploit()}}, latest / ckpt.TRAINER_STATE)
    with pytest.raises(UserError, match="could not be loaded"):
        train_toy(tmp_path, steps=8)
    assert not Exploit.ran


def test_checkpoint_of_an_older_genscale_still_resumes_exactly(tmp_path):
    full, _ = train_toy(tmp_path / "full", steps=8)
    train_toy(tmp_path / "old", steps=4)
    latest = ckpt.latest_checkpoint(tmp_path / "old")
    state = torch.load(latest / ckpt.TRAINER_STATE, weights_only=True)
    (latest / ckpt.TRAINER_STATE).unlink()  # the layout of Accelerate's registry
    torch.save(state["progress"], latest / "custom_checkpoint_0.pkl")
    torch.save(state["ema"], latest / "custom_checkpoint_1.pkl")
    resumed, _ = train_toy(tmp_path / "old", steps=8)
    for k, v in weights(full).items():
        assert torch.equal(weights(resumed)[k], v), k
    assert torch.equal(resumed.ema.nets["model"].weight, full.ema.nets["model"].weight)
    assert (ckpt.latest_checkpoint(tmp_path / "old") / ckpt.TRAINER_STATE).is_file()


def test_first_log_after_resume_counts_the_steps_it_covers(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    def one_second_per_step(family):
        original = family.training_step

        def step(batch, optimize):
            clock[0] += 1.0
            return original(batch, optimize)

        family.training_step = step

    train_toy(tmp_path, family_hook=one_second_per_step, steps=3, log_every=2)
    train_toy(tmp_path, family_hook=one_second_per_step, steps=8, log_every=2)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["steps_per_s"]) for r in rows] == [(2, 1.0), (3, 1.0), (4, 1.0), (6, 1.0), (8, 1.0)]


def test_resume_with_another_world_size_warns(tmp_path, capsys):
    train_toy(tmp_path, steps=4)
    meta = tmp_path / "checkpoints" / "step-00000004" / "meta.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "world_size": 2}))
    capsys.readouterr()
    train_toy(tmp_path, steps=6)
    assert "with 1 process, saved with 2" in capsys.readouterr().err
