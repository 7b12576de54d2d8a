"""Two ranks reading their logs as on a GPU (used by test_ddp.py): rank 1 alone is signalled and
rank 1 alone scores a "best" evaluation; both must stop after the same step and save together."""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genscale.launch import make_accelerator  # noqa: E402
from genscale.trainer import Trainer  # noqa: E402
from tests.toy_family import ToyFamily, stream_factory, toy_run  # noqa: E402

out = sys.argv[1]
run = toy_run(out, batch_size=4, jitter=0.0, steps=12, ckpt_every=100, log_every=2, eval_every=2, keep_best=True)
family = ToyFamily(run.train, run.options)
acc = make_accelerator(1, Path(out))
rank = acc.process_index
original = family.training_step


def step(batch, optimize):
    if rank == 1 and family.calls == 4:  # during step 5, on this rank only
        os.kill(os.getpid(), signal.SIGUSR1)
    return original(batch, optimize)


class Evaluator:
    """The ranks disagree (as a last-bit difference in a score could make them): rank 0 decides."""

    def __call__(self, family, step):
        return {"score": float(rank), "is_best": 1.0 if rank == 1 else 0.0}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


family.training_step = step
trainer = Trainer(run, family, stream_factory(4, 1, rank, acc.num_processes), acc, evaluator=Evaluator())
trainer.read_every_step = False  # as on a GPU: the stop vote is read one step late
trainer.fit()
(Path(out) / f"rank{rank}.step").write_text(str(trainer.progress.step))
