"""The ddpm family's training loss through the fused noise kernels equals the unfused formula."""
from __future__ import annotations

import torch

import kernels
from genscale.config import TrainConfig
from genscale.families.base import DataInfo
from genscale.families.ddpm import DDPM, Options


def test_fused_eps_loss_matches_unfused_formula_and_gradient():
    torch.manual_seed(3)
    family = DDPM(TrainConfig(), Options(base_width=16), DataInfo("digits", 1, 8, 10))
    net = family.nets["model"]
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)  # zero-init output would hide the model term
    x0, labels = torch.rand(6, 1, 8, 8) * 2 - 1, torch.randint(0, 10, (6,))

    torch.manual_seed(11)
    fused = family._fused_eps_loss(x0, labels)
    fused.backward()
    grad_fused = net.conv_in.weight.grad.clone()
    net.zero_grad()

    torch.manual_seed(11)  # the same draws: t, then the Philox seed
    t = torch.randint(0, 1000, (6,))
    seed = int(torch.randint(0, 2**62, ()).item())
    eps = kernels.philox_normal(x0, seed, 0)
    x_t = family.schedule.q_sample(x0, t, eps)
    reference = (net(x_t, t, labels) - eps).square().mean()
    reference.backward()

    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net.conv_in.weight.grad, grad_fused, rtol=1e-4, atol=1e-6)
    assert abs(eps.mean().item()) < 0.3 and 0.7 < eps.std().item() < 1.3


def test_ddpm_sampler_respaces_to_the_requested_steps():
    """--sampler ddpm with --sampling-steps was silently all T steps; now the respaced process."""
    from genscale.diffusion.samplers import strided_timesteps
    from genscale.families.ddpm import reverse_process
    from tests.test_applications_support import tiny_ddpm

    fam = tiny_ddpm(timesteps=20)
    seen, model_fn = [], fam._model_fn
    fam._model_fn = lambda x, t, labels: seen.append(int(t[0])) or model_fn(x, t, labels)
    reverse_process(fam, (2, 1, 8, 8), sampler="ddpm", sampling_steps=4, generator=torch.Generator().manual_seed(0))
    assert seen == strided_timesteps(20, 4)
    seen.clear()
    reverse_process(fam, (2, 1, 8, 8), sampler="ddpm", generator=torch.Generator().manual_seed(0))
    assert seen == list(range(19, -1, -1))  # not asked: every timestep


def test_guidance_without_a_trained_unconditional_model_is_refused():
    """--cond-drop 0 with the default --cfg-scale 2 trained silently and sampled with the null
    label's untrained embedding; now refused at the start (and at sampling time)."""
    import pytest

    from genscale.errors import UserError
    from genscale.families.ddpm import reverse_process

    digits = DataInfo("digits", 1, 8, 10)
    with pytest.raises(UserError, match="--cond-drop 0 never trains"):
        DDPM(TrainConfig(), Options(base_width=16, cond_drop=0.0), digits)
    DDPM(TrainConfig(), Options(base_width=16, cond_drop=0.0), DataInfo("plain", 1, 8, 0))  # no labels, no guidance
    fam = DDPM(TrainConfig(), Options(base_width=16, cond_drop=0.0, cfg_scale=1.0, timesteps=4), digits)
    labels = torch.tensor([1, 2])
    out = reverse_process(fam, (2, 1, 8, 8), labels, sampling_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 8, 8)
    with pytest.raises(UserError, match="--cfg-scale 3 needs an unconditional model"):
        reverse_process(fam, (2, 1, 8, 8), labels, cfg_scale=3.0, sampling_steps=2)
