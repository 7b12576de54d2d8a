"""The families' optimizers (genscale/optim.py): Adam and AdamW with the fused step, checked
against the papers' update rules computed in float64 (Kingma & Ba 2015, Algorithm 1, with L2
weight decay added to the gradient; Loshchilov & Hutter 2019, Algorithm 2, decoupled decay
scaled by the learning rate as in torch.optim.AdamW)."""
from __future__ import annotations

import pytest
import torch

from genscale.optim import adam
from tests.test_gpu_sync import SMALL, family_on


def reference_steps(p0: torch.Tensor, grads: list[torch.Tensor], lr: float, betas: tuple[float, float],
                    eps: float, weight_decay: float, decoupled: bool) -> torch.Tensor:
    p = p0.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    b1, b2 = betas
    for t, g in enumerate(grads, start=1):
        g = g.double()
        if decoupled:
            p = p * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** t)
        v_hat = v / (1 - b2 ** t)
        p = p - lr * m_hat / (v_hat.sqrt() + eps)
    return p


@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam"])
def test_fused_steps_follow_the_update_rule(decoupled):
    g = torch.Generator().manual_seed(3)
    p0 = torch.randn(257, 3, generator=g)
    grads = [torch.randn(257, 3, generator=g) * 10 ** float(k % 3 - 1) for k in range(6)]
    options = dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    param = torch.nn.Parameter(p0.clone())
    opt = adam([param], 0.05, decoupled=decoupled, **options)
    assert opt.param_groups[0]["fused"] is True
    for grad in grads:
        param.grad = grad.clone()
        opt.step()
    expected = reference_steps(p0, grads, 0.05, options["betas"], options["eps"], options["weight_decay"], decoupled)
    moved = (expected - p0.double()).abs().max()
    assert moved > 0.1  # the steps did move the parameters
    bound = 1e-5 * max(1.0, float(expected.abs().max()))
    assert (param.detach().double() - expected).abs().max() <= bound
    # and the other decay rule lands far outside that bound: Adam and AdamW are told apart
    other = reference_steps(p0, grads, 0.05, options["betas"], options["eps"], options["weight_decay"], not decoupled)
    assert (param.detach().double() - other).abs().max() > 100 * bound


@pytest.mark.parametrize("model", sorted(SMALL))
def test_every_family_steps_with_the_fused_optimizer(model):
    family = family_on(model, "cpu")
    assert family.optimizers
    for name, opt in family.optimizers.items():
        assert all(group["fused"] is True for group in opt.param_groups), (model, name)
