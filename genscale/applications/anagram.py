"""``--task anagram`` (Geng et al., "Visual Anagrams"): one image that reads as class c_i under
view v_i for every i. At each step eps = mean_i v_i^-1(eps_hat(v_i(x_t), c_i)), each eps_hat
with its own classifier-free guidance; all views run as one batched model call.
"""
from __future__ import annotations

import torch

from genscale.applications.model import DiffusionModel
from genscale.applications.views import View
from genscale.diffusion.samplers import randn, strided_timesteps
from genscale.errors import UserError


def anagram_eps(dm: DiffusionModel, views: list[View], classes: list[int], cfg_scale: float):
    """The eps function of the anagram: the views' guided predictions mapped back and averaged."""
    def eps_fn(x: torch.Tensor, t: int) -> torch.Tensor:
        n, k = x.shape[0], len(views)
        stacked = torch.cat([v.apply(x) for v in views])
        labels = torch.cat([torch.full((n,), c, dtype=torch.long) for c in classes]).to(x.device)
        eps = dm.eps(stacked, t, labels, cfg_scale).chunk(k)
        return sum(v.inverse(e) for v, e in zip(views, eps)) / k
    return eps_fn


@torch.no_grad()
def anagram(dm: DiffusionModel, n: int, views: list[View], classes: list[int], *, cfg_scale: float = 3.0,
            steps: int = 50, eta: float = 0.0, generator: torch.Generator | None = None,
            progress: bool = False) -> torch.Tensor:
    """``n`` anagram images (N x C x H x W in [-1, 1]); view i of each reads as classes[i]."""
    dm.require_pixels("anagram")
    if dm.num_classes == 0:
        raise UserError("--task anagram needs a class-conditional run (one class per view)")
    if len(classes) != len(views):
        raise UserError(f"--labels must name one class per view: {len(views)} views, {len(classes)} classes")
    shape = (n, *dm.family.shape)
    if any(v.name == "rot90" for v in views) and shape[-1] != shape[-2]:
        raise UserError("the rot90 view needs square images")
    dm.labels(torch.tensor(classes), len(classes))  # range check
    x = randn(shape, generator, dm.device)
    x, _ = dm.reverse(x, strided_timesteps(dm.timesteps, steps), anagram_eps(dm, views, classes, cfg_scale),
                      eta=eta, generator=generator, progress=progress)
    return x.clamp(-1, 1)
