"""Per-sample weights of the fused eps loss (min-SNR weighting) against float64, on the Triton
kernels (the interpreter on a CPU, compiled on CUDA) and the eager reference."""
from __future__ import annotations

import pytest
import torch

import kernels
from tests.kernels.test_noise import SHAPE, TOL, draws, make, per_sample, rel_err


@pytest.mark.parametrize("kind", ["l2", "l1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_weighted_eps_loss_and_gradient(device, poison, monkeypatch, kind, dtype, channels_last, backend):
    """Per-sample weights (min-SNR weighting) scale each sample's terms inside the mean."""
    monkeypatch.setenv("GENSCALE_KERNELS", backend)
    pred = make(SHAPE, channels_last, device, dtype).requires_grad_()
    weight = torch.tensor([0.25, 3.0, 0.0], dtype=torch.float64)
    loss = kernels.eps_loss(pred, 5, 9, kind=kind, weight=weight.to(device))
    (3.0 * loss).backward()
    d = pred.detach().double().cpu() - draws(SHAPE, 5, 9)
    w = per_sample(weight)
    expected = (w * (d * d if kind == "l2" else d.abs())).mean()
    grad = 3.0 * w * (2.0 * d if kind == "l2" else torch.sign(d)) / d.numel()
    assert abs(loss.item() - expected.item()) <= 1e-6 * expected.item()
    assert rel_err(pred.grad, grad) <= TOL[dtype]
    assert pred.grad[2].abs().max().item() == 0.0  # a zero weight takes the sample out entirely
    assert pred.grad.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_weight_checks_and_no_gradient(device):
    pred = make(SHAPE, False, device).requires_grad_()
    with pytest.raises(ValueError, match=r"weight must be a floating tensor of shape \[3\]"):
        kernels.eps_loss(pred, 1, 0, weight=torch.ones(4, device=device))
    with pytest.raises(ValueError, match="weight must be a floating tensor"):
        kernels.eps_loss(pred, 1, 0, weight=torch.ones(3, dtype=torch.long, device=device))
    ones = kernels.eps_loss(pred, 1, 0, weight=torch.ones(3, device=device))
    assert ones.item() == pytest.approx(kernels.eps_loss(pred, 1, 0).item(), rel=1e-6)
    weight = torch.full((3,), 2.0, device=device, requires_grad=True)
    kernels.eps_loss(pred, 1, 0, weight=weight).backward()
    assert weight.grad is None and pred.grad is not None  # the weights are constants
