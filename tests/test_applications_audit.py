"""sample.py --task ...: the user audit's findings. Image inputs decode as the training data does,
bad or silently ignored values are refused in one sentence, every task draws in seeded batches
with a progress bar, and the denoiser sweep honours --out OUT.npz."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from genscale.applications.inputs import load_images
from genscale.errors import UserError
from genscale.families.base import DataInfo
from genscale.metrics.sharded import chunk_generator
from tests.test_applications_cli import cli
from tests.test_applications_support import tiny_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    rng = np.random.default_rng(1)
    np.savez(root / "images.npz", (rng.random((3, 8, 8, 1)) * 255).astype(np.uint8))
    np.savez(root / "colour.npz", (rng.random((3, 8, 8, 3)) * 255).astype(np.uint8))
    np.savez(root / "empty.npz", np.zeros((0, 8, 8), np.uint8))
    masks = np.ones((3, 8, 8), np.uint8)
    masks[:, 2:6, 2:6] = 0
    np.savez(root / "masks.npz", masks)
    Image.fromarray((masks[0] * 255).astype(np.uint8)).save(root / "mask.png")
    Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).save(root / "digit.png")
    return dict(root=root, ddpm=tiny_run(root / "ddpm"), denoiser=tiny_run(root / "denoiser", "denoiser", width=8),
                uncond=tiny_run(root / "uncond", info=DataInfo("digits", 1, 8, 0)))


def run_cli(runs, run, argv, tmp_path, capsys, out="x"):
    argv = [str(a).format(root=runs["root"]) for a in argv]
    return cli(["--run", runs[run], "--out", tmp_path / out, *argv], capsys)


# -- 1a: image files decode as the training data does ---------------------------------------------

def _digit(rng) -> np.ndarray:
    return (rng.random((8, 8)) > 0.5).astype(np.uint8)


def _palette_digit(path, rng):
    """A black digit on white, stored as palette indices 0 (white) and 1 (black)."""
    img = Image.fromarray(_digit(rng), "P")
    img.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    img.save(path)
    return np.asarray(Image.open(path).convert("L"))[..., None]  # PIL's own expansion of the palette


def _la(path, rng):
    grey, alpha = (rng.random((2, 8, 8)) * 255).astype(np.uint8)
    Image.fromarray(np.stack([grey, alpha], -1), "LA").save(path)
    a = alpha / 255.0  # composited onto white, as the README promises for data
    return np.round(grey * a + 255 * (1 - a))[..., None]


def _rgba(path, rng):
    rgba = (rng.random((8, 8, 4)) * 255).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(path)
    a = rgba[..., 3:] / 255.0
    return np.round(rgba[..., :3] * a + 255 * (1 - a))


def _i16(path, rng):
    values = (rng.random((8, 8)) * 65535).astype(np.uint16)
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I;16")
    return np.round(values / 65535 * 255)[..., None]  # rescaled, not clipped at 255


def _one_bit(path, rng):
    Image.fromarray(_digit(rng).astype(bool)).save(path)
    assert Image.open(path).mode == "1"
    return np.asarray(Image.open(path).convert("L"))[..., None]


def _cmyk(path, rng):
    Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8)).convert("CMYK").save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("make, name, channels, atol", [
    (_palette_digit, "p.png", 1, 0), (_la, "la.png", 1, 1), (_rgba, "rgba.png", 3, 1), (_i16, "i16.png", 1, 0),
    (_one_bit, "one.png", 1, 0), (_cmyk, "cmyk.jpg", 3, 0)])
def test_image_inputs_give_the_pixels_of_pils_conversion(make, name, channels, atol, tmp_path):
    """Was np.array(Image.open(path)): palette indices, alpha or K bands read as pixels, 16-bit and
    1-bit images refused."""
    expected = make(tmp_path / name, np.random.default_rng(0))
    images, _ = load_images(str(tmp_path / name), str(tmp_path), 8, channels, 1)
    assert images.dtype == np.uint8 and images.shape == (1, 8, 8, channels)
    assert np.abs(images[0].astype(int) - expected.astype(int)).max() <= atol


def test_a_palette_digit_is_not_read_as_indices(tmp_path):
    rng = np.random.default_rng(3)
    _palette_digit(tmp_path / "p.png", rng)
    images, _ = load_images(str(tmp_path / "p.png"), str(tmp_path), 8, 1, 1)
    assert set(np.unique(images)) == {0, 255}  # black strokes on white, not indices 0 and 1


# -- 1b, 3: what --input accepts, and how it says no --------------------------------------------------

@pytest.mark.parametrize("task, extra", [("denoise", []), ("img2img", []),
                                         ("inpaint", ["--mask", "{root}/empty.npz"])])
def test_an_input_without_images_is_refused(task, extra, runs, tmp_path, capsys):
    code, _, err = run_cli(runs, "ddpm", ["--task", task, "--input", "{root}/empty.npz", *extra], tmp_path, capsys)
    assert code == 2 and "holds no images" in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing written


def test_input_names_a_folder_and_lists_the_kinds_it_reads(runs, tmp_path, capsys):
    code, _, err = run_cli(runs, "ddpm", ["--task", "denoise", "--input", runs["root"]], tmp_path, capsys)
    assert code == 2 and "is a folder, not a file" in err
    (tmp_path / "a.gif").write_bytes(b"GIF89a")
    code, _, err = run_cli(runs, "ddpm", ["--task", "denoise", "--input", tmp_path / "a.gif"], tmp_path, capsys)
    assert code == 2 and ".npz or an image (.png, .jpg, .jpeg, .webp)" in err


def test_suffixes_are_case_insensitive_and_webp_is_read(runs, tmp_path):
    images = np.load(runs["root"] / "images.npz")["arr_0"]
    upper = tmp_path / "IMAGES.NPZ"
    upper.write_bytes((runs["root"] / "images.npz").read_bytes())
    got, _ = load_images(str(upper), str(runs["ddpm"]), 8, 1, 1)
    assert np.array_equal(got, images)
    Image.fromarray(images[0, ..., 0]).save(tmp_path / "one.WEBP", lossless=True)
    got, _ = load_images(str(tmp_path / "one.WEBP"), str(runs["ddpm"]), 8, 1, 1)
    assert np.array_equal(got[0], images[0])


def test_inpaint_takes_one_image_and_a_mask_picture(runs, tmp_path, capsys):
    code, _, err = run_cli(runs, "ddpm", ["--task", "inpaint", "--input", "{root}/digit.png", "--mask",
                                          "{root}/mask.png", "--steps", "4", "--jump-length", "2"], tmp_path, capsys)
    assert code == 0, err
    filled = np.load(tmp_path / "x.npz")["arr_0"]
    digit = np.asarray(Image.open(runs["root"] / "digit.png"))
    known = np.load(runs["root"] / "masks.npz")["arr_0"][0] == 1
    assert filled.shape == (1, 8, 8, 1)
    assert np.array_equal(filled[0, ..., 0][known], digit[known])
    assert np.mean(filled[0, ..., 0][~known] != digit[~known]) > 0.5


def test_a_jpeg_or_smoothed_mask_picture_is_thresholded(tmp_path):
    """A JPEG of a black square on white decodes with grey levels along its edges, and so does a
    smoothed drawing; they were refused as 'not black and white only'. Light (>= 128) is known."""
    from genscale.inpainting import _mask_from_image

    drawn = np.full((8, 8), 255, np.uint8)
    drawn[2:6, 2:6] = 0
    Image.fromarray(drawn).save(tmp_path / "mask.jpg", quality=95)
    jpeg_levels = np.asarray(Image.open(tmp_path / "mask.jpg").convert("L"))
    assert len(np.unique(jpeg_levels)) > 2  # the case: more than black and white
    assert np.array_equal(_mask_from_image(str(tmp_path / "mask.jpg"))[0], (jpeg_levels >= 128).astype(np.uint8))
    assert np.array_equal(_mask_from_image(str(tmp_path / "mask.jpg"))[0], (drawn == 255).astype(np.uint8))
    smooth = np.asarray(Image.fromarray(drawn).resize((16, 16), Image.BILINEAR))  # edges of grey
    Image.fromarray(smooth).save(tmp_path / "smooth.png")
    assert np.array_equal(_mask_from_image(str(tmp_path / "smooth.png"))[0], (smooth >= 128).astype(np.uint8))


def test_repaint_labels_cycle_over_all_images_across_batches(monkeypatch):
    """--labels 0,1,2 on 7 images in batches of 3: one label per image over the whole input
    (0 1 2 0 1 2 0), not restarted in each batch (0 1 2 | 0 1 2 | 0)."""
    import genscale.inpainting as inpainting

    seen = []

    class Diffusion:  # what run_inpainting reads of a diffusion family
        name, num_classes, device = "ddpm", 3, "cpu"

        class schedule:
            timesteps = 10

    monkeypatch.setattr(inpainting, "is_diffusion", lambda family: True)

    def fill(family, x, m, gen, options):
        seen.extend(options["labels"].tolist())
        return x

    monkeypatch.setattr(inpainting, "call_inpaint", fill)
    images = np.zeros((7, 4, 4, 1), np.uint8)
    masks = np.ones((7, 4, 4), np.uint8)
    inpainting.run_inpainting(Diffusion(), images, masks, 4, 1, batch_size=3, options=dict(labels="0,1,2", steps=2))
    assert seen == [0, 1, 2, 0, 1, 2, 0]


def test_inpaint_converts_a_colour_npz_for_a_grey_run_as_denoise_does(runs, tmp_path, capsys):
    code, _, err = run_cli(runs, "ddpm", ["--task", "inpaint", "--input", "{root}/colour.npz", "--mask",
                                          "{root}/masks.npz", "--steps", "4", "--jump-length", "2"], tmp_path, capsys)
    assert code == 0, err
    colour = np.load(runs["root"] / "colour.npz")["arr_0"]
    grey = np.stack([np.asarray(Image.fromarray(c).convert("L")) for c in colour])  # PIL's luma
    known = np.load(runs["root"] / "masks.npz")["arr_0"] == 1
    assert np.array_equal(np.load(tmp_path / "x.npz")["arr_0"][..., 0][known], grey[known])
    via_denoise, _ = load_images(str(runs["root"] / "colour.npz"), str(runs["ddpm"]), 8, 1, 1)
    assert np.array_equal(via_denoise[..., 0], grey)


# -- 1c: absurd values ------------------------------------------------------------------------

@pytest.mark.parametrize("run, argv, message", [
    ("ddpm", ["--task", "anagram", "--eta", "1e30", "--num", "1"], "--eta must lie between 0"),
    ("ddpm", ["--task", "denoise", "--input", "{root}/images.npz", "--eta", "1e30"], "--eta must lie between 0"),
    ("ddpm", ["--task", "hybrid", "--num", "2", "--steps", "3", "--labels", "3,9", "--cfg-scale", "1e300"],
     "gave NaN or infinite values at --cfg-scale 1e+300"),
    ("ddpm", ["--task", "denoise", "--input", "{root}/images.npz", "--steps", "2", "--labels", "3",
              "--cfg-scale", "1e300"], "gave NaN or infinite values at --cfg-scale 1e+300"),
    ("denoiser", ["--task", "denoise", "--input", "{root}/images.npz", "--sigmas", "0.5,1e30"],
     "--sigmas value 1e+30 is NaN or infinite"),
    ("denoiser", ["--task", "denoise", "--input", "{root}/images.npz", "--sigmas", "0.5,inf"],
     "--sigmas must list non-negative finite numbers"),
])
def test_absurd_values_are_refused_and_nothing_is_written(run, argv, message, runs, tmp_path, capsys):
    code, _, err = run_cli(runs, run, argv, tmp_path, capsys)
    assert code == 2 and message in err, err
    assert not list(tmp_path.iterdir())


# -- 1d: flags a task would ignore -------------------------------------------------------------

@pytest.mark.parametrize("run, argv, message", [
    ("ddpm", ["--task", "img2img", "--input", "{root}/images.npz", "--t", "5"], "--t does not apply to --task img2img"),
    ("ddpm", ["--task", "img2img", "--input", "{root}/images.npz", "--views", "identity,vflip"],
     "--views does not apply"),
    ("ddpm", ["--task", "inpaint", "--input", "{root}/images.npz", "--mask", "{root}/masks.npz", "--eta", "1"],
     "--eta does not apply to --task inpaint"),
    ("ddpm", ["--task", "inpaint", "--input", "{root}/images.npz", "--mask", "{root}/masks.npz", "--num", "2"],
     "--num does not apply to --task inpaint"),
    ("ddpm", ["--task", "denoise", "--input", "{root}/images.npz", "--num", "2"], "--num cannot be used with --input"),
    # the default's own value, given: told apart from the default (it was taken for "not given")
    ("ddpm", ["--task", "denoise", "--input", "{root}/images.npz", "--num", "64"], "--num cannot be used with --input"),
    ("denoiser", ["--task", "denoise", "--input", "{root}/images.npz", "--t", "3"],
     "--t does not apply to the denoiser"),
    ("denoiser", ["--task", "denoise", "--input", "{root}/images.npz", "--steps", "3"], "--steps does not apply"),
    ("denoiser", ["--task", "denoise", "--input", "{root}/images.npz", "--eta", "1"], "--eta does not apply"),
    ("uncond", ["--task", "denoise", "--input", "{root}/images.npz", "--labels", "3"],
     "this run was trained without labels, so --labels cannot be used"),
    ("uncond", ["--task", "inpaint", "--input", "{root}/images.npz", "--mask", "{root}/masks.npz", "--labels", "3"],
     "this run was trained without labels, so --labels cannot be used"),
    ("ddpm", ["--task", "img2img", "--input", "{root}/images.npz", "--steps", "21"],
     "--steps must be between 1 and 20"),
    ("ddpm", ["--task", "denoise", "--input", "{root}/images.npz", "--steps", "21"],
     "--steps must be between 1 and 11"),
    ("ddpm", ["--task", "inpaint", "--input", "{root}/images.npz", "--mask", "{root}/masks.npz", "--steps", "21"],
     "--steps must be between 1 and 20"),
])
def test_flags_a_task_would_ignore_are_refused(run, argv, message, runs, tmp_path, capsys):
    code, _, err = run_cli(runs, run, argv, tmp_path, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_repaint_settings_are_refused_by_an_inpainting_network():
    from types import SimpleNamespace

    from genscale.inpainting import run_inpainting

    net = SimpleNamespace(name="inpaint", device="cpu", inpaint=lambda images, masks: images)
    images, masks = np.zeros((1, 8, 8, 1), np.uint8), np.ones((1, 8, 8), np.uint8)
    with pytest.raises(UserError, match="--jump-count apply to RePaint on diffusion runs"):
        run_inpainting(net, images, masks, 8, 1, options=dict(jump_count=3))


def test_more_images_than_the_held_out_split_is_said(runs, tmp_path, capsys):
    code, _, err = run_cli(runs, "ddpm", ["--task", "denoise", "--num", "400", "--steps", "1", "--t", "2"],
                           tmp_path, capsys, out="x.npz")
    held_out = len(np.load(tmp_path / "x.npz")["arr_0"])
    assert code == 0 and held_out < 400
    assert f"--num 400 asks for more images than the held-out split holds ({held_out})" in err


# -- 2: batches ---------------------------------------------------------------------------------

def test_hybrid_draws_batches_seeded_by_seed_and_batch_index_with_a_bar(runs, tmp_path, capsys):
    from genscale.applications.hybrid import hybrid
    from genscale.applications.model import DiffusionModel
    from genscale.run_files import to_uint8
    from genscale.sample import load_family

    code, _, err = run_cli(runs, "ddpm", ["--task", "hybrid", "--num", "5", "--batch-size", "2", "--steps", "3",
                                          "--labels", "3,9", "--eta", "1", "--seed", "4"], tmp_path, capsys)
    assert code == 0, err
    assert "hybrid:" in err and "/5 [" in err  # one bar over the 5 images (cleared when done)
    got = np.load(tmp_path / "x.npz")["arr_0"]
    dm = DiffusionModel(load_family(runs["ddpm"])[0])
    for k, (start, stop) in enumerate([(0, 2), (2, 4), (4, 5)]):
        ref = hybrid(dm, stop - start, 3, 9, sigma=1.0, cfg_scale=dm.default_cfg, steps=3, eta=1.0,
                     generator=chunk_generator(4, k))
        assert np.array_equal(got[start:stop], to_uint8(ref))


def test_denoise_batches_match_the_library_on_each_batch(runs, tmp_path, capsys):
    from genscale.applications.denoise import denoise
    from genscale.applications.inputs import to_tensor
    from genscale.applications.model import DiffusionModel
    from genscale.run_files import to_uint8
    from genscale.sample import load_family

    code, _, err = run_cli(runs, "ddpm", ["--task", "denoise", "--input", "{root}/images.npz", "--t", "10",
                                          "--steps", "3", "--eta", "1", "--batch-size", "2"], tmp_path, capsys)
    assert code == 0, err
    got = np.load(tmp_path / "x.npz")
    images = np.load(runs["root"] / "images.npz")["arr_0"]
    dm = DiffusionModel(load_family(runs["ddpm"])[0])
    for k, (start, stop) in enumerate([(0, 2), (2, 3)]):
        r = denoise(dm, to_tensor(images[start:stop]), 10, steps=3, eta=1.0, cfg_scale=dm.default_cfg,
                    generator=chunk_generator(0, k))
        assert np.array_equal(got["arr_0"][start:stop], to_uint8(r.iterative))
        assert np.array_equal(got["one_step"][start:stop], to_uint8(r.one_step))


# -- 3: the denoiser sweep's outputs --------------------------------------------------------------

def test_sweep_out_npz_writes_only_the_npz(runs, tmp_path, capsys):
    code, _, err = run_cli(runs, "denoiser", ["--task", "denoise", "--input", "{root}/images.npz",
                                              "--sigmas", "0,0.5"], tmp_path, capsys, out="x.npz")
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz"]


def test_library_eps_refuses_an_overflowing_guidance_scale(runs):
    from genscale.applications.model import DiffusionModel, NonFiniteError
    from genscale.sample import load_family

    dm = DiffusionModel(load_family(runs["ddpm"])[0])
    x = torch.zeros(1, 1, 8, 8)
    with pytest.raises(NonFiniteError):
        dm.eps(x, 5, torch.tensor([3]), 1e300)
