"""Fused kernels for genscale: Triton on CUDA, an eager PyTorch reference everywhere else.

This package depends on torch (and triton where available) only; it never imports genscale.
"""
from kernels.group_norm import group_norm_silu

__all__ = ["group_norm_silu"]
