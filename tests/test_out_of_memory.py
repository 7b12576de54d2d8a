"""Memory a user's numbers ask for: refused before sampling when it cannot be held, and an
allocation failure anywhere is one sentence instead of torch's traceback."""
from __future__ import annotations

import pytest
import torch

from genscale import memory_check, sample
from genscale.cli import out_of_memory, run_main
from genscale.errors import UserError
from tests.test_cli_errors_audit import cache, tiny_run  # noqa: F401 -- fixtures


def test_samples_that_cannot_be_held_are_refused_before_sampling(tiny_run, tmp_path, monkeypatch):  # noqa: F811
    """Before, the OOM killer ended the job as the buffer filled, with all the samples drawn lost."""
    monkeypatch.setattr(memory_check, "available_memory", lambda: 2**30)
    drawn = []
    monkeypatch.setattr(sample, "sharded_rows", lambda *a, **k: drawn.append(1))
    # 20M samples of 8 x 8 x 1 in one process: 64 bytes each = 1.19 GiB > 1 GiB
    with pytest.raises(UserError, match="--num 20000000 samples of 8 x 8 x 1 need about 1.2 GiB of memory, "
                                        "more than the 1.0 GiB available"):
        sample.generate(str(tiny_run), 20_000_000, device="cpu")
    assert not drawn
    with pytest.raises(UserError, match="--num must be between 1 and 2\\*\\*31 - 1"):  # was an OverflowError
        sample.generate(str(tiny_run), 10**23, device="cpu")


def test_an_allocation_failure_is_one_sentence(capsys):
    with pytest.raises(RuntimeError) as err:
        torch.empty(10**15, dtype=torch.uint8)  # 909 TiB: no allocator hands that out
    assert out_of_memory(err.value) == f"{10**15 / 2**30:.1f} GiB asked for at once"
    assert out_of_memory(RuntimeError("shapes do not match")) is None  # other errors keep their traceback

    def main(_argv):
        torch.empty(10**15, dtype=torch.uint8)

    with pytest.raises(SystemExit) as exit_:
        run_main(main, [], memory_hint="use a smaller --batch-size")
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(lines) == 1
    assert lines[0].startswith("error: out of memory (931322.6 GiB asked for at once); use a smaller --batch-size")
