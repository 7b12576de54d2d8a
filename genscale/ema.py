"""Exponential moving average of network weights, kept on every rank.

shadow <- d * shadow + (1 - d) * param after every optimizer step, with the usual warm-up
d_k = min(decay, (1 + k) / (10 + k)) so early averages are not dominated by the random init.
Buffers (BatchNorm statistics) are copied, not averaged.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, nets: dict[str, nn.Module], decay: float):
        self.decay = decay
        self.updates = 0
        self.nets: dict[str, nn.Module] = {}
        for name, net in nets.items():
            shadow = copy.deepcopy(net).eval()
            shadow.requires_grad_(False)
            self.nets[name] = shadow

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, nets: dict[str, nn.Module]) -> None:
        # One multi-tensor op per network instead of one op per parameter: on a GPU the step is
        # bound by the host issuing kernels, and a U-Net has hundreds of parameter tensors.
        weight = 1.0 - self.current_decay()
        for name, shadow in self.nets.items():
            live = nets[name]
            shadows = list(shadow.parameters())
            params = [p.detach().to(s.dtype) for s, p in zip(shadows, live.parameters())]
            if shadows:
                torch._foreach_lerp_(shadows, params, weight)
            buffers = list(shadow.buffers())
            if buffers:
                torch._foreach_copy_(buffers, list(live.buffers()))
        self.updates += 1

    # the trainer saves these with every checkpoint (trainer_state.pt) and loads them on resume
    def state_dict(self) -> dict:
        return {"updates": self.updates, "decay": self.decay,
                "nets": {n: m.state_dict() for n, m in self.nets.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        for name, sd in state["nets"].items():
            self.nets[name].load_state_dict(sd)
