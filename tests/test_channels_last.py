"""--channels-last: networks and image batches in NHWC memory (genscale/memory_layout.py).

Forced on a CPU (PyTorch's CPU convolutions take channels_last too), a tiny DDPM U-Net run must
really hold its convolution weights, EMA weights and Adam moments in channels_last and train the
same values as an NCHW run of the same seed; checkpoints must resume across layouts in both
directions and stay readable by sample.py, which builds NCHW networks.

"The same values": the layouts only reorder the sums inside each convolution, so the two runs
differ by float32 rounding, which Adam's updates carry on. The measure is the distance between
the two runs' weights relative to the distance the weights moved from where the run started.
Measured here (3 to 12 steps, one thread): 2.5e-6 to 5e-6 between the layouts, 0.023 for a
learning rate 1% off (the updates, hence the movement, scale with it), 0.40 for a resume that fed
the fused Adam step moments in the other layout. BOUND lies well between the first two, and
test_the_bound_tells_a_real_difference checks that it does.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState

import genscale.train as train_module
from genscale import memory_layout
from genscale.config import RunConfig, TrainConfig, parse_train_args
from genscale.errors import UserError
from genscale.families import family_module
from genscale.sample import load_family, main as sample_main
from genscale.trainer import Trainer

ROOT = Path(__file__).resolve().parent.parent
STEPS = 3
TINY = ["--data", "photos", "--batch-size", "4", "--sample-every", "0", "--timesteps", "20", "--base-width", "16",
        "--channel-mults", "1,2", "--attention-res", "4", "--image-size", "8", "--num-workers", "0",
        "--log-every", "1", "--sampling-steps", "3", "--warmup-steps", "0", "--ckpt-every", "2"]
BOUND = 1e-3  # see the module's docstring
CL = torch.channels_last
DDPM = family_module("ddpm").FAMILY
RESUME, STEP = Trainer.resume, DDPM.training_step


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def weights(net: torch.nn.Module) -> torch.Tensor:
    """All of a network's floating-point state as one float64 vector (layout-independent)."""
    return torch.cat([v.detach().double().flatten() for v in net.state_dict().values() if v.is_floating_point()])


def train(cache, out, steps: int, *flags: str) -> Trainer:
    """train.py's train() in this process (its checks, config.json, the data stream, the ddpm family).
    The trainer comes back with ``start`` and ``start_ema``, the weights its loop started from (the
    resumed ones after a resume), and ``images``, whether each batch's images were channels_last."""
    seen: list[Trainer] = []
    images: list[bool] = []  # for each batch the family trained on: were its images channels_last?

    def recording_resume(self: Trainer) -> bool:
        resumed = RESUME(self)
        self.start = weights(self.plain("model"))
        self.start_ema = weights(self.ema.nets["model"])
        self.images = images
        seen.append(self)
        return resumed

    def recording_step(self, batch, optimize):
        images.append(batch["image"].is_contiguous(memory_format=CL) and not batch["image"].is_contiguous())
        return STEP(self, batch, optimize)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Trainer, "resume", recording_resume)
        patch.setattr(DDPM, "training_step", recording_step)
        patch.setenv("GENSCALE_THREADS", "1")  # else one thread per core, spinning against the other jobs
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        args = [*TINY, "--steps", str(steps), "--cache-dir", str(cache), "--out", str(out), *flags]
        assert train_module.train(parse_train_args(args))
    return seen[-1]


def relative_gap(a: torch.Tensor, b: torch.Tensor, start: torch.Tensor) -> float:
    return float((a - b).norm() / (b - start).norm())


def conv_tensors(trainer: Trainer) -> dict[str, list[torch.Tensor]]:
    """The 4-D tensors of the live network, its EMA copy and its optimizer's state."""
    state = trainer.family.optimizers["model"].state
    return {"live": [p for p in trainer.plain("model").parameters() if p.dim() == 4],
            "ema": [p for p in trainer.ema.nets["model"].parameters() if p.dim() == 4],
            "adam": [v for s in state.values() for v in s.values() if torch.is_tensor(v) and v.dim() == 4]}


def assert_layout(trainer: Trainer, channels_last: bool) -> None:
    for where, tensors in conv_tensors(trainer).items():
        assert tensors, where
        if channels_last:
            assert all(t.is_contiguous(memory_format=CL) for t in tensors), where
            assert not all(t.is_contiguous() for t in tensors), where  # 3x3 kernels: really another layout
        else:
            assert all(t.is_contiguous() for t in tensors), where


def losses(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if row.get("kind") == "train"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> Trainer:
    """An NCHW run as a CPU user starts it: no layout flag."""
    return train(cache, tmp_path_factory.mktemp("runs") / "nchw", STEPS)


def test_the_default_is_off_until_measured(reference):
    assert parse_train_args([]).train.channels_last is None  # not given: the run decides
    assert parse_train_args(["--channels-last"]).train.channels_last is True
    assert parse_train_args(["--no-channels-last"]).train.channels_last is False
    assert memory_layout.resolve(None, torch.device("cpu")) is False
    assert memory_layout.resolve(None, torch.device("cuda")) is False  # until a GPU benchmark says otherwise
    assert memory_layout.resolve(False, torch.device("cuda")) is False
    assert memory_layout.resolve(True, torch.device("cpu")) is True
    # the CPU run without the flag: NCHW everywhere, and config.json says so
    assert reference.cfg.channels_last is False
    assert json.loads((reference.out / "config.json").read_text())["train"]["channels_last"] is False
    assert_layout(reference, channels_last=False)
    # a config.json written before the flag existed reads as "not given"
    assert RunConfig.from_dict({"train": {"model": "ddpm"}, "options": {}}).train.channels_last is None


def test_the_flag_in_a_config_file(tmp_path):
    (tmp_path / "on.json").write_text(json.dumps({"channels_last": True}))
    (tmp_path / "bad.json").write_text(json.dumps({"channels_last": "sometimes"}))
    assert parse_train_args(["--config", str(tmp_path / "on.json")]).train.channels_last is True
    assert parse_train_args(["--config", str(tmp_path / "on.json"), "--no-channels-last"]).train.channels_last is False
    with pytest.raises(UserError, match="channels_last .* expected true or false"):
        parse_train_args(["--config", str(tmp_path / "bad.json")])
    # null means "not given" (a TrainConfig recorded before a run resolved it: tests and tools write
    # such config.json files); every other option still refuses an empty value
    (tmp_path / "auto.json").write_text(json.dumps({"channels_last": None}))
    assert parse_train_args(["--config", str(tmp_path / "auto.json")]).train.channels_last is None
    record = json.loads(json.dumps(RunConfig(TrainConfig(), family_module("ddpm").Options()).to_dict()))
    assert RunConfig.from_dict(record).train.channels_last is None
    with pytest.raises(UserError, match="option steps in config.json has no value"):
        RunConfig.from_dict({"train": {"model": "ddpm", "steps": None}, "options": {}})


def test_forced_channels_last_trains_like_nchw(reference, cache, tmp_path):
    run = train(cache, tmp_path / "cl", STEPS, "--channels-last")
    assert run.cfg.channels_last is True
    assert json.loads((run.out / "config.json").read_text())["train"]["channels_last"] is True
    assert_layout(run, channels_last=True)
    assert run.images == [True] * STEPS and reference.images == [False] * STEPS  # the batches too
    torch.testing.assert_close(losses(run.out), losses(reference.out), rtol=1e-5, atol=0)
    assert torch.equal(run.start, reference.start)  # the same initial weights
    ref_live, ref_ema = weights(reference.plain("model")), weights(reference.ema.nets["model"])
    assert relative_gap(weights(run.plain("model")), ref_live, reference.start) < BOUND
    assert relative_gap(weights(run.ema.nets["model"]), ref_ema, reference.start_ema) < BOUND


def test_the_bound_tells_a_real_difference(reference, cache, tmp_path):
    lr = float(json.loads((reference.out / "config.json").read_text())["train"]["lr"])
    other = train(cache, tmp_path / "lr", STEPS, "--lr", repr(lr * 1.01))
    gap = relative_gap(weights(other.plain("model")), weights(reference.plain("model")), reference.start)
    assert gap > 5 * BOUND


def test_checkpoints_resume_across_layouts_and_sample_py_reads_them(reference, cache, tmp_path):
    out = tmp_path / "run"
    first = train(cache, out, STEPS - 2, "--channels-last")
    second = train(cache, out, STEPS - 1, "--no-channels-last")  # a channels_last checkpoint, resumed NCHW
    assert torch.equal(second.start, weights(first.plain("model")))
    assert_layout(second, channels_last=False)
    third = train(cache, out, STEPS, "--channels-last")  # and an NCHW one resumed channels_last
    assert torch.equal(third.start, weights(second.plain("model")))
    assert_layout(third, channels_last=True)
    # weights, EMA and Adam's moments all came through: the run equals the uninterrupted one
    assert relative_gap(weights(third.plain("model")), weights(reference.plain("model")), reference.start) < BOUND
    assert relative_gap(weights(third.ema.nets["model"]), weights(reference.ema.nets["model"]),
                        reference.start_ema) < BOUND

    family, _, step = load_family(out)
    assert step == STEPS
    net = family.nets["model"]
    assert all(p.is_contiguous() for p in net.parameters())  # built NCHW, as sample.py builds it
    assert torch.equal(weights(net), weights(third.ema.nets["model"]))
    ema_file = torch.load(out / "checkpoints" / f"step-{STEPS:08d}" / "ema.pt", weights_only=True)
    assert all(v.is_contiguous() for v in ema_file["model"].values())  # the file does not depend on the layout
    assert sample_main(["--run", str(out), "--num", "4", "--out", str(tmp_path / "samples.png")]) == 0
    assert (tmp_path / "samples.png").stat().st_size > 0


def test_two_processes_convert_before_ddp_builds_its_buckets(cache, tmp_path):
    """DDP lays its gradient buckets out for the strides it finds: networks converted after
    accelerator.prepare warn "Grad strides do not match bucket view strides" at every backward
    (and all-reduce through copies); converted before, as setup() is called, they do not."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENSCALE_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "accelerate_configs" / "cpu.yaml"), "--main_process_port", "29537",
                           str(ROOT / "genscale" / "train.py"), *TINY, "--steps", "2", "--channels-last",
                           "--cache-dir", str(cache), "--out", str(tmp_path / "ddp")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "ddp" / "config.json").read_text())
    assert record["world_size"] == 2 and record["train"]["channels_last"] is True
    assert "Grad strides do not match bucket view strides" not in proc.stderr

class Convs(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.b = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).mean((2, 3)))


class Family:  # what setup() reads of a family
    def __init__(self, net: torch.nn.Module) -> None:
        self.nets = {"model": net}
        self.optimizers = {"model": torch.optim.AdamW(net.parameters(), lr=0.1, fused=True)}


def test_setup_converts_in_place_and_leaves_networks_without_convolutions_alone():
    fam = Family(Convs())
    params = list(fam.nets["model"].parameters())
    cfg = TrainConfig(channels_last=True)
    assert memory_layout.setup(cfg, fam, torch.device("cpu")) is CL
    assert fam.nets["model"].a.weight.is_contiguous(memory_format=CL) and not fam.nets["model"].a.weight.is_contiguous()
    # the optimizer still holds the network's parameters (a copy would leave it training orphans)
    assert all(p is q for p, q in zip(fam.optimizers["model"].param_groups[0]["params"], params))
    assert all(p is q for p, q in zip(fam.nets["model"].parameters(), params))
    mlp = Family(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 2)))
    assert memory_layout.setup(TrainConfig(channels_last=True), mlp, torch.device("cpu")) is None
    cfg = TrainConfig()
    assert memory_layout.setup(cfg, Family(Convs()), torch.device("cpu")) is None and cfg.channels_last is False
    batch = memory_layout.batch_to({"image": torch.randn(2, 3, 4, 4), "label": torch.arange(2), "name": "x"},
                                   torch.device("cpu"), CL)
    assert batch["image"].is_contiguous(memory_format=CL) and not batch["image"].is_contiguous()
    assert batch["label"].tolist() == [0, 1] and batch["name"] == "x"


def test_optimizer_state_saved_in_the_other_layout_steps_the_right_elements():
    """The fused Adam step pairs a parameter's elements with its moments' in memory order: a state
    loaded with the other layout's strides updated the wrong elements (by ~lr) until setup()'s hook."""
    torch.manual_seed(0)
    x, target = torch.randn(4, 2, 5, 5), torch.randn(4, 3)

    def step(fam: Family) -> None:
        loss = torch.nn.functional.mse_loss(fam.nets["model"](x), target)
        loss.backward()
        fam.optimizers["model"].step()
        fam.optimizers["model"].zero_grad()

    torch.manual_seed(1)
    saved = Family(Convs())
    memory_layout.setup(TrainConfig(channels_last=True), saved, torch.device("cpu"))
    step(saved)
    state = {"net": {k: v.clone() for k, v in saved.nets["model"].state_dict().items()},
             "opt": copy.deepcopy(saved.optimizers["model"].state_dict())}  # the step updates it in place
    for _ in range(3):
        step(saved)  # the uninterrupted run
    resumed = Family(Convs())
    memory_layout.setup(TrainConfig(channels_last=False), resumed, torch.device("cpu"))
    resumed.nets["model"].load_state_dict(state["net"])
    resumed.optimizers["model"].load_state_dict(state["opt"])
    moments = [v for s in resumed.optimizers["model"].state.values() for v in s.values() if v.dim() == 4]
    assert moments and all(v.is_contiguous() for v in moments)
    for _ in range(3):
        step(resumed)
    for (name, a), b in zip(saved.nets["model"].state_dict().items(), resumed.nets["model"].state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_the_benchmark_summary_shows_the_layout_speedups():
    """benchmarks/test_bench_unet.py times the U-Net step in both layouts on CUDA ("-nchw" variants);
    the summary shows them as columns and says how much faster channels_last was."""
    bench = ROOT / "benchmarks"
    sys.path.insert(0, str(bench))
    try:
        import summarize
        from test_bench_unet import VARIANTS
    finally:
        sys.path.remove(str(bench))
    assert {"eager", "triton", "eager+graph", "triton+graph", "compile", "compile+graph", "triton+compile",
            "triton+inline", "fallback", "eager-nchw", "triton-nchw"} <= set(VARIANTS)  # old names kept
    assert set(VARIANTS) <= set(summarize.VARIANTS)  # a variant the summary does not know is never shown
    payload = json.loads((bench / "results" / "2026-11-22-h100" / "results.json").read_text())
    case = "train step b128 32px w128"
    rows = {r["variant"]: r for r in payload["results"] if r["suite"] == "unet" and r["case"] == case}
    payload["results"] += [{**rows["eager"], "variant": "eager-nchw", "time_s": 0.08},
                           {**rows["triton"], "variant": "triton-nchw", "time_s": 0.09}]
    lines = summarize.markdown(payload).splitlines()
    header = next(ln for ln in lines if ln.startswith("| case |") and "eager-nchw" in ln)
    assert "triton-nchw" in header
    line = next(ln for ln in lines if ln.startswith(f"| {case} |"))
    expected = f"eager {0.08 / rows['eager']['time_s']:.2f}x, triton {0.09 / rows['triton']['time_s']:.2f}x"
    assert f"channels_last vs NCHW: {expected}" in line


@pytest.mark.parametrize("flags, expected", [([], None), (["--channels-last"], True), (["--no-channels-last"], False)])
def test_ldm_autoencoder_phase_takes_the_layout_flag(tmp_path, monkeypatch, flags, expected):
    seen = []
    monkeypatch.setattr(train_module, "train", lambda run, last=True: seen.append(run) or 0)
    run = parse_train_args(["--model", "ldm", *flags, "--out", str(tmp_path / "ldm")])
    train_module.train_autoencoder_first(run)
    assert seen[0].train.model == "vae" and seen[0].train.channels_last is expected
