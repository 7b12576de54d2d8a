"""A refusal that every process of a launch raises alike (bad flags, checked before the process
group exists) is printed once per node, not once per process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def launch_two(args: list[str], port: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENSCALE_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "accelerate_configs" / "cpu.yaml"), "--main_process_port", port,
                           str(ROOT / "genscale" / "train.py"), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("args", "sentence", "port"), [
    (["--model", "ddpm", "--lr", "-1"], "error: --lr must be positive, got -1.0", "29551"),
    (["--model", "ddpm", "--steps", "x"], "error: argument --steps: invalid int value: 'x'", "29552"),
])
def test_a_shared_refusal_is_printed_once(tmp_path, args, sentence, port):
    proc = launch_two([*args, "--out", str(tmp_path / "run")], port)
    assert proc.returncode != 0
    assert proc.stderr.count(sentence) == 1, proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_another_process_still_says_its_own_error(monkeypatch, capsys):
    """A process other than the first that outlives the wait (nobody stopped it: its error was its
    own) says its error: a failed launch never ends without a sentence."""
    import time

    from genscale import cli
    from genscale.errors import UserError

    def refuse(argv):
        raise UserError("only this process has this problem")

    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(cli, "FIRST_PROCESS_GRACE_S", 0.2)
    monkeypatch.setattr(cli, "_ranks_started", False)  # an earlier test in this process may have set it
    start = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(refuse, [])
    assert exit_info.value.code == 2 and time.monotonic() - start >= 0.2
    assert capsys.readouterr().err == "error: only this process has this problem\n"
