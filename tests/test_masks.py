"""Inpainting masks: binary, 1 = known, seeded, the promised shapes and hole sizes."""
from __future__ import annotations

import pytest
import torch

from genscale.data.masks import box_masks, pixel_masks, random_masks, stroke_masks
from genscale.errors import UserError

KINDS = ("box", "stroke", "pixel", "mixed")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kind", KINDS)
def test_binary_shape_and_both_values_present(kind):
    m = random_masks(kind, 40, (16, 24), generator=gen(0))
    assert m.shape == (40, 1, 16, 24) and m.dtype == torch.float32
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    holes = (m == 0).flatten(1).sum(1)
    assert (holes > 0).all() and (holes < 16 * 24).all()


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_masks_other_seed_other_masks(kind):
    a = random_masks(kind, 8, 32, generator=gen(3))
    b = random_masks(kind, 8, 32, generator=gen(3))
    c = random_masks(kind, 8, 32, generator=gen(4))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_global_rng_is_used_without_a_generator():
    torch.manual_seed(11)
    a = random_masks("mixed", 6, 16)
    torch.manual_seed(11)
    b = random_masks("mixed", 6, 16)
    assert torch.equal(a, b)


def test_box_is_one_rectangle_of_the_promised_size():
    m = box_masks(200, 32, generator=gen(1), min_frac=0.25, max_frac=0.5)
    for mask in m[:, 0]:
        hole = mask == 0
        rows = hole.any(1).nonzero().flatten()
        cols = hole.any(0).nonzero().flatten()
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        # the hole fills its bounding box exactly: a rectangle
        assert hole.sum() == h * w
        assert 8 <= h <= 16 and 8 <= w <= 16  # 0.25..0.5 of 32, rounded


def test_pixel_hole_rate_follows_the_range():
    m = pixel_masks(300, 32, generator=gen(2), min_hole=0.3, max_hole=0.7)
    rate = (m == 0).float().flatten(1).mean(1)
    assert rate.min() > 0.22 and rate.max() < 0.78
    # uniform on [0.3, 0.7]: the mean rate is 0.5
    assert abs(rate.mean().item() - 0.5) < 0.03


def test_strokes_are_thin_connected_shapes_not_scattered_pixels():
    m = stroke_masks(50, 32, generator=gen(5))
    hole = (m == 0).float()
    # A brush stroke's hole pixels mostly have hole neighbours; scattered pixels would not.
    neighbours = torch.nn.functional.conv2d(hole, torch.ones(1, 1, 3, 3), padding=1) - hole
    share = (neighbours[hole.bool()] >= 2).float().mean()
    assert share > 0.9
    assert 0.01 < hole.mean() < 0.6


def test_mixed_draws_every_kind():
    m = random_masks("mixed", 60, 32, generator=gen(7))
    boxes = sum(bool(((mk == 0).sum() == _bbox_area(mk))) for mk in m[:, 0])
    assert 5 < boxes < 55  # some rectangles and some not


def _bbox_area(mask: torch.Tensor) -> int:
    hole = mask == 0
    rows = hole.any(1).nonzero().flatten()
    cols = hole.any(0).nonzero().flatten()
    return int((rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1))


def test_device_argument_and_bad_kind():
    assert random_masks("box", 2, 8, generator=gen(0), device="cpu").device.type == "cpu"
    with pytest.raises(UserError):
        random_masks("circle", 2, 8)
    with pytest.raises(UserError):
        box_masks(2, 8, min_frac=0.6, max_frac=0.5)



@pytest.mark.parametrize("size, rows, cols", [(8, (2, 6), (2, 6)), ((7, 10), (1, 5), (2, 7))])
def test_centre_masks_cut_the_middle_half_of_each_side(size, rows, cols):
    # 7 rows: round(3.5) = 4 hole rows (half to even) from (7 - 4) // 2 = 1; 10 columns: 5 from 2
    h, w = (size, size) if isinstance(size, int) else size
    expected = torch.ones(h, w)
    expected[rows[0]:rows[1], cols[0]:cols[1]] = 0
    m = random_masks("centre", 3, size)
    assert m.shape == (3, 1, h, w) and all(torch.equal(m[i, 0], expected) for i in range(3))
