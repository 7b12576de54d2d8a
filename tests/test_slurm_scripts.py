"""slurm/ scripts without a cluster: the per-node launch command for GPU and CPU allocations, and
the sweep script's argument errors. (tests/test_slurm.py runs them on a real SLURM cluster.)"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
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
    ({"SLURM_GPUS_PER_NODE": "gpu:a100:2,v100:1"}, 3),  # several GPU types: their counts add up
    ({"SLURM_GPUS_PER_NODE": "4"}, 4),
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
    # each of these started every array task, or printed bash's own "line 54: 2: --configs needs a file"
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n\n")
    task = {"SLURM_ARRAY_TASK_ID": "0", "SLURM_JOB_ID": "5"}
    for args, sentence in [(("--configs", str(empty)), f"the sweep file {empty} holds no lines of arguments"),
                           (("--seed", "{i}", "--configs", str(lines)), "--configs FILE must come first"),
                           (("--configs",), "--configs needs a file of train.py arguments")]:
        proc = sweep(task, *args)
        assert proc.returncode == 2 and proc.stderr.strip().startswith(f"error: {sentence}"), (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1


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


def test_report_finished_writes_the_word_atomically_and_only_inside_a_job(tmp_path, monkeypatch, capsys):
    from genscale import run_status

    monkeypatch.delenv("GENSCALE_STATUS_FILE", raising=False)
    run_status.report_finished()  # no batch shell asked: nothing is written anywhere
    assert list(tmp_path.iterdir()) == []

    target = tmp_path / ".genscale" / "status-42"
    monkeypatch.setenv("GENSCALE_STATUS_FILE", str(target))
    replaced = []
    real_replace = os.replace
    def recording_replace(src, dst):
        replaced.append((src, dst))
        real_replace(src, dst)

    monkeypatch.setattr(run_status.os, "replace", recording_replace)
    run_status.report_finished()
    assert target.read_text().split() == ["finished"]
    # Written under another name in the same folder, then renamed: the shell never reads half a word.
    [(src, dst)] = replaced
    assert Path(dst) == target and Path(src).parent == target.parent and Path(src) != target
    assert sorted(p.name for p in target.parent.iterdir()) == ["status-42"]  # no temporary left over

    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("GENSCALE_STATUS_FILE", str(blocked / "status-42"))
    run_status.report_finished()  # the run has completed: a status file it cannot write only warns
    assert "cannot write" in capsys.readouterr().err


FAKE_SRUN = """#!/usr/bin/env bash
# The step: records whether a status file was left over, then plays FAKE_PLAN in order.
[[ -e ${GENSCALE_STATUS_FILE:-/nonexistent} ]] && echo "srun saw a stale status file" >> "$FAKE_CALLS"
for action in $FAKE_PLAN; do
    case $action in
        finish) "$FAKE_PYTHON" -c "from genscale import run_status; run_status.report_finished()" ;;
        usr1) kill -USR1 "$FAKE_BATCH_SHELL"; sleep 0.2 ;;  # the warning (--signal=B:USR1@120)
        term) kill -TERM "$FAKE_BATCH_SHELL"; sleep 0.2 ;;  # SLURM's SIGTERM to the batch shell
    esac
done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_CALLS"
if [[ "$1 $2" == "show job" ]]; then echo "JobId=42 JobName=genscale-train Reason=$FAKE_REASON Restarts=0"; fi
if [[ $1 == requeue && -n ${FAKE_REQUEUE_FAILS:-} ]]; then  # e.g. a job submitted with --no-requeue
    echo "Requested operation is presently disabled for job 42" >&2; exit 1
fi
"""
FAKE_SCANCEL = """#!/usr/bin/env bash
echo "scancel $*" >> "$FAKE_CALLS"
"""


def _start_batch(folder: Path, plan: str, reason: str = "None", resumable: str = "1",
                 stale: bool = False, requeue_fails: bool = False) -> tuple[subprocess.Popen, Path]:
    """genscale_run in a batch shell of its own, with srun, scontrol and scancel faked on PATH."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL), ("scancel", FAKE_SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    if stale:  # left by an earlier attempt of the same job id
        (folder / ".genscale").mkdir()
        (folder / ".genscale" / "status-42").write_text("finished\n")
    calls = folder / "calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GENSCALE_"))}
    env.update({"PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "PYTHONPATH": str(ROOT),
                "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node1", "SLURM_SUBMIT_DIR": str(folder),
                "GENSCALE_MAIN_ADDR": "10.0.0.7", "GENSCALE_ROOT": str(ROOT),
                "FAKE_CALLS": str(calls), "FAKE_PLAN": plan, "FAKE_REASON": reason, "FAKE_PYTHON": sys.executable})
    if resumable == "0":
        env["GENSCALE_RESUMABLE"] = "0"
    if requeue_fails:
        env["FAKE_REQUEUE_FAILS"] = "1"
    script = f"""
        set -uo pipefail
        export FAKE_BATCH_SHELL=$$
        source {shlex.quote(str(SLURM / 'common.sh'))}
        genscale_run genscale/train.py --steps 10
    """
    proc = subprocess.Popen(["bash", "-c", script], env=env, cwd=folder, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return proc, calls


def _batches(tmp_path: Path, cases: dict[str, dict]) -> dict[str, tuple[int, str, list[str]]]:
    """Every case at once (each waits ~1 s in genscale_run's loop): exit code, log, fake calls."""
    started = {name: _start_batch(tmp_path / name, **kw) for name, kw in cases.items()}
    results = {}
    for name, (proc, calls) in started.items():
        log, _ = proc.communicate(timeout=60)
        results[name] = (proc.returncode, log, calls.read_text().splitlines() if calls.exists() else [])
    return results


def _status_files_left(tmp_path: Path) -> list[str]:
    """The shell removes the status file once it has read it (and before the step starts)."""
    return [str(p.relative_to(tmp_path)) for p in tmp_path.glob("*/.genscale/*")]


def test_a_command_that_finished_is_not_requeued_by_a_late_warning(tmp_path):
    """The warning came after the last step (or while it was being passed on): requeued, the job only
    waited in the queue, started and printed "nothing to do". A stopped run still requeues."""
    results = _batches(tmp_path, {
        "finished_then_warned": {"plan": "finish usr1"},
        "warned_while_finishing": {"plan": "usr1 finish"},
        "stopped_by_the_warning": {"plan": "usr1"},
        "stale_word_from_an_earlier_attempt": {"plan": "usr1", "stale": True},
    })
    for name in ("finished_then_warned", "warned_while_finishing"):
        rc, log, calls = results[name]
        assert rc == 0 and "scontrol requeue 42" not in calls, (name, log, calls)
        assert "scancel --signal=USR1 42" in calls  # the warning was still passed on
        assert "the command finished (the step ended with exit code 0), so no requeue" in log, log
    for name in ("stopped_by_the_warning", "stale_word_from_an_earlier_attempt"):
        rc, log, calls = results[name]
        assert rc == 0 and "scontrol requeue 42" in calls and "so no requeue" not in log, (name, log, calls)
    assert "srun saw a stale status file" not in results["stale_word_from_an_earlier_attempt"][2]
    assert _status_files_left(tmp_path) == []


def test_time_limit_requeues_only_an_unfinished_command(tmp_path):
    results = _batches(tmp_path, {
        "finished_at_the_time_limit": {"plan": "finish term", "reason": "TimeLimit"},
        "stopped_at_the_time_limit": {"plan": "term", "reason": "TimeLimit"},
        "cancelled_after_the_warning": {"plan": "usr1 term", "reason": "None"},
        "not_resumable": {"plan": "usr1", "resumable": "0"},
    })
    rc, log, calls = results["finished_at_the_time_limit"]
    assert rc == 0 and "scontrol requeue 42" not in calls and "so no requeue" in log, (log, calls)
    rc, log, calls = results["stopped_at_the_time_limit"]
    assert "scontrol requeue 42" in calls, (log, calls)
    for name in ("cancelled_after_the_warning", "not_resumable"):  # as before: never requeued by the shell
        rc, log, calls = results[name]
        assert "scontrol requeue 42" not in calls, (name, log, calls)
    assert _status_files_left(tmp_path) == []


def test_a_requeue_that_fails_fails_the_job(tmp_path):
    """scontrol requeue refused (a job submitted with --no-requeue): the shell said "requeueing" and
    exited 0, so the unfinished run ended COMPLETED and jobs waiting on afterok started."""
    rc, log, calls = _batches(tmp_path, {"no_requeue": {"plan": "usr1", "requeue_fails": True}})["no_requeue"]
    assert "scontrol requeue 42" in calls
    assert rc == 1 and "job 42 could not be requeued; submit the same command again to resume" in log, (rc, log)


def test_batch_scripts_outside_a_job_and_bad_process_counts_are_one_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GENSCALE_"))}
    for script in ("train.sbatch", "eval.sbatch"):  # was "SLURM_JOB_ID: unbound variable", twice
        proc = subprocess.run(["bash", str(SLURM / script), "--model", "ddpm"], env=env, capture_output=True,
                              text=True, timeout=30)
        assert proc.returncode == 2 and proc.stderr.strip() == f"error: {script} is a SLURM batch script: submit it with sbatch"
    for value in ("0", "abc", "-2"):  # was bash's "division by 0" / "abc: unbound variable" on every node
        proc = subprocess.run(["bash", str(SLURM / "launch_node.sh"), "genscale/train.py"],
                              env={**env, "GENSCALE_PROCS_PER_NODE": value, "GENSCALE_DRY_RUN": "1"},
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and proc.stderr.strip() == (
            f"error: GENSCALE_PROCS_PER_NODE must be a positive whole number; got '{value}'"), proc.stderr


@pytest.mark.parametrize("finished, rank, written", [(True, "0", True), (False, "0", False), (True, "1", False)])
def test_train_main_reports_only_a_completed_run_from_the_main_process(tmp_path, monkeypatch, finished, rank, written):
    """train.py's main: the word is written when the run (or, for ldm, the whole command) reached its
    last step, by rank 0 only; a run stopped by the warning leaves no word, so the job requeues."""
    import genscale.train as train_module

    status = tmp_path / "status"
    monkeypatch.setenv("GENSCALE_STATUS_FILE", str(status))
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(train_module, "train", lambda run, last=True: finished)
    assert train_module.main(["--model", "ddpm", "--out", str(tmp_path / "run")]) == 0
    assert status.exists() == written
    if written:
        assert status.read_text() == "finished\n"


def test_a_real_run_that_completes_writes_finished(tmp_path):
    status = tmp_path / "status"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENSCALE_THREADS": "1", "GENSCALE_STATUS_FILE": str(status),
           "GENSCALE_CACHE": str(tmp_path / "cache")}
    args = ["--steps", "2", "--batch-size", "8", "--ckpt-every", "2", "--sample-every", "0", "--timesteps", "20",
            "--base-width", "16", "--channel-mults", "1,2", "--attention-res", "4", "--image-size", "8",
            "--sampling-steps", "3", "--num-workers", "0", "--out", str(tmp_path / "run")]
    proc = subprocess.run([sys.executable, str(ROOT / "genscale" / "train.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert status.read_text() == "finished\n"
