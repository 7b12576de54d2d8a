"""Run the toy family through the trainer under `accelerate launch` (used by test_ddp.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from genscale.launch import make_accelerator  # noqa: E402
from genscale.trainer import Trainer  # noqa: E402
from tests.toy_family import ToyFamily, stream_factory, toy_run  # noqa: E402

out, batch = sys.argv[1], int(sys.argv[2])
run = toy_run(out, batch_size=batch, jitter=0.0, steps=6, ckpt_every=3)
family = ToyFamily(run.train, run.options)
acc = make_accelerator(1, Path(out))
stream = stream_factory(batch, 1, acc.process_index, acc.num_processes)
trainer = Trainer(run, family, stream, acc)
trainer.fit()
state = acc.unwrap_model(trainer.family.nets["model"]).state_dict()
torch.save({"world": acc.num_processes, "state": state}, Path(out) / f"rank{acc.process_index}.pt")
