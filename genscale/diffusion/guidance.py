"""Classifier-free guidance (Ho & Salimans): one network, conditional and unconditional.

The unconditional model is the same network given the null label, which is ``num_classes``
(the extra, last row of the class embedding). Training replaces labels by the null label with
a small probability (``drop_labels``); sampling combines eps_u + s (eps_c - eps_u), either here
(``guided_prediction``) or inside the fused step kernels, which take both halves (``guided_halves``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

# model_fn(x_t, t, labels) -> prediction (eps or v, same shape as x_t); labels may be None.
ModelFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def cfg_combine(pred_u: torch.Tensor, pred_c: torch.Tensor, scale: float) -> torch.Tensor:
    """pred_u + scale (pred_c - pred_u): scale 1 is the conditional model, 0 the unconditional."""
    return pred_u + scale * (pred_c - pred_u)


def null_labels(n: int, num_classes: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """n copies of the null label (``num_classes``)."""
    return torch.full((n,), num_classes, dtype=torch.long, device=device)


def drop_labels(labels: torch.Tensor, num_classes: int, p: float = 0.1,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Replace each label by the null label with probability ``p``; negative labels (unlabelled) always.

    The coin flips are drawn where ``generator`` lives (the CPU by default) and then moved,
    so a seeded run drops the same labels on any device.
    """
    where = generator.device if generator is not None else torch.device("cpu")
    drop = torch.rand(labels.shape, generator=generator, device=where).to(labels.device) < p
    return torch.where(drop | (labels < 0), torch.full_like(labels, num_classes), labels)


def guided_halves(model_fn: ModelFn, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
                  num_classes: int, cfg_scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's predictions at (x_t, t) before the guidance combine: (pred_u, pred_c) or (pred, None).

    Without labels, or at scale 1, this is one plain call and the second item is None; at scale 0
    it is one call with the null label. Otherwise the conditional and the unconditional halves run
    as ONE batched call of 2N samples and come back separately, unconditional first, so that a
    fused step kernel can read both and combine them itself (``cfg_combine`` is the formula).
    """
    if labels is None or cfg_scale == 1.0:
        return model_fn(x_t, t, labels), None
    if num_classes <= 0:
        raise ValueError("classifier-free guidance needs num_classes > 0 to know the null label")
    null = null_labels(x_t.shape[0], num_classes, labels.device)
    if cfg_scale == 0.0:
        return model_fn(x_t, t, null), None
    both = model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null]))
    pred_c, pred_u = both.chunk(2)
    return pred_u, pred_c


def guided_prediction(model_fn: ModelFn, x_t: torch.Tensor, t: torch.Tensor,
                      labels: torch.Tensor | None, num_classes: int, cfg_scale: float) -> torch.Tensor:
    """The model's prediction at (x_t, t), with classifier-free guidance when it applies.

    ``guided_halves`` combined by ``cfg_combine`` (the combination is affine with weights summing
    to 1, so it is valid for eps and v alike).
    """
    pred_u, pred_c = guided_halves(model_fn, x_t, t, labels, num_classes, cfg_scale)
    return pred_u if pred_c is None else cfg_combine(pred_u, pred_c, cfg_scale)
