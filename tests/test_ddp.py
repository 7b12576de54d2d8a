"""Two gloo processes on a CPU: one job of world size 2 whose update equals one process with 2x batch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "ddp_toy_script.py"


def launch(args: list[str], env_extra: dict | None = None, timeout: float = 300) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_two_processes_equal_one_process_with_double_batch(tmp_path):
    launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "accelerate_configs" / "cpu.yaml"), "--main_process_port", "29533",
            str(SCRIPT), str(tmp_path / "ddp"), "8"])
    launch([sys.executable, str(SCRIPT), str(tmp_path / "single"), "16"])
    r0 = torch.load(tmp_path / "ddp" / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "ddp" / "rank1.pt", weights_only=True)
    one = torch.load(tmp_path / "single" / "rank0.pt", weights_only=True)
    assert r0["world"] == 2 and r1["world"] == 2 and one["world"] == 1
    for k in one["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), "ranks diverged"
        torch.testing.assert_close(r0["state"][k], one["state"][k], rtol=1e-5, atol=1e-6)


def test_ranks_stop_after_the_same_step_and_rank_0_decides_the_best_checkpoint(tmp_path):
    """Reads deferred as on a GPU: rank 1 alone is signalled in step 5 and alone calls its evaluations
    the best. Both ranks must stop after step 6 (the vote is read a step late) and save it together,
    and no best checkpoint is kept (rank 0's verdict); a rank saving alone would hang the job."""
    from genscale import checkpoints as ckpt

    launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "accelerate_configs" / "cpu.yaml"), "--main_process_port", "29534",
            str(ROOT / "tests" / "ddp_stop_script.py"), str(tmp_path)], timeout=120)
    assert (tmp_path / "rank0.step").read_text() == (tmp_path / "rank1.step").read_text() == "6"
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [6]
    assert not (tmp_path / "checkpoints" / "best").exists()
