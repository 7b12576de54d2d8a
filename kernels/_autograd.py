"""Gradients computed by Triton kernels are first-order only; differentiating one again must fail.

A kernel's backward is a launch that autograd cannot see into, so under ``create_graph=True`` its
gradient would come back as a constant: a gradient penalty built on it (R1, WGAN-GP) would then
contribute nothing, silently. Such gradients are passed through an identity whose own backward
raises, so the error comes only if the second-order path is actually taken.

Both routes to a kernel's backward use it: the direct autograd.Functions of eager calls and the
torch.library custom ops' autograd formulas (torch.compile's route; called eagerly, a custom op
would otherwise fail with PyTorch's "no autograd formula was registered" for its backward op).
Under torch.compile, aot_autograd refuses double backward itself before reaching either.
"""
from __future__ import annotations

import torch


class _FirstOrderOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, *inputs):
        return grad.clone()

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError("second-order gradients through genscale's Triton kernels are not supported; "
                           "set GENSCALE_KERNELS=eager for this computation")


def first_order_only(grad: torch.Tensor | None, *inputs: torch.Tensor | None) -> torch.Tensor | None:
    """``grad`` itself, unless autograd records the backward (create_graph=True) and it depends on a
    tensor that requires grad: then a copy that refuses to be differentiated."""
    if grad is None or not torch.is_grad_enabled():
        return grad
    tracked = [t for t in inputs if t is not None and t.requires_grad]
    return _FirstOrderOnly.apply(grad, *tracked) if tracked else grad


def first_order_only_all(grads: tuple, *inputs: torch.Tensor | None) -> tuple:
    """``first_order_only`` for each gradient a backward returns (Nones stay None)."""
    if not torch.is_grad_enabled():
        return grads
    return tuple(first_order_only(g, *inputs) for g in grads)
