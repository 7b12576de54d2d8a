"""The noise-step kernels as torch.library custom ops (no graph breaks under torch.compile), and the
direct calls eager code takes instead (autograd.Functions with the same backward formulas).

The launchers are in kernels/_noise_ops.py. A seed reaches them as an int or an integer tensor;
torch.library schemas have no int-or-tensor type, so the custom ops take it as (seed, seed_t).
"""
from __future__ import annotations

from typing import Optional

import torch

from kernels._autograd import first_order_only
from kernels._dispatch import compiling
from kernels._group_norm_ops import ncs_strides
from kernels import _noise_ops as launchers  # looked up per call, so tests can swap a launcher

_LIB = "genscale_kernels"


def _empty_like_viewable(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    base = x if ncs_strides(x) is not None else x.contiguous()
    return torch.empty_like(base, dtype=dtype)


def _seed(seed: int, seed_t: Optional[torch.Tensor]) -> int | torch.Tensor:
    return seed if seed_t is None else seed_t


def _split_seed(seed: int | torch.Tensor) -> tuple[int, Optional[torch.Tensor]]:
    """A seed as the custom ops take it: (int, None) or (0, the tensor)."""
    return (0, seed) if torch.is_tensor(seed) else (seed, None)


@torch.library.custom_op(f"{_LIB}::philox_normal", mutates_args=())
def philox_normal_op(like: torch.Tensor, seed: int, offset: int, dtype: torch.dtype,
                     seed_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    return launchers.normal(like, _seed(seed, seed_t), offset, dtype)


@philox_normal_op.register_fake
def _(like, seed, offset, dtype, seed_t=None):
    return torch.empty_like(like, dtype=dtype)


@torch.library.custom_op(f"{_LIB}::q_sample", mutates_args=())
def q_sample_op(x0: torch.Tensor, noise: Optional[torch.Tensor], t: torch.Tensor, abar: torch.Tensor,
                seed: int, offset: int, seed_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    return launchers.q_sample(x0, noise, t, abar, _seed(seed, seed_t), offset)


@q_sample_op.register_fake
def _(x0, noise, t, abar, seed, offset, seed_t=None):
    return _empty_like_viewable(x0)


def _q_setup(ctx, inputs, output) -> None:
    _x0, noise, t, abar = inputs[:4]
    ctx.save_for_backward(t, abar)
    ctx.has_noise = noise is not None
    ctx.num_inputs = len(inputs)


def _q_backward(ctx, grad):
    t, abar = ctx.saved_tensors
    a = abar[t].to(torch.float32).reshape((-1,) + (1,) * (grad.dim() - 1))
    d_noise = grad * torch.sqrt(1.0 - a).to(grad.dtype) if ctx.has_noise else None
    return (grad * torch.sqrt(a).to(grad.dtype), d_noise) + (None,) * (ctx.num_inputs - 2)


q_sample_op.register_autograd(_q_backward, setup_context=_q_setup)


@torch.library.custom_op(f"{_LIB}::eps_loss", mutates_args=())
def eps_loss_op(pred: torch.Tensor, seed: int, offset: int, l1: bool,
                seed_t: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    return launchers.eps_loss(pred, _seed(seed, seed_t), offset, l1, weight)


@eps_loss_op.register_fake
def _(pred, seed, offset, l1, seed_t=None, weight=None):
    return pred.new_empty((), dtype=torch.float32)


@torch.library.custom_op(f"{_LIB}::eps_loss_backward", mutates_args=())
def eps_loss_backward_op(grad: torch.Tensor, pred: torch.Tensor, seed: int, offset: int, l1: bool,
                         seed_t: Optional[torch.Tensor] = None,
                         weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    return launchers.eps_loss_backward(grad, pred, _seed(seed, seed_t), offset, l1, weight)


@eps_loss_backward_op.register_fake
def _(grad, pred, seed, offset, l1, seed_t=None, weight=None):
    return _empty_like_viewable(pred)


def _loss_setup(ctx, inputs, output) -> None:
    """A seed tensor is saved like pred: changing it in place before the backward (which draws eps
    again from it) makes autograd refuse, instead of regenerating another eps. So is the weight."""
    pred, seed, offset, l1 = inputs[:4]
    seed = _seed(seed, inputs[4] if len(inputs) > 4 else None)
    weight = inputs[5] if len(inputs) > 5 else None
    ctx.seed_is_tensor, ctx.has_weight = torch.is_tensor(seed), weight is not None
    ctx.save_for_backward(pred, *([seed] if ctx.seed_is_tensor else []), *([weight] if ctx.has_weight else []))
    ctx.seed, ctx.offset, ctx.l1 = (None if ctx.seed_is_tensor else seed), offset, l1
    ctx.num_inputs = len(inputs)


def _loss_saved(ctx) -> tuple[torch.Tensor, int | torch.Tensor, Optional[torch.Tensor]]:
    saved = ctx.saved_tensors
    seed = saved[1] if ctx.seed_is_tensor else ctx.seed
    return saved[0], seed, (saved[-1] if ctx.has_weight else None)


def _loss_backward(ctx, grad):
    pred, seed, weight = _loss_saved(ctx)
    int_seed, seed_t = _split_seed(seed)
    dpred = eps_loss_backward_op(grad, pred, int_seed, ctx.offset, ctx.l1, seed_t, weight)
    # create_graph=True: refused with the direct route's error (not the missing backward-of-backward op's)
    return (first_order_only(dpred, grad, pred),) + (None,) * (ctx.num_inputs - 1)


eps_loss_op.register_autograd(_loss_backward, setup_context=_loss_setup)


@torch.library.custom_op(f"{_LIB}::ddpm_step", mutates_args=())
def ddpm_step_op(x: torch.Tensor, eps: torch.Tensor, eps_cond: Optional[torch.Tensor], scale: float,
                 t: torch.Tensor, t_prev: torch.Tensor, abar: torch.Tensor, clip: bool, large_var: bool, seed: int,
                 offset: int, seed_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    return launchers.ddpm_step(x, eps, eps_cond, scale, t, t_prev, abar, clip, large_var, _seed(seed, seed_t), offset)


@ddpm_step_op.register_fake
def _(x, eps, eps_cond, scale, t, t_prev, abar, clip, large_var, seed, offset, seed_t=None):
    return _empty_like_viewable(x)


@torch.library.custom_op(f"{_LIB}::ddim_step", mutates_args=())
def ddim_step_op(x: torch.Tensor, eps: torch.Tensor, eps_cond: Optional[torch.Tensor], scale: float,
                 t: torch.Tensor, t_prev: torch.Tensor, abar: torch.Tensor, eta: float, clip: bool,
                 seed: int, offset: int, seed_t: Optional[torch.Tensor] = None) -> torch.Tensor:
    return launchers.ddim_step(x, eps, eps_cond, scale, t, t_prev, abar, eta, clip, _seed(seed, seed_t), offset)


@ddim_step_op.register_fake
def _(x, eps, eps_cond, scale, t, t_prev, abar, eta, clip, seed, offset, seed_t=None):
    return _empty_like_viewable(x)


# ----------------------------------------------------------------------------- direct calls
# Outside torch.compile the launchers are called without the custom-op dispatch (host time; see
# kernels._dispatch.compiling), through autograd.Functions with the same backward formulas. Seeds
# are ints or tensors here; _split_seed turns them into the custom ops' (seed, seed_t).


class _QSampleDirect(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x0, noise, t, abar, seed, offset):
        _q_setup(ctx, (x0, noise, t, abar, seed, offset), None)
        return launchers.q_sample(x0, noise, t, abar, seed, offset)

    @staticmethod
    def backward(ctx, grad):
        return _q_backward(ctx, grad)


class _EpsLossDirect(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, seed, offset, l1, weight):
        _loss_setup(ctx, (pred, seed, offset, l1, None, weight), None)
        return launchers.eps_loss(pred, seed, offset, l1, weight)

    @staticmethod
    def backward(ctx, grad):
        pred, seed, weight = _loss_saved(ctx)
        dpred = launchers.eps_loss_backward(grad, pred, seed, ctx.offset, ctx.l1, weight)
        return first_order_only(dpred, grad, pred), None, None, None, None


def call_philox_normal(like, seed, offset, dtype):
    if compiling():
        int_seed, seed_t = _split_seed(seed)
        return philox_normal_op(like, int_seed, offset, dtype, seed_t)
    return launchers.normal(like, seed, offset, dtype)


def call_q_sample(x0, noise, t, abar, seed, offset):
    if compiling():
        int_seed, seed_t = _split_seed(seed)
        return q_sample_op(x0, noise, t, abar, int_seed, offset, seed_t)
    return _QSampleDirect.apply(x0, noise, t, abar, seed, offset)


def call_eps_loss(pred, seed, offset, l1, weight=None):
    if compiling():
        int_seed, seed_t = _split_seed(seed)
        return eps_loss_op(pred, int_seed, offset, l1, seed_t, weight)
    return _EpsLossDirect.apply(pred, seed, offset, l1, weight)


def call_ddpm_step(*args):
    if compiling():
        *rest, seed, offset = args
        int_seed, seed_t = _split_seed(seed)
        return ddpm_step_op(*rest, int_seed, offset, seed_t)
    return launchers.ddpm_step(*args)


def call_ddim_step(*args):
    if compiling():
        *rest, seed, offset = args
        int_seed, seed_t = _split_seed(seed)
        return ddim_step_op(*rest, int_seed, offset, seed_t)
    return launchers.ddim_step(*args)
