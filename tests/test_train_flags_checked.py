"""Training and sampling flags that were accepted and then silently ignored, or refused only after
work was written: each is now refused (or warned about) before anything happens. Helpers and
fixtures are the CLI audit's (tests/test_cli_errors_audit.py)."""
from __future__ import annotations

import pytest

from genscale.config import parse_train_args
from genscale.errors import UserError
from tests.test_cli_errors_audit import TINY, cache, one_error_line, tiny_run, train_proc  # noqa: F401


def test_keep_best_without_evaluations_is_refused():
    # --keep-best alone was accepted and did nothing: there is no score to keep the best of
    with pytest.raises(UserError, match="--keep-best .* needs --eval-every"):
        parse_train_args(["--keep-best"])
    assert parse_train_args(["--keep-best", "--eval-every", "5"]).train.keep_best


def test_resume_with_a_changed_stream_warns(tiny_run, cache):
    proc = train_proc(cache, *TINY, "--steps", "3", "--flip", "--shuffle-buffer", "7", "--out", str(tiny_run))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "with changed shuffle_buffer, flip" in proc.stderr  # both change what each rank reads


def test_ldm_autoencoder_phase_takes_the_stream_flags(tmp_path, monkeypatch):
    import genscale.train as train_module

    seen = []
    monkeypatch.setattr(train_module, "train", lambda run, last=True: seen.append(run) or 0)
    run = parse_train_args(["--model", "ldm", "--flip", "--shuffle-buffer", "17", "--batches-per-epoch", "9",
                            "--batch-size", "5", "--out", str(tmp_path / "ldm")])
    train_module.train_autoencoder_first(run)
    ae = seen[0].train
    assert (ae.model, ae.flip, ae.shuffle_buffer, ae.batches_per_epoch) == ("vae", True, 17, 9)
    assert ae.batch_size != 5  # the vae preset's batch size, not the diffusion's


@pytest.mark.parametrize("model, fragment", [("ddpm", "--attention-res 4 is not a resolution of this U-Net, whose "
                                                      "levels work at 32,16 px"),
                                             ("ldm", "--attention-res 2 is not a resolution of this U-Net, whose "
                                                     "levels work at 8 px")])
def test_attention_at_no_level_of_the_unet_is_refused(model, fragment, tmp_path, cache):
    # The 8 px presets' attention resolutions at --image-size 32 built no attention at all, silently
    # (ldm: refused before its autoencoder is trained, not minutes later).
    proc = train_proc(cache, "--model", model, "--image-size", "32", "--steps", "1", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    one_error_line(proc.stderr, fragment)
    assert not (tmp_path / "r").exists()


def test_sampling_options_a_family_has_no_use_for_are_refused():
    from types import SimpleNamespace

    from genscale.sample import check_sampling_options

    class Vae:  # the vae family's sample(): everything past the generator is swallowed by **options
        name = "vae"

        def sample(self, n, labels=None, generator=None, **options):
            raise AssertionError("not called")

    for option in (dict(cfg_scale=3.0), dict(sampler="ddpm"), dict(sampling_steps=5)):
        with pytest.raises(UserError, match=r"^--[a-z-]+ does not apply to a vae run$"):
            check_sampling_options(Vae(), **option)
    check_sampling_options(Vae())  # nothing given: nothing to refuse

    class Diffusion:
        name, opts = "ddpm", SimpleNamespace(sampler="ddim", timesteps=20)

        def sample(self, n, labels=None, generator=None, cfg_scale=None, sampler=None, sampling_steps=None, **_):
            raise AssertionError("not called")

    check_sampling_options(Diffusion(), sampling_steps=5, cfg_scale=2.0, sampler="ddim")


def test_gan_batch_of_one_is_refused_before_the_run_folder(tmp_path, cache):
    # BatchNorm1d raised "Expected more than 1 value per channel" at the first step, after config.json
    proc = train_proc(cache, "--model", "gan", "--batch-size", "1", "--steps", "1", "--out", str(tmp_path / "g"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    one_error_line(proc.stderr, "--batch-size must be at least 2 for gan")
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("model", ["ddpm", "ldm"])  # ldm's options extend ddpm's, validate included
@pytest.mark.parametrize("flags, message", [
    # accepted, then a traceback from the sampler at the first sample grid (or in sample.py)
    (["--sampling-steps", "5000"], "--sampling-steps must be between 1 and --timesteps (1000), got 5000"),
    (["--timesteps", "20"], "--sampling-steps must be between 1 and --timesteps (20), got 50"),  # the default 50
    # RuntimeError from a zero-width convolution at the first step, after config.json was written
    (["--base-width", "0"], "--base-width must be a positive number, got 0"),
    (["--channel-mults", "0,1"], "--channel-mults must be positive numbers, got 0,1"),
    (["--channel-mults", "1,-2"], "--channel-mults must be positive numbers, got 1,-2"),
    # ldm: an IndexError traceback (ddpm: the U-Net's own sentence, now given when parsed)
    (["--channel-mults", ""], "--channel-mults must list at least one multiplier, e.g. 1,2"),
    # -1 built a U-Net with no decoder blocks, silently; 1.5 raised from nn.Dropout
    (["--num-res-blocks", "-1"], "--num-res-blocks must not be negative, got -1"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1), got 1.5"),
    (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),  # zeroes every residual branch
    (["--eta", "-1"], "--eta must be a non-negative number, got -1.0"),  # ValueError at the first grid
])
def test_unet_and_sampler_options_are_checked_when_parsed(model, flags, message):
    with pytest.raises(UserError) as err:
        parse_train_args(["--model", model, *flags])
    assert str(err.value) == message
    if flags[0] in ("--sampling-steps", "--timesteps"):  # the boundary is allowed
        parse_train_args(["--model", model, "--timesteps", "20", "--sampling-steps", "20"])


@pytest.mark.parametrize("model, flags, fragment", [
    ("ddpm", ["--sampling-steps", "5000", "--sample-every", "1"], "--sampling-steps must be between 1"),
    ("ldm", ["--channel-mults", "0,1"], "--channel-mults must be positive numbers"),
    ("gan", ["--seed", str(10**20)], "--seed must be between 0 and 2**63 - 1"),
])
def test_bad_options_are_refused_before_the_run_folder(model, flags, fragment, tmp_path, cache):
    # each was a traceback after the run folder and config.json were written (ldm: after training
    # its autoencoder first)
    proc = train_proc(cache, "--model", model, "--steps", "2", *flags, "--out", str(tmp_path / "r"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    one_error_line(proc.stderr, fragment)
    assert not (tmp_path / "r").exists()
