"""Diffusion applications: views, filters, timestep schedules, RePaint, SDEdit, denoising, anagram
and hybrid guidance, on tiny untrained models against independent references."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genscale.applications.anagram import anagram_eps
from genscale.applications.denoise import denoise, one_step_x0
from genscale.applications.filters import gaussian_kernel1d, highpass, lowpass
from genscale.applications.hybrid import hybrid_eps
from genscale.applications.model import DiffusionModel
from genscale.applications.repaint import repaint, repaint_schedule
from genscale.applications.sdedit import level_timestep, sdedit
from genscale.applications.views import VIEWS, get_view
from genscale.diffusion.samplers import strided_timesteps
from genscale.errors import UserError
from tests.test_applications_support import tiny_ddpm


@pytest.fixture(scope="module")
def dm():
    return DiffusionModel(tiny_ddpm(timesteps=20))


def images(n=4, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- views ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(VIEWS))
def test_views_are_pixel_permutations_undone_by_their_inverse(name):
    view = get_view(name)
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float64).reshape(2, 3, 6, 6)
    y = view.apply(x)
    assert torch.equal(y.flatten(2).sort(-1).values, x.flatten(2))  # same values per channel: a permutation
    assert torch.equal(view.inverse(y), x) and torch.equal(view.apply(view.inverse(x)), x)
    assert torch.equal(y[:, 1:] - y[:, :1], x[:, 1:] - x[:, :1])  # the same permutation in every channel
    assert name == "identity" or not torch.equal(y, x)


def test_views_against_hand_written_indices():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]
    assert get_view("vflip").apply(x).flatten().tolist() == [3, 4, 1, 2]  # upside down
    assert get_view("rot180").apply(x).flatten().tolist() == [4, 3, 2, 1]
    assert get_view("rot90").apply(x).flatten().tolist() == [2, 4, 1, 3]  # a counter-clockwise turn
    r = get_view("rot90").apply
    big = torch.randn(1, 1, 5, 5)
    assert torch.equal(r(r(r(r(big)))), big) and torch.equal(r(r(big)), get_view("rot180").apply(big))


def test_unknown_view_is_a_user_error():
    with pytest.raises(UserError, match="unknown view 'hflip'"):
        get_view("hflip")


# -- filters ----------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.3])
def test_gaussian_kernel_sums_to_one_and_is_the_sampled_gaussian(sigma):
    k = gaussian_kernel1d(sigma, dtype=torch.float64)
    r = (len(k) - 1) // 2
    assert math.isclose(float(k.sum()), 1.0, abs_tol=1e-12)
    ref = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    np.testing.assert_allclose(k.numpy(), ref / ref.sum(), rtol=1e-12)


@pytest.mark.parametrize("sigma", [0.7, 1.0, 1.5])
def test_lowpass_matches_scipy_and_low_plus_high_is_identity(sigma):
    from scipy.ndimage import gaussian_filter

    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    low = lowpass(x, sigma)
    # scipy's 'mirror' is torch's 'reflect'; truncate 3 sigma gives radius ceil(3 sigma) for these sigmas
    radius = math.ceil(3 * sigma)
    ref = np.stack([[gaussian_filter(c, sigma, mode="mirror", truncate=radius / sigma) for c in img]
                    for img in x.numpy()])
    np.testing.assert_allclose(low.numpy(), ref, atol=1e-12)
    assert torch.allclose(low + highpass(x, sigma), x, atol=1e-15, rtol=0)
    const = torch.full((1, 1, 8, 8), 0.37, dtype=torch.float64)
    assert torch.allclose(lowpass(const, sigma), const, atol=1e-15)  # the kernel sums to one
    assert float(highpass(const, sigma).abs().max()) < 1e-15


def test_filter_rejects_non_positive_sigma():
    with pytest.raises(UserError, match="sigma must be positive"):
        lowpass(torch.zeros(1, 1, 8, 8), 0.0)


# -- timestep schedules -----------------------------------------------------------------------

@pytest.mark.parametrize("t, steps", [(10, 4), (19, 20), (7, 1), (500, 20)])
def test_strided_schedules_hit_the_intended_timesteps(t, steps):
    ts = strided_timesteps(t + 1, steps)
    # evenly spaced over [0, t], nearest integers, descending
    expected = [math.floor(i * t / (steps - 1) + 0.5) for i in range(steps)][::-1] if steps > 1 else [t]
    assert ts == expected and ts[0] == t and len(set(ts)) == steps


def test_reverse_loop_calls_the_model_at_exactly_the_schedule(dm):
    seen = []

    def eps_fn(x, t):
        seen.append(t)
        return torch.zeros_like(x)

    dm.reverse(torch.zeros(1, 1, 8, 8), [19, 13, 6, 0], eps_fn)
    assert seen == [19, 13, 6, 0]


def test_sdedit_levels_map_to_timesteps():
    assert level_timestep(0.0, 1000) is None
    assert level_timestep(1.0, 1000) == 999
    assert level_timestep(0.5, 1000) == 499
    assert level_timestep(0.0004, 1000) is None  # rounds to no noise
    with pytest.raises(UserError):
        level_timestep(1.5, 1000)


def test_repaint_schedule_hand_worked_example():
    # 6 positions, jumps of 2, each jump point passed twice: down to 2, back up to 4, down to 0,
    # back up to 2, down to the end (RePaint's Fig./Alg. with r = 2, j = 2).
    assert repaint_schedule(6, 2, 2) == [5, 4, 3, 2, 3, 4, 3, 2, 1, 0, 1, 2, 1, 0, -1]
    assert repaint_schedule(5, 10, 10) == [4, 3, 2, 1, 0, -1]  # jumps longer than the walk: none
    assert repaint_schedule(6, 2, 1) == [5, 4, 3, 2, 1, 0, -1]  # one pass: no resampling


def test_repaint_schedule_paper_setting():
    # T = 250, jump length 10, 10 resamplings: jump points 0, 10, ..., 230 each re-entered 9 times.
    path = repaint_schedule(250, 10, 10)
    down = [(a, b) for a, b in zip(path, path[1:]) if b < a]
    up = [(a, b) for a, b in zip(path, path[1:]) if b > a]
    assert all(abs(a - b) == 1 for a, b in zip(path, path[1:]))
    assert len(down) == 250 + 24 * 9 * 10 and len(up) == 24 * 9 * 10
    arrivals = {p: sum(1 for a, b in down if b == p) for p in range(0, 250)}
    for p in range(0, 240, 10):
        assert arrivals[p] == 10  # 1 + 9 resamplings
    assert max(path) == 249 and path[0] == 249 and path[-1] == -1
    # every upward run is exactly one jump length long
    runs, run = [], 0
    for a, b in zip(path, path[1:]):
        if b > a:
            run += 1
        elif run:
            runs.append(run)
            run = 0
    assert set(runs) == {10} and len(runs) == 24 * 9


# -- RePaint, SDEdit, denoising -----------------------------------------------------------------

def test_repaint_keeps_known_pixels_bit_exact_and_is_seeded(dm):
    x = images(3)
    masks = (torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    out = repaint(dm, x, masks, steps=8, jump_length=2, jump_count=2, generator=torch.Generator().manual_seed(5))
    known = masks.expand_as(x) > 0.5
    assert torch.equal(out[known], x[known])
    assert not torch.equal(out[~known], x[~known]) and out.abs().max() <= 1
    again = repaint(dm, x, masks, steps=8, jump_length=2, jump_count=2, generator=torch.Generator().manual_seed(5))
    assert torch.equal(out, again)


def test_repaint_through_the_uint8_interface_keeps_known_bytes():
    from genscale.inpainting import run_inpainting

    family = tiny_ddpm()
    imgs = (torch.rand(2, 8, 8, 1, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8).numpy()
    masks = np.ones((2, 8, 8), np.uint8)
    masks[:, 2:6, 2:6] = 0
    out = run_inpainting(family, imgs, masks, 8, 1, seed=0, options=dict(steps=6, jump_length=2, jump_count=2))
    assert out.dtype == np.uint8 and out.shape == imgs.shape
    assert np.array_equal(out[masks == 1], imgs[masks == 1])


def test_sdedit_level_zero_returns_the_input_and_full_noise_forgets_it(dm):
    x = images(2)
    out = sdedit(dm, x, [0.0, 1.0], steps=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[0], x)
    assert not torch.allclose(out[1], x, atol=1e-2)


def test_one_step_x0_matches_the_float64_formula(dm):
    x0 = images(3)
    t = 10
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    abar = dm.schedule.alphas_cumprod[t]  # float64
    x_t = (abar.sqrt() * x0.double() + (1 - abar).sqrt() * noise.double()).float()
    eps = dm.net(x_t, torch.full((3,), t), None).double()
    ref = ((x_t.double() - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
    got = one_step_x0(dm, x_t, t, None, 1.0)
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=1e-5)


def test_denoise_one_iterative_step_equals_one_step_and_psnr_is_pooled(dm):
    x = images(3)
    r = denoise(dm, x, 10, steps=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(r.iterative, r.one_step)  # one DDIM step to abar = 1 is the one-step x0
    mse = float((r.blur.double() - x.double()).square().mean())
    assert math.isclose(r.psnr()["blur"], 10 * math.log10(4 / mse), rel_tol=1e-9)
    with pytest.raises(UserError, match="--t must be"):
        denoise(dm, x, 20)


# -- anagram and hybrid guidance ----------------------------------------------------------------

def test_anagram_eps_is_the_mean_of_inverse_viewed_predictions(dm):
    views = [get_view("identity"), get_view("rot90")]
    x = images(2)
    eps = anagram_eps(dm, views, [6, 9], 2.0)(x, 7)
    e6 = dm.eps(x, 7, torch.tensor([6, 6]), 2.0)
    e9 = dm.eps(torch.rot90(x, 1, (-2, -1)), 7, torch.tensor([9, 9]), 2.0)
    torch.testing.assert_close(eps, (e6 + torch.rot90(e9, -1, (-2, -1))) / 2, atol=1e-6, rtol=1e-5)


def test_hybrid_eps_is_lowpass_of_one_plus_highpass_of_the_other(dm):
    x = images(2)
    eps = hybrid_eps(dm, 8, 1, 1.0, 2.0)(x, 5)
    e8 = dm.eps(x, 5, torch.tensor([8, 8]), 2.0)
    e1 = dm.eps(x, 5, torch.tensor([1, 1]), 2.0)
    torch.testing.assert_close(eps, lowpass(e8, 1.0) + e1 - lowpass(e1, 1.0), atol=1e-6, rtol=1e-5)


def test_pixel_tasks_refuse_latent_runs(dm):
    latent = DiffusionModel(dm.family)
    latent.latent = True
    with pytest.raises(UserError, match="pixel space"):
        repaint(latent, images(1), torch.ones(1, 1, 8, 8), steps=2)


def test_a_grey_png_input_loads_without_warnings(tmp_path):
    """PIL's greyscale arrays are read-only: torch.from_numpy warned "The given NumPy array is not writable"."""
    import warnings

    from PIL import Image

    from genscale.applications.inputs import load_images, to_tensor

    pixels = (np.arange(64, dtype=np.uint8) * 4).reshape(8, 8)
    Image.fromarray(pixels).save(tmp_path / "grey.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images, labels = load_images(str(tmp_path / "grey.png"), str(tmp_path), 8, 1, 1)
        x = to_tensor(images)
    assert images.shape == (1, 8, 8, 1) and labels.tolist() == [-1]
    assert torch.equal(x[0, 0], torch.from_numpy(pixels.astype(np.float32)) / 127.5 - 1)
