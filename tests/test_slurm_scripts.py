"""slurm/ scripts without a cluster: the per-node launch command for GPU and CPU allocations, and
the sweep script's argument errors. (tests/test_slurm.py runs them on a real SLURM cluster.)"""
from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SLURM = ROOT / "slurm"


def launch(env: dict[str, str], *args: str) -> tuple[list[str], str]:
    """launch_node.sh's accelerate command (GENSCALE_DRY_RUN) and its log line, for a fake node."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "GENSCALE_", "CUDA_VISIBLE"))}
    clean.update({"GENSCALE_DRY_RUN": "1", "GENSCALE_MAIN_ADDR": "10.0.0.7", "GENSCALE_MAIN_PORT": "20042", **env})
    proc = subprocess.run(["bash", str(SLURM / "launch_node.sh"), "genscale/train.py", *args], env=clean,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    info, command = proc.stdout.strip().splitlines()
    return shlex.split(command), info


def flag(cmd: list[str], name: str) -> str | None:
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_scripts_parse():
    for script in ("train.sbatch", "sweep.sbatch", "eval.sbatch", "launch_node.sh", "common.sh"):
        proc = subprocess.run(["bash", "-n", str(SLURM / script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr}"
    text = (SLURM / "train.sbatch").read_text()
    for directive in ("--ntasks-per-node=1", "--signal=B:USR1@", "--requeue", "--open-mode=append",
                      "--output=%x-%j.out"):
        assert f"#SBATCH {directive}" in text, directive


@pytest.mark.parametrize("gpu_env, per_node", [
    ({"SLURM_GPUS_ON_NODE": "4"}, 4),
    ({"SLURM_GPUS_PER_NODE": "a100:2"}, 2),
    ({"SLURM_JOB_GPUS": "0,1,2"}, 3),
])
def test_one_process_per_gpu_across_nodes(gpu_env, per_node):
    cmd, info = launch({"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_CPUS_PER_TASK": "16", **gpu_env},
                       "--model", "ddpm", "--out", "runs/a b")
    assert cmd[:2] == ["accelerate", "launch"] and "--multi_gpu" in cmd
    assert flag(cmd, "--num_processes") == str(2 * per_node) and flag(cmd, "--num_machines") == "2"
    assert flag(cmd, "--machine_rank") == "1" and flag(cmd, "--main_process_ip") == "10.0.0.7"
    assert flag(cmd, "--main_process_port") == "20042" and flag(cmd, "--mixed_precision") == "bf16"
    assert flag(cmd, "--num_cpu_threads_per_process") == str(16 // per_node)
    assert cmd[-5:] == ["genscale/train.py", "--model", "ddpm", "--out", "runs/a b"]  # arguments kept intact
    assert f"machine_rank 1 of 2: {per_node} process(es)" in info


def test_one_gloo_process_per_node_without_gpus():
    cmd, info = launch({"SLURM_NNODES": "3", "SLURM_NODEID": "2", "SLURM_CPUS_PER_TASK": "4"})
    assert flag(cmd, "--num_processes") == "3" and flag(cmd, "--num_machines") == "3" and "--multi_gpu" in cmd
    assert flag(cmd, "--machine_rank") == "2" and flag(cmd, "--mixed_precision") == "no"
    assert "0 GPU(s), 4 thread(s)" in info


def test_single_cpu_node_needs_no_process_group():
    cmd, _ = launch({"SLURM_NNODES": "1", "SLURM_NODEID": "0"})
    assert flag(cmd, "--num_processes") == "1" and "--multi_gpu" not in cmd and "--machine_rank" not in cmd


def test_accelerate_config_picks_the_strategy():
    config = str(ROOT / "accelerate_configs" / "multi_node.yaml")
    cmd, _ = launch({"SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_GPUS_ON_NODE": "8",
                     "GENSCALE_ACCELERATE_CONFIG": config})
    assert flag(cmd, "--config_file") == config and flag(cmd, "--num_processes") == "16"
    assert "--multi_gpu" not in cmd and "--mixed_precision" not in cmd  # the YAML's strategy and bf16 apply


def sweep(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(["bash", str(SLURM / "sweep.sbatch"), *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=30)


def test_sweep_errors_are_one_line(tmp_path):
    proc = sweep({}, "--seed", "{i}")
    assert proc.returncode == 2 and "--array" in proc.stderr
    lines = tmp_path / "sweep.txt"
    lines.write_text("# comment\n--seed 1\n\n--seed 2\n")
    proc = sweep({"SLURM_ARRAY_TASK_ID": "2", "SLURM_JOB_ID": "5"}, "--configs", str(lines))
    assert proc.returncode == 2 and "holds 2: use --array=0-1" in proc.stderr
    proc = sweep({"SLURM_ARRAY_TASK_ID": "0", "SLURM_JOB_ID": "5"}, "--configs", str(tmp_path / "missing.txt"))
    assert proc.returncode == 2 and "cannot read" in proc.stderr


def _handlers(resumable: str, reason: str) -> str:
    """common.sh's USR1 and TERM handlers with scontrol/scancel stubbed: whether each asks for a requeue."""
    script = f"""
        scontrol() {{ echo "JobId=1 Reason={reason} Restarts=0"; }}
        scancel() {{ :; }}
        source {shlex.quote(str(SLURM / 'common.sh'))}
        GENSCALE_JOB=1
        {"export GENSCALE_RESUMABLE=0" if resumable == "0" else ""}
        _genscale_requeue=0; _genscale_on_usr1 >/dev/null; echo "usr1=$_genscale_requeue"
        _genscale_requeue=0; _genscale_on_term >/dev/null; echo "term=$_genscale_requeue"
    """
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_a_command_without_checkpoints_is_never_requeued_at_the_time_limit():
    """eval.sbatch: requeued at the warning, a finished evaluation ran again in full, and one longer
    than --time started over forever. Training still requeues at the warning and the time limit."""
    assert _handlers("1", "TimeLimit") == ["usr1=1", "term=1"]
    assert _handlers("0", "TimeLimit") == ["usr1=0", "term=0"]
    assert _handlers("1", "Preempted") == ["usr1=1", "term=0"]  # a cancel or preemption: SLURM decides
    eval_text = (SLURM / "eval.sbatch").read_text()
    assert "export GENSCALE_RESUMABLE=0" in eval_text and "--signal=B:USR1" not in eval_text
