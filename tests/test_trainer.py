"""The training loop: accumulation, EMA, atomic checkpoints, exact resume, signals, divergence."""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

from genscale import checkpoints as ckpt
from genscale.ema import EMA
from genscale.errors import UserError
from genscale.launch import make_accelerator
from genscale.trainer import Trainer
from tests.toy_family import ToyFamily, stream_factory, toy_run


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def train_toy(out, family_hook=None, deferred: bool = False, **overrides) -> tuple[Trainer, int]:
    """``deferred``: read the logs as on a GPU (at log, checkpoint, grid and evaluation steps only)."""
    run = toy_run(str(out), **overrides)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    family = ToyFamily(run.train, run.options)
    if family_hook:
        family_hook(family)
    acc = make_accelerator(run.train.grad_accum, out)
    trainer = Trainer(run, family, stream_factory(run.train.batch_size, run.train.grad_accum), acc)
    trainer.read_every_step = not deferred
    return trainer, trainer.fit()


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    net = trainer.acc.unwrap_model(trainer.family.nets["model"])
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_accumulation_equals_big_batch(tmp_path):
    big, _ = train_toy(tmp_path / "big", batch_size=16, grad_accum=1, jitter=0.0)
    acc2, _ = train_toy(tmp_path / "acc", batch_size=8, grad_accum=2, jitter=0.0)
    for k, v in weights(big).items():
        torch.testing.assert_close(weights(acc2)[k], v, rtol=1e-5, atol=1e-6)
    # and the weights did move: the comparison is not between two untouched inits
    start = ToyFamily(toy_run("x").train, toy_run("x").options).nets["model"].weight
    assert (weights(big)["weight"] - start).abs().max() > 0.1


def test_ema_matches_closed_form():
    """Warm-up first ((1+k)/(10+k) = 0.1, 0.18), then the configured decay 0.2 caps it from the
    third update on: both halves of d_k = min(decay, (1+k)/(10+k)) decide the result."""
    net = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = EMA({"m": net}, decay=0.2)
    expected = torch.zeros(1, 3, dtype=torch.float64)
    decays = [0.1, 2 / 11, 0.2, 0.2, 0.2, 0.2]  # written out, not computed by the formula under test
    for d, value in zip(decays, [1.0, 2.0, 4.0, -1.0, 3.0, 5.0]):
        with torch.no_grad():
            net.weight.fill_(value)
        expected = d * expected + (1 - d) * value
        ema.update({"m": net})
    torch.testing.assert_close(ema.nets["m"].weight.double(), expected, rtol=1e-6, atol=1e-7)


def test_run_writes_metrics_checkpoints_and_curve(tmp_path):
    trainer, code = train_toy(tmp_path, steps=12, sample_every=6)
    assert code == 0
    steps = [s for s, _ in ckpt.list_checkpoints(tmp_path)]
    assert steps == [8, 12]  # ckpt_every=4, keep 2
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    assert (tmp_path / "samples" / "step-00000006.png").is_file()
    ema = torch.load(tmp_path / "checkpoints" / "step-00000012" / "ema.pt", weights_only=True)
    torch.testing.assert_close(ema["model"]["weight"], trainer.ema.nets["model"].weight)


def test_resume_is_bit_exact(tmp_path):
    full, _ = train_toy(tmp_path / "full", steps=12)
    part, _ = train_toy(tmp_path / "part", steps=6)  # checkpoints at 4 and 6
    # lose the step-6 checkpoint as if killed before it was renamed: resume from step 4
    ckpt.list_checkpoints(tmp_path / "part")[-1][1].rename(tmp_path / "part" / "checkpoints" / ".tmp-step-00000006")
    resumed, code = train_toy(tmp_path / "part", steps=12)
    assert code == 0
    for k, v in weights(full).items():
        assert torch.equal(weights(resumed)[k], v), k
    for k, v in full.ema.nets["model"].state_dict().items():
        assert torch.equal(resumed.ema.nets["model"].state_dict()[k], v)
    steps = [json.loads(line)["step"] for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "resumed metrics must not repeat steps"


def test_finished_run_says_so(tmp_path, capsys):
    train_toy(tmp_path, steps=4)
    _, code = train_toy(tmp_path, steps=4)
    assert code == 0
    assert "already at its last step" in capsys.readouterr().out


def signal_in_call(n: int):
    """A family hook: SIGUSR1 to this process during the family's n-th training step."""
    def hook(family):
        original = family.training_step

        def step(batch, optimize):
            if family.calls == n - 1:
                os.kill(os.getpid(), signal.SIGUSR1)
            return original(batch, optimize)

        family.training_step = step
    return hook


@pytest.mark.parametrize("deferred", [False, True])
def test_signal_saves_and_exits_cleanly(tmp_path, deferred):
    trainer, code = train_toy(tmp_path, family_hook=signal_in_call(3), steps=12, ckpt_every=100, deferred=deferred)
    assert code == 0
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3]
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.mark.parametrize("deferred", [False, True])
def test_non_finite_loss_keeps_good_checkpoint(tmp_path, deferred):
    train_toy(tmp_path, steps=4)
    good = (tmp_path / "checkpoints" / "step-00000004" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="non-finite"):
        train_toy(tmp_path, steps=12, nan_at_step=1, deferred=deferred)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4]
    assert (tmp_path / "checkpoints" / "step-00000004" / "model.safetensors").read_bytes() == good


@pytest.mark.parametrize("deferred", [False, True])
def test_divergence_names_the_first_bad_step_and_publishes_nothing_after_it(tmp_path, deferred):
    # The loss turns NaN in step 6. Read per step, training stops there; read as on a GPU (next read
    # at the step-8 log and checkpoint), it stops at step 8 without saving it. Both name step 6.
    with pytest.raises(UserError, match="non-finite at step 6;"):
        train_toy(tmp_path, steps=12, nan_at_step=5, log_every=4, ckpt_every=4, deferred=deferred)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4]


class CountedReads(torch.Tensor):
    """A tensor that counts how often its values (or those of tensors made from it) reach the host."""

    reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__bool__,
                    torch.Tensor.numpy, torch.Tensor.cpu):
            CountedReads.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def count_log_reads(family):
    original = family.training_step

    def step(batch, optimize):
        logs = original(batch, optimize)
        return {"loss": logs["loss"].as_subclass(CountedReads)}

    family.training_step = step


def test_logs_left_on_the_device_are_read_once_per_window_with_the_same_values(tmp_path):
    """On a GPU every read waits for the queued kernels: the loop must not read the loss each step."""
    metrics = {}
    for deferred in (False, True):
        CountedReads.reads = 0
        out = tmp_path / str(deferred)
        train_toy(out, family_hook=count_log_reads, steps=12, log_every=4, ckpt_every=12, deferred=deferred)
        reads = CountedReads.reads
        if deferred:
            assert reads == 3, reads  # steps 4, 8, 12: one read of every row of the window
        else:
            assert reads == 12, reads  # a CPU reads for free: after every step
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        metrics[deferred] = [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]
    assert [s for s, _ in metrics[True]] == [4, 8, 12]
    assert metrics[True] == metrics[False]  # same means, whenever they were read


def test_half_written_checkpoint_is_ignored(tmp_path):
    train_toy(tmp_path, steps=4)
    half = tmp_path / "checkpoints" / "step-00000008"
    half.mkdir()  # a folder without meta.json, as a crash mid-write of an older layout might leave
    (tmp_path / "checkpoints" / ".tmp-step-00000012").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000004"


def test_family_grid_and_warning_reach_the_run_folder(tmp_path, capsys):
    def add_grid_and_warning(family):
        original = family.training_step
        family.grid = lambda generator: (torch.zeros(6, 1, 2, 2), 3)

        def step(batch, optimize):
            return {**original(batch, optimize), "warning": "discriminator wins outright"}

        family.training_step = step

    train_toy(tmp_path, family_hook=add_grid_and_warning, steps=4, sample_every=4)
    from PIL import Image

    grid = Image.open(tmp_path / "samples" / "step-00000004.png")
    assert grid.size[0] > grid.size[1]  # 3 per row, 2 rows
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "warning"] == [2, 4]
    captured = capsys.readouterr()
    assert "warning at step 2: discriminator wins outright" in captured.out + captured.err


def test_ema_update_equals_the_per_tensor_formula_bit_for_bit():
    """The multi-tensor update gives the same bits as s.lerp_(p, 1 - d) tensor by tensor, for
    every parameter of a real network (several shapes), and copies buffers (BatchNorm stats)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Linear(6, 2))
    ema = EMA({"m": net}, decay=0.25)  # the cap binds from the fourth update ((1+3)/13 > 0.25)
    reference = [p.detach().clone() for p in net.parameters()]
    for k in range(6):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
            net[1].running_mean.add_(1.0)
        d = min(0.25, (1 + k) / (10 + k))
        for r, p in zip(reference, net.parameters()):
            r.lerp_(p.detach(), 1.0 - d)
        ema.update({"m": net})
    for r, s in zip(reference, ema.nets["m"].parameters()):
        assert torch.equal(r, s)
    assert torch.equal(ema.nets["m"][1].running_mean, net[1].running_mean)


def test_a_stop_request_in_the_last_step_still_finishes_the_run(tmp_path):
    """Saved at its last step, the run is complete: the loss curve is drawn and it reports finished
    (otherwise SLURM requeued it and the requeued job found nothing to do, never drawing the curve)."""
    try:
        trainer, code = train_toy(tmp_path, family_hook=signal_in_call(4), steps=4, ckpt_every=100)
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    assert code == 0 and trainer.finished
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4]
    assert (tmp_path / "loss_curve.png").exists()


def test_optimizer_settings_changed_on_resume_take_effect(tmp_path):
    """Loading a checkpoint restored the saved param groups: a resume with a lower --lr (what the
    divergence message advises), another --weight-decay or other betas trained on with the old
    values while config.json and metrics.jsonl showed the new ones."""
    def adamw(lr, weight_decay, betas):
        def hook(family):
            family.optimizers["model"] = torch.optim.AdamW(family.nets["model"].parameters(), lr=lr,
                                                           weight_decay=weight_decay, betas=betas)
        return hook

    train_toy(tmp_path, family_hook=adamw(0.05, 0.0, (0.9, 0.999)), steps=4, lr=0.05)
    trainer, _ = train_toy(tmp_path, family_hook=adamw(0.002, 0.3, (0.5, 0.9)), steps=8, lr=0.002)
    group = trainer.family.optimizers["model"].param_groups[0]
    assert (group["base_lr"], group["lr"], group["weight_decay"], tuple(group["betas"])) == (0.002, 0.002, 0.3, (0.5, 0.9))
    assert torch.load(ckpt.latest_checkpoint(tmp_path) / "optimizer.bin", weights_only=True)["param_groups"][0]["lr"] == 0.002
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if r["step"] > 4] == [0.002, 0.002]


def test_skipped_samples_are_reported_once_on_the_console(tmp_path, capsys):
    """Undecodable samples were counted only in metrics.jsonl: a shard set half of broken images
    trained without a word on the console."""
    run = toy_run(str(tmp_path), steps=8)
    family = ToyFamily(run.train, run.options)
    acc = make_accelerator(1, tmp_path)
    clean = stream_factory(run.train.batch_size, 1)

    def with_skips(start_step):
        for i, batch in enumerate(clean(start_step)):
            yield {**batch, "skipped": 3 if i in (2, 5) else 0}

    Trainer(run, family, with_skips, acc).fit()
    err = capsys.readouterr().err
    assert err.count("could not be decoded") == 1 and "warning: 3 samples" in err and "(by step 4;" in err
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_samples"] for r in rows] == [0, 3, 6, 6]  # batches 2 and 5 are steps 3 and 6
