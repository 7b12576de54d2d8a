"""Held-out inputs for the image-to-image families when a caller gives none.

pix2pix translates a source image, gan-inpaint and inpaint fill holes in an image, so "draw n samples"
(the periodic grids, sample.py) needs inputs. They come from the run's own data: the first
images of its test split (the train split when it has none), loaded once and cached, and n of
them picked with the caller's generator, so a fixed seed shows the same inputs at every grid.
"""
from __future__ import annotations

import torch

from genscale.config import TrainConfig
from genscale.errors import UserError
from genscale.families.base import DataInfo

REFERENCE_LIMIT = 1024  # images read at most


def load_reference(cfg: TrainConfig, info: DataInfo, limit: int = REFERENCE_LIMIT) -> dict[str, torch.Tensor]:
    """Up to ``limit`` images (and sources) of the run's data, as float NCHW in [-1, 1] on the CPU."""
    from genscale.data import make_loader, resolve_data

    shards, problem = None, ""
    for split in ("test", "train"):
        try:
            shards = resolve_data(cfg.data, split, cfg.cache_dir or None)
            break
        except UserError as err:
            problem = str(err)
    if shards is None:
        raise UserError(f"no input images were given and the run's data {cfg.data!r} cannot be read ({problem})")
    loader = make_loader(shards, image_size=info.image_size, channels=info.channels, batch_size=limit,
                         batches_per_epoch=1, seed=0, epoch=0, rank=0, world_size=1, num_workers=0,
                         resampled=False)
    batch = next(iter(loader))
    return {k: v for k, v in batch.items() if k in ("image", "source") and torch.is_tensor(v)}


def pick(reference: dict[str, torch.Tensor], n: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    """``n`` entries of ``reference`` chosen by ``generator``: distinct ones while there are enough."""
    total = len(reference["image"])
    device = generator.device if generator is not None else "cpu"
    if n <= total:
        idx = torch.randperm(total, generator=generator, device=device)[:n]
    else:
        idx = torch.randint(0, total, (n,), generator=generator, device=device)
    return {k: v[idx.cpu()] for k, v in reference.items()}
