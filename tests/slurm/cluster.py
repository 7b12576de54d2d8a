"""A real SLURM cluster on one host, for tests: munged, slurmctld and one slurmd per emulated node.

Debian's slurm-wlm is built with MULTIPLE_SLURMD, so several slurmd daemons on one machine act
as separate nodes (``node1``, ``node2``, ...), each on its own port, all at 127.0.0.1. Everything
lives in one folder: the configuration, a private munge key and socket, state, spool, logs and
pid files; clients find it through ``SLURM_CONF`` (see :meth:`SlurmCluster.env`). ``stop`` ends
the daemons by their pid files, so nothing is left running.

Run by hand (as root) to try the sbatch scripts::

    python -m tests.slurm.cluster up /tmp/cluster     # prints the export SLURM_CONF=... line
    python -m tests.slurm.cluster down /tmp/cluster
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
DAEMONS = ["munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _find(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name)
                                       if p.is_file()), None)


def ensure_installed() -> str | None:
    """Install Debian's SLURM and munge when absent; None when ready, else why it cannot be."""
    if all(_find(d) for d in DAEMONS):
        return None if os.geteuid() == 0 else "the emulated SLURM cluster must run as root"
    if os.geteuid() != 0:
        return "SLURM is not installed and installing it needs root"
    if not shutil.which("apt-get"):
        return "SLURM is not installed and this system has no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"`{' '.join(cmd)}` failed: {err}"
        if proc.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout).strip()[-300:]}"
    missing = [d for d in DAEMONS if not _find(d)]
    return f"installing {' '.join(PACKAGES)} left {', '.join(missing)} missing" if missing else None


def _free_port_block(count: int) -> int:
    """The first of ``count`` consecutive TCP ports that are free now (slurmd ports must be a range)."""
    for base in range(17100, 19000, 7):
        socks = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports for the SLURM daemons")


class SlurmCluster:
    """``nodes`` emulated nodes of ``cpus`` CPUs in one partition ``debug``, rooted at ``root``."""

    def __init__(self, root: Path, nodes: int = 2, cpus: int = 2) -> None:
        self.root = Path(root).resolve()
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"

    # ---- configuration ------------------------------------------------------------------
    def _write_config(self) -> None:
        r = self.root
        for sub in ("state", "log", "run", *(f"spool-{n}" for n in self.nodes)):
            (r / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        base = _free_port_block(len(self.nodes) + 1)
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        node_mem = max(256, mem_mb // (2 * len(self.nodes)))  # slurmd drains a node that claims too much
        n = len(self.nodes)
        lines = [
            "ClusterName=genscale-test",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={base}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # A private munged; short credential lifetime lets a requeued job start again quickly.
            f"AuthInfo=socket={r}/run/munge.socket,cred_expire=5",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool-%n",
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No systemd or cgroups here: track processes through /proc and bind nothing.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            # Schedule every 1-2 s instead of every minute: a requeued job restarts in seconds.
            "SchedulerParameters=bf_interval=1,sched_interval=2",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "EnforcePartLimits=ALL",
            "ReturnToService=2",
            "KillWait=30",
            "MinJobAge=600",
            "InactiveLimit=0",
            f"NodeName=node[1-{n}] NodeHostname={host} NodeAddr=127.0.0.1 Port=[{base + 1}-{base + n}] "
            f"CPUs={self.cpus} RealMemory={node_mem} State=UNKNOWN",
            f"PartitionName=debug Nodes=node[1-{n}] Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)

    def env(self, base: dict | None = None) -> dict:
        return {**(os.environ if base is None else base), "SLURM_CONF": str(self.conf)}

    # ---- daemons ------------------------------------------------------------------------
    def _pid_files(self) -> list[Path]:
        run = self.root / "run"
        return [run / f"slurmd-{n}.pid" for n in self.nodes] + [run / "slurmctld.pid", run / "munged.pid"]

    def start(self, timeout: float = 60) -> None:
        """Start munged, slurmctld and the slurmds; return once every node is idle."""
        self._write_config()
        r, env = self.root, self.env()
        subprocess.run([_find("munged"), f"--socket={r}/run/munge.socket", f"--key-file={r}/munge.key",
                        f"--pid-file={r}/run/munged.pid", f"--log-file={r}/log/munged.log",
                        f"--seed-file={r}/run/munged.seed", "--force"], check=True, env=env,
                       capture_output=True, timeout=30)
        # -c: a fresh cluster, ignore any saved state; -i: ignore errors reading state.
        subprocess.run([_find("slurmctld"), "-c", "-i", "-f", str(self.conf)], check=True, env=env,
                       capture_output=True, timeout=30)
        for node in self.nodes:
            subprocess.run([_find("slurmd"), "-N", node, "-f", str(self.conf)], check=True, env=env,
                           capture_output=True, timeout=30)
        deadline = time.time() + timeout
        states = ""
        while time.time() < deadline:
            proc = subprocess.run([_find("sinfo") or "sinfo", "-h", "-N", "-o", "%N %t"], env=env,
                                  capture_output=True, text=True)
            states = proc.stdout.strip()
            lines = states.splitlines()
            if len(lines) == len(self.nodes) and all(line.split()[1] == "idle" for line in lines):
                return
            time.sleep(0.3)
        raise RuntimeError(f"SLURM nodes did not become idle: {states!r}\n{self.logs_tail()}")

    def stop(self) -> None:
        """End every daemon through its pid file (slurmds first), waiting until each is gone."""
        for pid_file in self._pid_files():
            try:
                pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 15
            while time.time() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def logs_tail(self, chars: int = 3000) -> str:
        out = []
        for log in sorted((self.root / "log").glob("*.log")):
            out.append(f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}")
        return "\n".join(out)

    # ---- jobs ---------------------------------------------------------------------------
    def sbatch(self, args: list[str], env: dict, cwd: Path) -> int:
        proc = subprocess.run([_find("sbatch"), "--parsable", *args], env=self.env(env), cwd=cwd,
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch failed: {proc.stderr.strip()}")
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        proc = subprocess.run([_find("scontrol"), "show", "job", "-o", str(job_id)], env=self.env(),
                              capture_output=True, text=True, timeout=30)
        fields: dict[str, str] = {}
        for token in proc.stdout.split():
            key, sep, value = token.partition("=")
            if sep and key not in fields:
                fields[key] = value
        return fields

    def wait(self, job_id: int | str, timeout: float) -> dict[str, str]:
        """Poll until the job reaches a final state (sbatch --wait polls far too slowly)."""
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in FINAL_STATES or time.time() > deadline:
                return info
            time.sleep(0.5)

    def cancel_all(self, timeout: float = 60) -> None:
        """Kill every job and wait until none is left, so that no job process outlives the test."""
        subprocess.run([_find("scancel"), "--full", "--signal=KILL", "--user=root"], env=self.env(),
                       capture_output=True, timeout=30)
        subprocess.run([_find("scancel"), "--user=root"], env=self.env(), capture_output=True, timeout=30)
        deadline = time.time() + timeout
        while time.time() < deadline:
            proc = subprocess.run([_find("squeue"), "-h", "-o", "%i %T"], env=self.env(), capture_output=True,
                                  text=True, timeout=30)
            if proc.returncode != 0 or not proc.stdout.strip():
                return
            time.sleep(0.5)

    def run(self, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run([_find(cmd[0]) or cmd[0], *cmd[1:]], env=self.env(), capture_output=True,
                              text=True, timeout=60)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print("usage: python -m tests.slurm.cluster up|down DIR", file=sys.stderr)
        return 2
    cluster = SlurmCluster(Path(argv[1]))
    if argv[0] == "down":
        cluster.cancel_all()
        cluster.stop()
        return 0
    reason = ensure_installed()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 1
    cluster.start()
    print(f"export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
