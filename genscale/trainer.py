"""The one Accelerate training loop that every family runs in.

It owns what is common: the step loop, gradient accumulation, clipping, mixed precision (from
the launcher), the learning-rate schedule, EMA, atomic checkpoints and exact resume, stop signals,
logging, the progress bar and periodic sample grids. It knows families only through
genscale.families.base.Family.

Exact resume rests on two rules: every random draw of a training step comes from torch's
global RNG re-seeded from (seed, rank, step, micro-batch) before the step, and the data stream
of every (seed, epoch, rank) is deterministic, so resuming at step k means rebuilding the
stream and skipping the batches already consumed.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from tqdm.auto import tqdm

from genscale import checkpoints as ckpt, lr_schedule, memory_layout
from genscale.config import RunConfig
from genscale.ema import EMA
from genscale.errors import UserError
from genscale.families.base import Batch, Family
from genscale.preemption import StopRequest
from genscale.run_files import MetricsLog, plot_losses, save_grid
from genscale.step_logs import StepLogs

# Param-group entries that come from the flags (--lr, --weight-decay, a family's betas), not from
# training: this launch's values hold, also on resume. ("lr" follows base_lr through set_lr.)
OPTIMIZER_SETTINGS = ("base_lr", "weight_decay", "betas", "eps")

BatchStream = Callable[[int], Iterator[Batch]]  # optimizer step to start at -> batches from there


class Progress:
    """The step counter (and the evaluator's best score), saved with every checkpoint. The
    evaluator rides along here rather than being saved on its own, so a run resumed with
    --eval-every newly turned on still loads its checkpoints."""

    def __init__(self, evaluator=None) -> None:
        self.step = 0
        self.evaluator = evaluator

    def state_dict(self) -> dict:
        state = {"step": self.step}
        if self.evaluator is not None:
            state["eval"] = self.evaluator.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        if self.evaluator is not None and "eval" in state:
            self.evaluator.load_state_dict(state["eval"])


def step_seed(seed: int, rank: int, step: int, micro: int) -> int:
    """A distinct, reproducible seed for every (rank, step, micro-batch)."""
    return (seed * 1_000_003 + rank * 7_919 + step * 131 + micro) % (2**63 - 1)


class Trainer:
    def __init__(self, run: RunConfig, family: Family, batches: BatchStream, accelerator: Accelerator,
                 grid_labels: torch.Tensor | None = None, evaluator=None):
        self.run = run
        self.cfg = run.train
        self.family = family
        self.batches = batches
        self.acc = accelerator
        self.out = Path(self.cfg.out)
        self.grid_labels = grid_labels
        self.evaluator = evaluator  # called as evaluator(family, step) -> dict on every rank
        self.progress = Progress(evaluator)
        self.stop = StopRequest()
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        # On a CPU reading a value costs nothing: the logs are read and the ranks agree on stops
        # and divergence after every step. On a GPU every read waits for the queued kernels, so
        # the logs are read only where the loop waits anyway (see genscale/step_logs.py).
        self.read_every_step = accelerator.device.type == "cpu"
        self._pending_vote: torch.Tensor | None = None
        self._warned_skips = False
        self.finished = False  # set by fit(): the run reached its last step (not stopped before it)
        if len(family.optimizers) > 1 and self.cfg.grad_accum > 1 and accelerator.mixed_precision == "fp16":
            # Accelerate has one GradScaler for all optimizers: its update() after the first
            # optimizer's step changes the scale between the second one's accumulated backwards.
            raise UserError(f"fp16 with --grad-accum {self.cfg.grad_accum} is not supported for {family.name or 'a model'} "
                            "(two optimizers share one gradient scaler); use bf16 or --grad-accum 1")

        self.batch_format = memory_layout.setup(self.cfg, family, accelerator.device)  # before prepare and EMA
        names, opt_names = list(family.nets), list(family.optimizers)
        prepared = accelerator.prepare(*[family.nets[n] for n in names],
                                       *[family.optimizers[n] for n in opt_names])
        family.nets = dict(zip(names, prepared[:len(names)]))
        family.optimizers = dict(zip(opt_names, prepared[len(names):]))
        for opt in family.optimizers.values():
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])
        # This launch's optimizer settings, put back after a resume: loading a checkpoint restores
        # the saved param groups, so a --lr, --weight-decay or beta changed on resume was ignored
        # while config.json and the logs showed the new value.
        self._settings = {name: [{k: g[k] for k in OPTIMIZER_SETTINGS if k in g} for g in opt.param_groups]
                          for name, opt in family.optimizers.items()}
        self.ema = EMA({n: self.plain(n) for n in family.ema_names}, self.cfg.ema_decay)
        # Progress and EMA are saved by save() and loaded by resume() with weights_only=True, not
        # registered with Accelerate: its load_custom_state unpickles them with weights_only=False.

    def plain(self, name: str) -> torch.nn.Module:
        """Network ``name`` without DDP or torch.compile wrappers: its state-dict keys carry no
        ``module.`` or ``_orig_mod.`` (accelerate keeps the compile wrapper unless told not to)."""
        return self.acc.unwrap_model(self.family.nets[name], keep_torch_compile=False)

    # ---- one optimizer step -------------------------------------------------------------
    def optimize(self, loss: torch.Tensor, name: str) -> None:
        """Backward, clip when the gradients sync, step and zero one optimizer."""
        opt = self.family.optimizers[name]
        self.acc.backward(loss)
        if self.acc.sync_gradients and self.cfg.grad_clip > 0:
            # Unscale (fp16) this optimizer only: accelerator.clip_grad_norm_ would unscale every
            # optimizer, corrupting a second optimizer's half-accumulated gradients (GANs).
            self.acc.unscale_gradients(optimizer=opt)
            params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def set_lr(self, step: int) -> float:
        """Warm-up, then --lr-schedule: a function of the step, so resume needs no state."""
        factor = lr_schedule.lr_factor(step, self.cfg.steps, self.cfg.warmup_steps, self.cfg.lr_schedule, self.cfg.lr_decay_start)
        for opt in self.family.optimizers.values():
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * factor
        return factor * self.cfg.lr

    # ---- checkpoints ------------------------------------------------------------------
    def save(self) -> None:
        step = self.progress.step
        root = ckpt.checkpoint_root(self.out)
        tmp = ckpt.temp_name(root, step)
        if self.acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        if self.acc.is_main_process:
            ckpt.save_trainer_state(tmp, {"progress": self.progress.state_dict(), "ema": self.ema.state_dict()})
            ckpt.save_ema_weights(tmp, {n: m.state_dict() for n, m in self.ema.nets.items()})
            ckpt.write_meta(tmp, step, {"world_size": self.acc.num_processes})
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            ckpt.publish(tmp, ckpt.final_name(root, step))
            ckpt.prune(self.out, self.cfg.keep_checkpoints)
        self.acc.wait_for_everyone()

    def resume(self) -> bool:
        latest = ckpt.latest_checkpoint(self.out)
        if latest is None:
            return False
        try:
            if ckpt.is_legacy(latest):
                # Accelerate unpickles its registered objects (weights_only=False) and refuses a
                # folder whose count differs: register them for this one load of an old checkpoint.
                self.acc.register_for_checkpointing(self.progress, self.ema)
                try:
                    self.acc.load_state(str(latest))
                finally:
                    self.acc._custom_objects.clear()
            else:
                self.acc.load_state(str(latest))
                state = ckpt.load_trainer_state(latest)
                self.progress.load_state_dict(state["progress"])
                self.ema.load_state_dict(state["ema"])
        except Exception as err:  # noqa: BLE001
            raise UserError(f"checkpoint {latest} could not be loaded ({type(err).__name__}); "
                            "move it aside to resume from the one before", exit_code=1) from None
        for name, opt in self.family.optimizers.items():
            for group, settings in zip(opt.param_groups, self._settings[name]):
                group.update(settings)
        self.acc.step = 0  # micro-batch counter: every checkpoint sits on a step boundary
        self.acc.project_configuration.iteration = self.progress.step
        saved_world = ckpt.read_meta(latest).get("world_size")
        if saved_world not in (None, self.acc.num_processes) and self.acc.is_main_process:
            # Each rank's data stream and seeds depend on its rank and the world size.
            n = self.acc.num_processes
            print(f"warning: resuming {self.out} with {n} process{'' if n == 1 else 'es'}, saved with {saved_world}; "
                  "the run continues but will not match an uninterrupted one", file=sys.stderr)
        return True

    # ---- the loop -----------------------------------------------------------------------
    def fit(self, end_training: bool = True) -> int:
        cfg, acc = self.cfg, self.acc
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.clean_temporaries(self.out)
        acc.wait_for_everyone()
        resumed = self.resume()
        start = self.progress.step
        if start >= cfg.steps:
            acc.print(f"run {self.out} is already at its last step ({start} of {cfg.steps}); nothing to do")
            self.finished = True
            return 0
        if acc.is_main_process:
            # Rows after the checkpoint resumed from (or all rows, on a fresh start) belong to an
            # attempt that died before saving: without this the curve shows both attempts.
            self.metrics.truncate_after(start)
            if resumed:
                restarts = os.environ.get("SLURM_RESTART_COUNT")
                acc.print(f"resuming {self.out} from step {start}"
                          + (f" (SLURM_RESTART_COUNT={restarts})" if restarts is not None else ""))
        self.stop.install()
        stream = self.batches(start)
        bar = tqdm(total=cfg.steps, initial=start, disable=not acc.is_main_process, dynamic_ncols=True,
                   desc=self.family.name or "train")
        logs = StepLogs()
        skipped = 0
        t_last, logged = time.perf_counter(), start  # a resumed run's first log may cover < log_every steps
        while self.progress.step < cfg.steps:
            step = self.progress.step
            lr = self.set_lr(step)
            for micro in range(cfg.grad_accum):
                batch = next(stream)
                skipped += int(batch.pop("skipped", 0))
                batch = memory_layout.batch_to(batch, acc.device, self.batch_format)
                torch.manual_seed(step_seed(cfg.seed, acc.process_index, step, micro))
                with acc.accumulate(*self.family.nets.values()):
                    logs.add(step + 1, self.family.training_step(batch, self.optimize))
            self.ema.update({n: self.plain(n) for n in self.ema.nets})
            self.progress.step = done = step + 1
            bar.update(1)
            log_due = done % cfg.log_every == 0 or done == cfg.steps
            sample_due = bool(cfg.sample_every) and (done % cfg.sample_every == 0 or done == cfg.steps)
            eval_due = self._eval_due(done)
            if self.read_every_step:
                stop_now, diverged = self._agree(self.stop.requested, self._read(logs, bar))
            else:  # a GPU: read the logs only where the loop waits anyway, agree on stops one step late
                stop_now = self._stop_vote(self.stop.requested)
                save_due = done % cfg.ckpt_every == 0 or done == cfg.steps or stop_now
                diverged = (log_due or sample_due or eval_due or save_due) and self._agree(False, self._read(logs, bar))[1]
            if diverged:
                bar.close()
                self._diverged(logs.first_non_finite() or done, "the loss")
            if log_due:
                now = time.perf_counter()
                self._log(done, logs.means(), skipped, lr, (done - logged) / max(now - t_last, 1e-9))
                if logs.warning and acc.is_main_process:
                    tqdm.write(f"warning at step {done}: {logs.warning}")
                    self.metrics.write({"step": done, "kind": "warning", "message": logs.warning})
                logs.clear()
                t_last, logged = now, done
            if sample_due:
                self.write_grid(done)
            best = self.evaluate(done) if eval_due else False
            if done % cfg.ckpt_every == 0 or done == cfg.steps or stop_now or best:
                if self._agree(False, not self._weights_finite())[1]:  # never publish non-finite weights
                    bar.close()
                    self._diverged(done, "a weight")
                self.save()
            if best and acc.is_main_process:
                ckpt.keep_as_best(self.out, done)
            if stop_now and done < cfg.steps:  # a stop at the last step finishes the run below
                bar.close()
                self.stop.uninstall()
                acc.print(f"received {self.stop.received or 'a stop request on another rank'}: "
                          f"saved step {done} to {self.out}; re-run the same command to resume")
                return 0
        bar.close()
        self.stop.uninstall()
        self.finished = True
        if acc.is_main_process:
            self.write_final_metrics()
            plot_losses(self.metrics.read(), self.out / "loss_curve.png")
            acc.print(f"finished {cfg.steps} step{'' if cfg.steps == 1 else 's'}; weights, grids and metrics are in {self.out}")
        if end_training:  # ends the trackers and the process group
            # together (the likely cause of one abort at exit in CI: a rank tore it down mid-plot)
            acc.wait_for_everyone()
            acc.end_training()
        else:  # a run follows in this launch (ldm after its autoencoder): keep the process group
            for tracker in acc.trackers:
                tracker.finish()
        return 0

    def _eval_due(self, done: int) -> bool:
        every = self.cfg.eval_every
        return self.evaluator is not None and every > 0 and (done % every == 0 or done == self.cfg.steps)

    def evaluate(self, step: int) -> bool:
        """Run the evaluator on every rank with the EMA networks; True when a best checkpoint is due."""
        with self.family.using(self.ema.nets):
            result = self.evaluator(self.family, step)
        if self.acc.is_main_process:
            self.metrics.write({"step": step, "kind": "eval", **result})
            summary = ", ".join(f"{k}={v:.4g}" for k, v in result.items() if k not in ("is_best", "eval_num"))
            tqdm.write(f"step {step}: {summary} ({int(result.get('eval_num', 0))} samples)")
        if self.cfg.log_with:
            self.acc.log({f"eval/{k}": v for k, v in result.items()}, step=step)
        best = bool(self.cfg.keep_best and result.get("is_best"))
        if self.acc.num_processes > 1:
            # Each rank scored the same gathered features, but a last-bit difference between their
            # floating-point results would send one rank into the save's collectives alone: rank 0
            # decides for all.
            flag = torch.full((1,), float(best), device=self.acc.device)
            best = bool(broadcast(flag, from_process=0).item() > 0)
        return best

    def _diverged(self, step: int, what: str) -> None:
        kept = ("the last good checkpoint was kept" if ckpt.latest_checkpoint(self.out) is not None
                else "no checkpoint had been saved yet")  # don't promise one that does not exist
        raise UserError(f"training diverged: {what} became non-finite at step {step}; "
                        f"{kept} (try a lower --lr)", exit_code=1)

    def _weights_finite(self) -> bool:
        """Every parameter and buffer of the live and the EMA networks is finite (one host sync)."""
        tensors = [t for n in self.family.nets for t in self.plain(n).state_dict().values()]
        tensors += [t for m in self.ema.nets.values() for t in m.state_dict().values()]
        flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
        return bool(torch.stack(flags).all()) if flags else True

    def _read(self, logs: StepLogs, bar) -> bool:
        """Read the pending logs (one device-to-host copy), let the family look at each micro-batch's
        values (a GAN's monitor), show the window's means; True when one of them is not finite."""
        rows = logs.read()
        if rows and hasattr(self.family, "observe_logs"):
            warning = self.family.observe_logs([row for _, row in rows])
            logs.warning = warning or logs.warning
        bar.set_postfix({k: f"{v:.4g}" for k, v in list(logs.means().items())[:3]})
        return any(not math.isfinite(v) for _, row in rows for v in row.values())

    def _stop_vote(self, stop: bool) -> bool:
        """Whether any rank had been asked to stop one step ago, without waiting for the GPU.

        Each step's flags are summed across ranks on the device (queued behind the step's kernels)
        and read one step later, when that step's work is done or nearly: every rank reads the same
        sum, so all stop after the same step."""
        if self.acc.num_processes == 1:
            return stop
        flag = torch.full((1,), float(stop), device=self.acc.device)  # no host-to-device copy
        flag = self.acc.reduce(flag, reduction="sum")
        previous, self._pending_vote = self._pending_vote, flag
        return previous is not None and bool(previous.item() > 0)

    def _agree(self, stop: bool, bad: bool) -> tuple[bool, bool]:
        """Every rank learns whether any rank was signalled or saw a non-finite loss."""
        flags = torch.tensor([float(stop), float(bad)], device=self.acc.device)
        if self.acc.num_processes > 1:
            flags = self.acc.reduce(flags, reduction="sum")
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def _log(self, step: int, means: dict[str, float], skipped: int, lr: float, steps_per_s: float) -> None:
        keys = sorted(means)
        local = torch.tensor([means[k] for k in keys] + [float(skipped)], dtype=torch.float64, device=self.acc.device)
        if self.acc.num_processes > 1:
            local = self.acc.reduce(local.float(), reduction="sum").double()
            local[:-1] /= self.acc.num_processes
        record = {"step": step, "kind": "train", "lr": lr, "steps_per_s": round(steps_per_s, 3),
                  "skipped_samples": int(local[-1].item())}
        record.update({k: float(local[i].item()) for i, k in enumerate(keys)})
        if self.acc.is_main_process:
            self.metrics.write(record)
            if record["skipped_samples"] and not self._warned_skips:  # once: metrics.jsonl has the count
                self._warned_skips = True
                print(f"warning: {record['skipped_samples']} samples of {self.cfg.data} could not be decoded and "
                      f"were skipped (by step {step}; metrics.jsonl counts them as skipped_samples)", file=sys.stderr)
        if self.cfg.log_with:
            self.acc.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)

    def write_final_metrics(self) -> None:
        """The family's end-of-training measurement (``final_metrics``), with the EMA networks."""
        if not hasattr(self.family, "final_metrics"):
            return
        rng_state = torch.get_rng_state()
        with self.family.using(self.ema.nets):
            values = self.family.final_metrics()
        torch.set_rng_state(rng_state)
        self.metrics.write({"step": self.progress.step, "kind": "final", **values})
        self.acc.print("final: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in values.items()))

    def write_grid(self, step: int) -> None:
        """Sample a grid with the EMA networks and a fixed seed (main process only, no collectives)."""
        if not self.acc.is_main_process:
            return
        labels = self.grid_labels
        n = len(labels) if labels is not None else 64
        gen = torch.Generator().manual_seed(self.cfg.seed)
        rng_state = torch.get_rng_state()
        with self.family.using(self.ema.nets):
            if hasattr(self.family, "grid"):  # families that show inputs beside outputs (pix2pix)
                images, nrow = self.family.grid(gen)
            else:
                images = self.family.sample(n, labels=None if labels is None else labels.to(self.acc.device),
                                            generator=gen)
                nrow = int(labels.bincount().max().item()) if labels is not None else 8
        torch.set_rng_state(rng_state)
        (self.out / "samples").mkdir(parents=True, exist_ok=True)
        save_grid(self.out / "samples" / f"step-{step:08d}.png", images, nrow=nrow)
