"""--lr-schedule: the rate per step against values worked out by hand, the trainer applying it,
exact resume under a decay, and the refusals of schedules that could never decay."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from genscale import checkpoints as ckpt
from genscale.config import parse_train_args
from genscale.errors import UserError
from genscale.lr_schedule import lr_factor
from tests.test_trainer import train_toy, weights

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def test_linear_decay_from_its_start_to_zero_at_the_last_step():
    # steps 10, no warm-up, decay from step 5: 5 steps at 1, then 1 - (s - 5) / 5
    got = [lr_factor(s, 10, 0, "linear", 5) for s in range(10)]
    assert got == pytest.approx([1, 1, 1, 1, 1, 1.0, 0.8, 0.6, 0.4, 0.2], abs=1e-15)


def test_cosine_decay_after_the_warm_up():
    # steps 10, warm-up 2 (factors 1/2, 1), decay from step 6 over 4 steps: half a cosine at
    # progress 0, 1/4, 1/2, 3/4 -> 1, (1 + sqrt(2)/2) / 2, 1/2, (1 - sqrt(2)/2) / 2
    got = [lr_factor(s, 10, 2, "cosine", 6) for s in range(10)]
    half_root2 = math.sqrt(2) / 2
    expected = [0.5, 1, 1, 1, 1, 1, 1.0, (1 + half_root2) / 2, 0.5, (1 - half_root2) / 2]
    assert got == pytest.approx(expected, abs=1e-15)


def test_the_decay_starts_at_the_end_of_the_warm_up_by_default():
    # warm-up 4 of 8 steps: 1/4 .. 1 during it, then linear from step 4: 1, 3/4, 1/2, 1/4
    got = [lr_factor(s, 8, 4, "linear") for s in range(8)]
    assert got == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 0.75, 0.5, 0.25], abs=1e-15)
    assert [lr_factor(s, 8, 4, "constant") for s in range(8)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 1, 1])


def test_decays_are_monotone_and_never_reach_zero_inside_the_run():
    for schedule in ("linear", "cosine"):
        factors = [lr_factor(s, 1000, 50, schedule, 300) for s in range(1000)]
        assert all(b <= a for a, b in zip(factors[50:], factors[51:]))
        assert 0 < factors[-1] < 1e-2 and factors[299] == 1.0


def test_the_trainer_applies_the_schedule_to_every_optimizer_step(tmp_path):
    seen = []

    def record(family):
        step = family.training_step

        def recording(batch, optimize):
            seen.append(family.optimizers["model"].param_groups[0]["lr"])
            return step(batch, optimize)
        family.training_step = recording

    train_toy(tmp_path, family_hook=record, steps=12, lr=0.05, warmup_steps=3, log_every=1,
              lr_schedule="cosine", lr_decay_start=4)
    expected = [0.05 * min(1, (s + 1) / 3) * (0.5 * (1 + math.cos(math.pi * (s - 4) / 8)) if s >= 4 else 1)
                for s in range(12)]
    assert seen == pytest.approx(expected, rel=1e-12)
    logged = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx(expected, rel=1e-12)


def test_resume_under_a_decay_is_bit_exact(tmp_path):
    """Killed after the step-4 checkpoint (the later ones lost) and re-run: the schedule is not
    saved, it is recomputed from the step, so the resumed run ends where the whole one did."""
    flags = dict(lr_schedule="linear", warmup_steps=2, steps=12, keep_checkpoints=3)
    full, _ = train_toy(tmp_path / "full", **flags)
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    for step, path in ckpt.list_checkpoints(tmp_path / "part"):
        if step > 4:
            shutil.rmtree(path)
    resumed, code = train_toy(tmp_path / "part", **flags)
    assert code == 0 and [s for s, _ in ckpt.list_checkpoints(tmp_path / "part")] == [4, 8, 12]
    constant, _ = train_toy(tmp_path / "constant", warmup_steps=2, steps=12)
    for k, v in weights(full).items():
        assert torch.equal(weights(resumed)[k], v), k
        assert not torch.equal(weights(constant)[k], v), k  # the decay changed the training


@pytest.mark.parametrize("flags, message", [
    (["--lr-schedule", "step"], "--lr-schedule must be one of constant, linear, cosine, got 'step'"),
    (["--lr-decay-start", "100"], "--lr-decay-start 100 has no effect with --lr-schedule constant"),
    (["--lr-schedule", "cosine", "--lr-decay-start", "500", "--steps", "500"],
     "--lr-schedule cosine decays after --lr-decay-start 500, which ends at or after --steps 500"),
    (["--lr-schedule", "linear", "--warmup-steps", "50", "--steps", "40"],
     "--lr-schedule linear decays after the warm-up (--warmup-steps 50), which ends at or after --steps 40"),
    (["--lr-schedule", "linear", "--lr-decay-start", "-1"], "--lr-decay-start must not be negative, got -1"),
])
def test_schedules_that_cannot_work_are_refused_in_one_sentence(flags, message):
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        parse_train_args(["--model", "ddpm", *flags])


def test_a_schedule_round_trips_through_the_command_line():
    run = parse_train_args(["--model", "gan", "--lr-schedule", "linear", "--lr-decay-start", "700", "--steps", "1400"])
    assert (run.train.lr_schedule, run.train.lr_decay_start, run.train.steps) == ("linear", 700, 1400)


def test_the_loss_curve_shows_the_logged_learning_rate():
    import matplotlib.pyplot as plt

    from genscale.run_files import loss_figure

    rows = [{"step": s, "loss": 1.0 / s, "lr": lr_factor(s - 1, 40, 5, "cosine") * 1e-3} for s in range(1, 41)]
    rows.append({"step": 40, "kind": "eval", "fid": 3.0, "lr": 9.0})  # not a training row: not drawn
    fig = loss_figure(rows)
    assert len(fig.axes) == 2
    (line,) = fig.axes[1].get_lines()
    assert list(line.get_xdata()) == list(range(1, 41))
    assert list(line.get_ydata()) == [r["lr"] for r in rows[:40]]
    plt.close(fig)
    fig = loss_figure([{"step": 1, "loss": 0.5}])  # a log without rates: one axis
    assert len(fig.axes) == 1
    plt.close(fig)
