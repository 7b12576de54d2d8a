"""Copies of small host-made tensors (random masks, drop flags) to the training device.

A plain ``.to("cuda")`` from ordinary (pageable) host memory returns only once the GPU has run
everything queued before it: one such copy per training step drains the queue every step and
leaves the GPU idle while the host prepares the next one. From page-locked (pinned) memory the
copy is queued like a kernel; PyTorch's pinned-memory cache keeps the buffer until it is done.
"""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``t.to(device, dtype)`` without waiting for the device's queue when ``t`` is on the host."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, dtype, non_blocking=True)
    return t.to(device, dtype)
