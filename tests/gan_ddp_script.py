"""Train a tiny GAN through the real trainer under `accelerate launch` (used by test_gan_ddp.py).

Every optimizer call is checked in place: the discriminator step must leave the generator's
weights untouched and the generator step the discriminator's, with DDP-wrapped networks and
gradient accumulation.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from genscale.config import RunConfig, TrainConfig  # noqa: E402
from genscale.families import family_module  # noqa: E402
from genscale.families.base import DataInfo  # noqa: E402
from genscale.launch import make_accelerator  # noqa: E402
from genscale.trainer import Trainer  # noqa: E402

out, model, accum = sys.argv[1], sys.argv[2], int(sys.argv[3])
module = family_module(model)
small = {"gan": dict(g_hidden=(32, 32), d_hidden=(32,)), "cgan": dict(g_width=8, d_width=8)}[model]
run = RunConfig(TrainConfig(model=model, out=out, steps=4, batch_size=8, grad_accum=accum, image_size=16,
                            ckpt_every=2, sample_every=4, log_every=2, warmup_steps=0, grad_clip=1.0),
                module.Options(**small))
acc = make_accelerator(accum, Path(out))
checked = []


class Checked(module.FAMILY):
    def training_step(self, batch, optimize):
        def checked_optimize(loss, name):
            other = "generator" if name == "discriminator" else "discriminator"
            before = [p.detach().clone() for p in self.nets[other].parameters()]
            optimize(loss, name)
            after = list(self.nets[other].parameters())
            assert all(torch.equal(b, a) for b, a in zip(before, after)), f"{name} step moved the {other}"
            checked.append(name)
        return super().training_step(batch, checked_optimize)


family = Checked(run.train, run.options, DataInfo("synthetic", 1, 16, 10))
start = {n: [p.detach().clone() for p in m.parameters()] for n, m in family.nets.items()}


def stream(start_step):
    step = start_step
    while True:
        for micro in range(accum):
            g = torch.Generator().manual_seed(1000 * step + 10 * micro + acc.process_index)
            yield {"image": torch.rand(8, 1, 16, 16, generator=g) * 2 - 1,
                   "label": torch.randint(0, 10, (8,), generator=g)}
        step += 1


trainer = Trainer(run, family, stream, acc, torch.arange(10).repeat_interleave(2))
trainer.fit()
# Parameters only: DDP broadcasts BatchNorm statistics from rank 0 at each forward, so each
# rank's buffers hold its own last batch's update until the next forward overwrites them.
state = {n: {k: v.detach() for k, v in acc.unwrap_model(m).named_parameters()}
         for n, m in trainer.family.nets.items()}
moved = {n: any(not torch.equal(a, b) for a, b in zip(start[n], acc.unwrap_model(m).parameters()))
         for n, m in trainer.family.nets.items()}
torch.save({"world": acc.num_processes, "state": state, "checked": checked, "moved": moved},
           Path(out) / f"rank{acc.process_index}.pt")
