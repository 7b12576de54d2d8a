"""Evaluation during training (``--eval-every K``): the trainer's hook, called on every rank.

    evaluator = TrainingEvaluator(run, info, accelerator)   # fails now if it could not work
    trainer = Trainer(run, family, stream, accelerator, labels, evaluator)
    # the trainer keeps it inside its Progress (trainer_state.pt of every checkpoint), so the
    # best score survives a resume, also one that newly turns --eval-every on
    ...
    with family.using(ema.nets):
        result = evaluator(family, step)                     # every rank, the same step
    if main process: metrics.write({"step": step, "kind": "eval", **result})
    if cfg.keep_best and result["is_best"]: save the best checkpoint

Each call draws ``eval_num`` samples split across the ranks (every rank draws its chunks, then
one gather: no rank waits alone in a collective), featurises them and compares with the test
split of the run's data, beside the real-vs-real floor of the same size. Samples come from
the run's seed and the sample index only, so successive evaluations differ by the weights
alone. Torch's global RNG is left as it was found.
"""
from __future__ import annotations

import math
import time

import torch

from genscale.errors import UserError
from genscale.metrics.evaluation import EvalSetup, Evaluator, family_images, intended_labels, needs_input_images

# The metrics a run can track while it trains (evaluate.py has more: classes, nelbo).
HIGHER_IS_BETTER = {"fid": False, "kid": False, "accuracy": True, "psnr": True}
METRICS = tuple(HIGHER_IS_BETTER)


def check_family_fits(metric: str, family, model: str) -> None:
    """What the data alone cannot tell: labelled digits under an unconditional model (gan, vae)
    would score the judge's chance agreement with labels the samples never saw, and a model that
    fills no holes would fail at the first evaluation, after the steps before it were trained."""
    from genscale.inpainting import can_inpaint

    if metric == "accuracy" and not getattr(family, "num_classes", 0):
        raise UserError(f"--eval-metric accuracy needs a class-conditional model; {model} generates without "
                        "labels (use --eval-metric fid or kid).")
    if metric == "psnr" and not can_inpaint(family):
        raise UserError(f"--eval-metric psnr needs a model that fills holes (inpaint, gan-inpaint, transformer, "
                        f"ddpm); {model} does not.")


def check_settings(run, info) -> None:
    """The --eval-* flags against the data: refused before the run folder is written, not at the
    first evaluation after --eval-every steps of training."""
    cfg = run.train
    metric, num = getattr(cfg, "eval_metric", "fid"), int(getattr(cfg, "eval_num", 1000))
    if metric not in METRICS:
        raise UserError(f"--eval-metric must be one of {', '.join(METRICS)}, got {metric!r}.")
    if num < 2:
        raise UserError(f"--eval-num must be at least 2, got {num}.")
    if metric == "accuracy" and not info.num_classes:
        raise UserError("--eval-metric accuracy needs labelled data (a class-conditional run).")
    if metric in ("fid", "kid", "accuracy"):
        from genscale.families import family_module
        from genscale.metrics.features import check_features_available

        if needs_input_images(family_module(cfg.model).FAMILY, info):
            raise UserError(f"--eval-metric {metric} needs a model that generates from noise; "
                            f"{cfg.model} transforms input images (use --eval-metric psnr for inpainting).")
        features = getattr(cfg, "eval_features", "judge")
        check_features_available("judge" if metric == "accuracy" else features, info.name, "--eval-features")
    from genscale.data import resolve_data

    try:
        resolve_data(cfg.data, "test", cfg.cache_dir or None)
    except UserError as err:
        raise UserError(f"--eval-every compares with held-out images, but {err}") from None


class TrainingEvaluator:
    def __init__(self, run, info, accelerator=None):
        cfg = run.train
        check_settings(run, info)
        self.metric = getattr(cfg, "eval_metric", "fid")
        self.num = int(getattr(cfg, "eval_num", 1000))
        features = getattr(cfg, "eval_features", "judge")
        self.info = info
        self.acc = accelerator
        self.mask = getattr(run.options, "mask", "mixed")
        self.evaluator = Evaluator(EvalSetup(metric=self.metric, features=features, reference=cfg.data,
                                             split="test", image_size=info.image_size, channels=info.channels,
                                             judge_dataset=info.name, seed=cfg.seed,
                                             cache_dir=cfg.cache_dir or None), accelerator)
        self.seed = cfg.seed
        self.best: float | None = None
        self.best_step: int | None = None

    def _rng_devices(self) -> list:
        device = self.acc.device if self.acc is not None else torch.device("cpu")
        return [device] if device.type == "cuda" else []

    def __call__(self, family, step: int) -> dict[str, float]:
        """Evaluate ``family`` (with whatever networks it holds now); the same dict on every rank.

        Keys: the metric (e.g. ``fid``), ``<metric>_floor`` (real vs real, same size; for psnr
        ``psnr_biharmonic``), ``eval_num``, ``eval_seconds``, ``is_best`` (1.0 if this is the best
        score so far, else 0.0), ``best`` (the best score so far).
        """
        start = time.perf_counter()
        ev = self.evaluator
        with torch.random.fork_rng(devices=self._rng_devices()):
            if self.metric in ("fid", "kid"):
                labels = intended_labels(self.num, self.info.num_classes)
                feats = ev.features_of(family_images(family, labels, self.seed), self.num)
                result = ev.distance(feats)
                floor = result[f"{self.metric}_floor"]
            elif self.metric == "accuracy":
                labels = intended_labels(self.num, self.info.num_classes)
                result = ev.accuracy(family_images(family, labels, self.seed), labels.numpy())
                floor = result["accuracy_floor"]
            else:
                result = ev.psnr(family, self.num, self.mask)
                floor = result["psnr_biharmonic"]
        value = float(result[self.metric])
        improved = math.isfinite(value) and (
            self.best is None or (value > self.best if HIGHER_IS_BETTER[self.metric] else value < self.best))
        if improved:
            self.best, self.best_step = value, step
        floor_key = "psnr_biharmonic" if self.metric == "psnr" else f"{self.metric}_floor"
        return {self.metric: value, floor_key: float(floor), "eval_num": float(result["num"]),
                "eval_seconds": round(time.perf_counter() - start, 3), "is_best": 1.0 if improved else 0.0,
                "best": float(self.best) if self.best is not None else math.nan}

    def restore(self, records: list[dict], upto_step: int) -> None:
        """The best score from metrics.jsonl records of this metric up to ``upto_step`` (an
        alternative to the checkpoint registry that also works when --eval-every is turned on
        in a resumed run; every rank must see the same file)."""
        scores = [(float(r[self.metric]), int(r["step"])) for r in records
                  if r.get("kind") == "eval" and self.metric in r and int(r.get("step", 0)) <= upto_step
                  and math.isfinite(float(r[self.metric]))]
        if scores:
            pick = max if HIGHER_IS_BETTER[self.metric] else min
            self.best, self.best_step = pick(scores, key=lambda s: s[0])

    # Progress (genscale/trainer.py) saves and loads these: the best score survives a resume.
    def state_dict(self) -> dict:
        return {"metric": self.metric, "best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        if state.get("metric") == self.metric:  # a resumed run that changed --eval-metric starts afresh
            self.best, self.best_step = state.get("best"), state.get("best_step")
