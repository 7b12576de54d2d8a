"""--init-from: a new run starts from another run's trained weights (EMA weights where the network
has an EMA copy, Accelerate's saved weights for a GAN's discriminator); a resume ignores it; runs
whose weights would mean something else are refused in one sentence."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import genscale.train as train_module
from genscale import init_from
from genscale.config import parse_train_args
from genscale.errors import UserError
from genscale.families import family_module
from genscale.families.base import DataInfo
from tests.test_channels_last import TINY, train, weights

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.double().flatten() for v in state.values() if v.is_floating_point()])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def source(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("runs") / "source"
    train(cache, out, 2)
    return out


def test_a_new_run_starts_from_the_sources_ema_weights_and_a_resume_ignores_the_flag(source, cache, tmp_path):
    ema = torch.load(source / "checkpoints" / "step-00000002" / "ema.pt", weights_only=True)["model"]
    out = tmp_path / "finetune"
    first = train(cache, out, 1, "--init-from", str(source))
    assert torch.equal(first.start, flat(ema)) and torch.equal(first.start_ema, flat(ema))
    assert first.progress.step == 1 and first.ema.updates == 1  # step, EMA and optimizer start afresh
    assert json.loads((out / "config.json").read_text())["train"]["init_from"] == str(source)
    fresh = train(cache, tmp_path / "fresh", 1)
    assert not torch.equal(fresh.start, first.start)  # without the flag: the seed's initial weights
    # the same command again resumes the new run from its own checkpoint; the source is not read
    # again (here it no longer exists)
    second = train(cache, out, 2, "--init-from", str(tmp_path / "gone"))
    assert torch.equal(second.start, weights(first.plain("model")))


def test_a_gan_discriminator_comes_from_its_trained_weights(cache, tmp_path):
    out = tmp_path / "gan"
    args = ["--model", "gan", "--steps", "2", "--batch-size", "8", "--ckpt-every", "2", "--sample-every", "0",
            "--num-workers", "0", "--cache-dir", str(cache)]
    assert train_module.train(parse_train_args([*args, "--out", str(out)]))
    run = parse_train_args([*args, "--out", str(tmp_path / "new"), "--init-from", str(out)])
    module = family_module("gan")
    family = module.FAMILY(run.train, run.options, DataInfo("digits", 1, run.train.image_size, 10))
    untrained = flat(family.nets["discriminator"].state_dict())
    used = init_from.load_weights(run, family, module.RESUME_MAY_CHANGE)
    assert used == out / "checkpoints" / "step-00000002"
    names = list(family.nets)
    saved = load_file(str(used / f"model_{names.index('discriminator')}.safetensors"))
    loaded = family.nets["discriminator"].state_dict()
    assert sorted(loaded) == sorted(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert not torch.equal(untrained, flat(loaded))
    ema = torch.load(used / "ema.pt", weights_only=True)
    assert "discriminator" not in ema
    assert torch.equal(flat(family.nets["generator"].state_dict()), flat(ema["generator"]))


@pytest.mark.parametrize("flags, message", [
    ([*TINY, "--timesteps", "30"], "--init-from {src} was trained with --timesteps 20; give the same to start from its weights"),
    (["--model", "vae", "--steps", "2", "--num-workers", "0"], "--init-from {src} holds a ddpm run; a vae run cannot start from it"),
])
def test_a_source_whose_weights_mean_something_else_is_refused(source, cache, tmp_path, flags, message):
    args = [*flags, "--cache-dir", str(cache), "--out", str(tmp_path / "new"), "--init-from", str(source)]
    with pytest.raises(UserError) as err:
        train_module.train(parse_train_args(args))
    assert str(err.value) == message.format(src=source)
    assert not (tmp_path / "new").exists()  # refused before anything was written


def test_missing_damaged_and_misshapen_sources_are_refused(source, cache, tmp_path):
    def refused(src) -> str:
        args = [*TINY, "--cache-dir", str(cache), "--out", str(tmp_path / "new"), "--init-from", str(src)]
        with pytest.raises(UserError) as err:
            train_module.train(parse_train_args(args))
        return str(err.value)

    assert refused(tmp_path / "none") == (f"--init-from {tmp_path / 'none'} is neither a run folder with a complete "
                                          "checkpoint nor a checkpoint folder (RUN/checkpoints/step-N)")
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    step = copy / "checkpoints" / "step-00000002"
    ema = torch.load(step / "ema.pt", weights_only=True)
    first = next(iter(ema["model"]))
    ema["model"][first] = torch.zeros(3)  # a network of another shape
    torch.save(ema, step / "ema.pt")
    assert refused(step) == (f"--init-from {step}: its model network has another shape than these flags build "
                             "(another --image-size, or data with other channels or classes?)")
    (step / "ema.pt").write_bytes(b"not a checkpoint")
    assert refused(step) == f"--init-from {step}: checkpoint {step} is damaged or incomplete"
    (copy / "config.json").unlink()
    assert "its run's config.json is missing or damaged" in refused(copy)
    with pytest.raises(UserError, match=r"^--init-from is not supported for ldm yet"):
        parse_train_args(["--model", "ldm", "--init-from", str(source)])
