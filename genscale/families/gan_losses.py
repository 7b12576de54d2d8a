"""GAN losses, all on logits (the sigmoid/softmax lives inside, where it is numerically safe).

With D(x) = sigmoid(l): -log D(x) = softplus(-l) and -log(1 - D(x)) = softplus(l).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def d_loss_bce(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator BCE: -E[log D(x)] - E[log(1 - D(G(z)))]."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def g_loss_nonsaturating(fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator non-saturating loss -E[log D(G(z))] (BCE of the fakes against the label 'real')."""
    return F.softplus(-fake_logits).mean()


def d_loss_classes(real_logits: torch.Tensor, labels: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """(N+1)-way discriminator: cross-entropy with the true class for reals, class N (fake) for fakes.

    A real image without a label (-1) only has to be 'some real class': -log(1 - p_fake)
    (Salimans et al. 2016's unsupervised term).
    """
    fake_class = real_logits.shape[1] - 1
    labelled = labels >= 0
    per_real = torch.empty(real_logits.shape[0], dtype=real_logits.dtype, device=real_logits.device)
    if labelled.any():
        per_real[labelled] = F.cross_entropy(real_logits[labelled], labels[labelled], reduction="none")
    if (~labelled).any():
        unl = real_logits[~labelled]
        per_real[~labelled] = torch.logsumexp(unl, 1) - torch.logsumexp(unl[:, :fake_class], 1)
    target = torch.full((fake_logits.shape[0],), fake_class, dtype=torch.long, device=fake_logits.device)
    return per_real.mean() + F.cross_entropy(fake_logits, target)


def g_loss_classes(fake_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N+1)-way generator loss: the fakes should be classified as their intended class."""
    return F.cross_entropy(fake_logits, labels)


def real_probability(logits: torch.Tensor) -> torch.Tensor:
    """D's probability that each input is real, shape N.

    N logits: sigmoid. N x (K+1) class logits: 1 - p(fake) = sigmoid(logsumexp(real classes) -
    fake logit). N x 1 x H x W patch logits: the mean over patches of the sigmoid.
    """
    logits = logits.detach().float()
    if logits.ndim == 1:
        return torch.sigmoid(logits)
    if logits.ndim == 2:
        return torch.sigmoid(torch.logsumexp(logits[:, :-1], 1) - logits[:, -1])
    return torch.sigmoid(logits).flatten(1).mean(1)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the hole only (mask 1 = known, 0 = hole), averaged per hole value."""
    hole = (1.0 - mask).expand_as(pred)
    return ((pred - target) ** 2 * hole).sum() / hole.sum().clamp_min(1.0)
