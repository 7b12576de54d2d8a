"""Views for visual anagrams: pixel permutations of an N x C x H x W tensor with exact inverses.

A view v must be a permutation of pixels so that v(x_t) of a Gaussian x_t is again Gaussian
with the same statistics (Geng et al., "Visual Anagrams"): flips and rotations by multiples of
90 degrees qualify. ``rot90`` needs square images.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from genscale.errors import UserError

Map = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class View:
    name: str
    apply: Map
    inverse: Map


VIEWS: dict[str, View] = {
    "identity": View("identity", lambda x: x, lambda x: x),
    # "flip" in the anagram paper flips the height axis: the image seen upside down
    "vflip": View("vflip", lambda x: x.flip(-2), lambda x: x.flip(-2)),
    "rot180": View("rot180", lambda x: x.flip(-2, -1), lambda x: x.flip(-2, -1)),
    # counter-clockwise quarter turn; its inverse is the clockwise one
    "rot90": View("rot90", lambda x: torch.rot90(x, 1, (-2, -1)), lambda x: torch.rot90(x, -1, (-2, -1))),
}


def get_view(name: str) -> View:
    """The view called ``name``; an unknown name is a UserError listing the known ones."""
    if name not in VIEWS:
        raise UserError(f"unknown view {name!r}; choose from {', '.join(VIEWS)}")
    return VIEWS[name]


def parse_views(spec: str) -> list[View]:
    """'identity,rot180' -> the two views (at least two, comma-separated)."""
    views = [get_view(name.strip()) for name in spec.split(",") if name.strip()]
    if len(views) < 2:
        raise UserError(f"--views needs at least two comma-separated views, got {spec!r}")
    return views
