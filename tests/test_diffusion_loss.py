"""diffusion_loss: oracle models give zero loss, a zero model gives the known expectations."""
from __future__ import annotations

import math

import pytest
import torch

from genscale.diffusion.losses import diffusion_loss
from genscale.diffusion.schedule import NoiseSchedule


def point_oracle(sched: NoiseSchedule, x0: torch.Tensor, prediction: str):
    """Exact predictor when the data is the single image x0."""
    def model_fn(x_t, t, labels):
        eps = sched.predict_eps(x_t, t, x0)
        return eps if prediction == "eps" else sched.v_target(x0, t, eps)
    return model_fn


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("loss", ["l2", "l1"])
def test_oracle_has_zero_loss(prediction, loss):
    sched = NoiseSchedule("cosine", 1000)
    x0 = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    value = diffusion_loss(point_oracle(sched, x0, prediction), x0, None, sched, prediction=prediction, loss=loss,
                           generator=torch.Generator().manual_seed(1))
    assert value.dim() == 0 and value.item() < 1e-3


def test_zero_model_gives_known_expectations():
    sched = NoiseSchedule("linear", 1000)
    zero = lambda x, t, y: torch.zeros_like(x)
    x0 = torch.zeros(64, 1, 32, 32)
    gen = torch.Generator().manual_seed(2)
    # eps target: E[eps^2] = 1 and E|eps| = sqrt(2/pi), whatever t is.
    assert diffusion_loss(zero, x0, None, sched, generator=gen).item() == pytest.approx(1.0, abs=0.02)
    assert diffusion_loss(zero, x0, None, sched, loss="l1", generator=gen).item() == pytest.approx(
        math.sqrt(2 / math.pi), abs=0.02)
    # v target with x0 = 0 is sqrt(abar_t) eps: E[v^2] = mean of abar over the drawn t.
    t = torch.arange(0, 1000, 1000 // 64)[:64]
    expected = sched.alphas_cumprod[t].mean().item()
    got = diffusion_loss(zero, x0, None, sched, prediction="v", generator=gen, t=t).item()
    assert got == pytest.approx(expected, rel=0.03)


def test_loss_is_seeded_and_differentiable():
    sched = NoiseSchedule("cosine", 100)
    weight = torch.nn.Parameter(torch.tensor(0.5))
    seen = {}

    def model_fn(x, t, labels):
        seen["labels"] = labels
        return weight * x

    x0 = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    labels = torch.arange(8)
    a = diffusion_loss(model_fn, x0, labels, sched, generator=torch.Generator().manual_seed(4))
    b = diffusion_loss(model_fn, x0, labels, sched, generator=torch.Generator().manual_seed(4))
    c = diffusion_loss(model_fn, x0, labels, sched, generator=torch.Generator().manual_seed(5))
    assert a.item() == b.item() != c.item()
    assert seen["labels"] is labels
    a.backward()
    assert weight.grad is not None and weight.grad.item() != 0.0


def test_bad_options():
    sched = NoiseSchedule("linear", 10)
    with pytest.raises(ValueError):
        diffusion_loss(lambda x, t, y: x, torch.zeros(2, 1, 2, 2), None, sched, prediction="x0")
    with pytest.raises(ValueError):
        diffusion_loss(lambda x, t, y: x, torch.zeros(2, 1, 2, 2), None, sched, loss="huber")
