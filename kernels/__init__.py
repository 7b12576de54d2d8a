"""Fused kernels for genscale: Triton on CUDA, an eager PyTorch reference everywhere else.

This package depends on torch (and triton where available) only; it never imports genscale.
Backend choice: kernels._dispatch (GENSCALE_KERNELS=auto|eager|triton, read at call time).
"""
from kernels.group_norm import group_norm_silu, group_norm_silu_reference
from kernels.noise import ddim_step, ddpm_step, eps_loss, philox_normal, q_sample

__all__ = [
    "group_norm_silu",
    "group_norm_silu_reference",
    "q_sample",
    "philox_normal",
    "eps_loss",
    "ddpm_step",
    "ddim_step",
]
