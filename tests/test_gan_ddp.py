"""GANs under two gloo processes with gradient accumulation: D/G alternation intact, ranks in step."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "gan_ddp_script.py"


@pytest.mark.parametrize("model,port", [("cgan", 29541)])
def test_two_process_gan_keeps_alternation_and_ranks_agree(tmp_path, model, port):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GENSCALE_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "accelerate_configs" / "cpu.yaml"), "--main_process_port", str(port),
                           str(SCRIPT), str(tmp_path / "run"), model, "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "run" / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "run" / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2
    # 4 steps x 2 micro-batches, each a D step then a G step, every one checked in place
    assert r0["checked"] == ["discriminator", "generator"] * 8
    assert r0["moved"] == {"generator": True, "discriminator": True}
    for net in r0["state"]:
        for key, value in r0["state"][net].items():
            assert torch.equal(value, r1["state"][net][key]), f"ranks disagree on {net}.{key}"
    assert (tmp_path / "run" / "samples" / "step-00000004.png").is_file()
    assert (tmp_path / "run" / "loss_curve.png").is_file()
