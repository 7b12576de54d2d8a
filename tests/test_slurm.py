"""slurm/*.sbatch on a real SLURM cluster: two emulated nodes on this machine (tests/slurm/cluster.py).

The jobs are submitted together and share the cluster's four CPUs: a 2-node reference run, the
same run preempted by the warning signal (it saves, requeues itself and resumes), a job array of
two, and an evaluation that waits for the reference run (--dependency=afterok). Skipped, with
the reason, only where SLURM cannot be installed (not root, no apt-get, no Debian registry).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.slurm.cluster import FINAL_STATES, SlurmCluster, ensure_installed
from tests.test_end_to_end import TINY

ROOT = Path(__file__).resolve().parent.parent
SLURM = ROOT / "slurm"
JOB_TIMEOUT = 300  # seconds, per job; the whole module takes ~2 minutes on 2 busy cores
STEPS = int(TINY[TINY.index("--steps") + 1])
LOG_EVERY = int(TINY[TINY.index("--log-every") + 1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = ensure_installed()
    if reason:
        pytest.skip(f"no SLURM cluster on this machine: {reason}")
    c = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2, cpus=2)
    try:
        c.start()
        yield c
    finally:
        c.cancel_all()
        c.stop()


def job_env(cache: Path) -> dict:
    """The submitting shell's environment: this venv first on PATH, one thread per process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update({"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                "OMP_NUM_THREADS": "1", "GENSCALE_THREADS": "1", "GENSCALE_CACHE": str(cache),
                "PYTHONUNBUFFERED": "1"})
    return env


@dataclass
class Jobs:
    work: Path
    ids: dict[str, str]
    info: dict[str, dict[str, str]] = field(default_factory=dict)

    def log(self, name: str) -> str:
        """The job's log, named as the script's #SBATCH --output says, in the submission folder."""
        pattern = {"reference": "genscale-train-{}.out", "preempted": "genscale-train-{}.out",
                   "eval": "genscale-eval-{}.out", "sweep_0": "genscale-sweep-{}.out",
                   "sweep_1": "genscale-sweep-{}.out"}[name]
        path = self.work / pattern.format(self.ids[name])
        return path.read_text(errors="replace").replace("\r", "\n") if path.is_file() else f"(no log {path.name})"

    def check(self, name: str, cluster: SlurmCluster) -> dict[str, str]:
        info = self.info[name]
        assert info.get("JobState") == "COMPLETED", (
            f"{name} job {self.ids[name]}: {info.get('JobState')} {info.get('Reason')}\n"
            f"{self.log(name)[-4000:]}\n{cluster.logs_tail(1500)}")
        return info


def send_warning_when_training(cluster: SlurmCluster, job: str, out: Path) -> None:
    """Once the run has logged its first steps, send what ``--signal=B:USR1@120`` sends."""
    metrics = out / "metrics.jsonl"
    deadline = time.time() + JOB_TIMEOUT
    polls = 0
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
        polls += 1
        if polls % 20 == 0 and cluster.job(job).get("JobState") in FINAL_STATES:
            return  # it failed early: the test reports the job's log
        time.sleep(0.1)
    proc = cluster.run("scancel", "--batch", "--signal=USR1", job)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory) -> Jobs:
    work = tmp_path_factory.mktemp("jobs")
    cache = work / "cache"
    from genscale.data import resolve_data

    resolve_data("digits", "train", str(cache))  # written once here, not raced by four jobs
    env = job_env(cache)
    train, sweep, evaluate = (str(SLURM / f"{n}.sbatch") for n in ("train", "sweep", "eval"))
    (work / "sweep.txt").write_text("# one line per array task\n--seed 3\n\n--seed 4 --lr 3e-4\n")
    ids = {
        "reference": cluster.sbatch(["--nodes=2", "--cpus-per-task=1", train, *TINY, "--out", str(work / "reference")],
                                    env, work),
        "preempted": cluster.sbatch(["--nodes=2", "--cpus-per-task=1", train, *TINY, "--out", str(work / "preempted")],
                                    env, work),
    }
    array = cluster.sbatch(["--array=0-1", "--cpus-per-task=1", sweep, "--configs", str(work / "sweep.txt"), *TINY,
                            "--steps", "6", "--out", str(work / "sweep" / "{i}")], env, work)
    ids["eval"] = cluster.sbatch([f"--dependency=afterok:{ids['reference']}", "--cpus-per-task=1", evaluate,
                                  "--run", str(work / "reference"), "--metric", "accuracy", "--num", "10",
                                  "--json", str(work / "eval.json")], env, work)
    ids = {k: str(v) for k, v in ids.items()}
    ids.update({"sweep_0": f"{array}_0", "sweep_1": f"{array}_1"})
    result = Jobs(work, ids)
    send_warning_when_training(cluster, ids["preempted"], work / "preempted")
    for name in ("preempted", "reference", "sweep_0", "sweep_1", "eval"):
        if name == "eval" and result.info["reference"].get("JobState") != "COMPLETED":
            cluster.run("scancel", ids["eval"])  # its dependency can never be met
        result.info[name] = cluster.wait(ids[name], JOB_TIMEOUT)
    return result


def test_two_node_job_is_one_process_group(jobs, cluster):
    info = jobs.check("reference", cluster)
    assert info["NodeList"] == "node[1-2]" and info["NumNodes"] == "2"
    cfg = json.loads((jobs.work / "reference" / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["num_machines"] == 2 and "MULTI_CPU" in cfg["distributed_type"]
    log = jobs.log("reference")
    assert re.search(r"node node1 machine_rank 0 of 2: 1 process", log), log[-3000:]
    assert re.search(r"node node2 machine_rank 1 of 2: 1 process", log), log[-3000:]
    assert f"finished {STEPS} steps" in log


def test_warning_signal_saves_requeues_and_resumes_exactly(jobs, cluster):
    info = jobs.check("preempted", cluster)
    log = jobs.log("preempted")
    assert info["Restarts"] == "1", log[-4000:]
    saved = re.findall(r"received SIGUSR1: saved step (\d+)", log)
    # accelerate's print speaks once per node (local main process), so one or two lines, one step
    assert 1 <= len(saved) <= 2 and len(set(saved)) == 1, f"the warning did not make the run save:\n{log[-4000:]}"
    step = int(saved[0])
    assert 0 < step < STEPS, f"the warning came too late to test anything (step {step})"
    assert "SLURM_RESTART_COUNT=0" in log and "SLURM_RESTART_COUNT=1" in log
    assert f"requeueing job {jobs.ids['preempted']}" in log
    assert f"resuming {jobs.work / 'preempted'} from step {step}" in log
    cfg = json.loads((jobs.work / "preempted" / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["num_machines"] == 2

    jobs.check("reference", cluster)
    final = f"checkpoints/step-{STEPS:08d}"
    ref, got = (load_file(str(jobs.work / r / final / "model.safetensors")) for r in ("reference", "preempted"))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    ref_ema, got_ema = (torch.load(jobs.work / r / final / "ema.pt", weights_only=True) for r in ("reference",
                                                                                                   "preempted"))
    for net in ref_ema:
        for k in ref_ema[net]:
            assert torch.equal(ref_ema[net][k], got_ema[net][k]), (net, k)

    def losses(run: str) -> list[tuple]:
        # A logged loss averages the steps since the previous log line; the window the resume cut
        # in two averages fewer steps in the resumed run, so it is left out.
        rows = [json.loads(line) for line in (jobs.work / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"]) for r in rows
                if r.get("kind") == "train" and not step < r["step"] < step + LOG_EVERY]

    assert losses("preempted") == losses("reference") and len(losses("reference")) >= STEPS // LOG_EVERY - 1


def test_sweep_array_runs_each_line(jobs, cluster):
    for task, seed, lr in ((0, 3, None), (1, 4, 3e-4)):
        jobs.check(f"sweep_{task}", cluster)
        cfg = json.loads((jobs.work / "sweep" / str(task) / "config.json").read_text())
        assert cfg["train"]["seed"] == seed and cfg["train"]["steps"] == 6 and cfg["world_size"] == 1
        if lr is not None:
            assert cfg["train"]["lr"] == lr
        assert "finished 6 steps" in jobs.log(f"sweep_{task}")
    assert json.loads((jobs.work / "sweep" / "0" / "config.json").read_text())["train"]["lr"] != 3e-4


def test_eval_job_after_training(jobs, cluster):
    jobs.check("eval", cluster)
    result = json.loads((jobs.work / "eval.json").read_text())
    assert result["metric"] == "accuracy" and result["source"] == str(jobs.work / "reference")
    assert result["generation"]["num"] == 10 and 0.0 <= result["accuracy"] <= 1.0
