"""--grad-checkpointing: the U-Net's gradients are those of the plain network (dropout included),
and the tensors kept for the backward pass shrink (counted with autograd's saved-tensor hooks)."""
from __future__ import annotations

import torch

from genscale.config import TrainConfig
from genscale.families.base import DataInfo
from genscale.families.ddpm import DDPM, Options
from genscale.models.unet import UNet

CONFIG = dict(base_width=16, channel_mults=(1, 2, 2), num_res_blocks=2, attention_resolutions=(8,),
              image_size=16, num_classes=10, dropout=0.3, num_groups=8)


def unet(checkpointing: bool) -> UNet:
    torch.manual_seed(0)
    net = UNet(3, 3, grad_checkpointing=checkpointing, **CONFIG).double()
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)  # zero-init output would hide the other gradients
    return net.train()


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64), torch.tensor([0, 10, 500, 999]),
            torch.tensor([1, 2, 3, 10]))


def loss_and_grads(net: UNet) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x, t, labels = inputs()
    torch.manual_seed(5)  # the dropout masks: the recomputation must replay them
    loss = net(x, t, labels).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in net.named_parameters()}


def saved_bytes(net: UNet) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one forward."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    x, t, labels = inputs()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        net(x, t, labels).sum()
    return total


def test_same_loss_and_gradients_with_dropout():
    plain_loss, plain = loss_and_grads(unet(False))
    ckpt_loss, ckpt = loss_and_grads(unet(True))
    assert ckpt_loss.item() == plain_loss.item()
    for name, grad in plain.items():
        torch.testing.assert_close(ckpt[name], grad, rtol=1e-12, atol=1e-15, msg=name)
    assert max(g.abs().max().item() for g in plain.values()) > 0


def test_kept_activations_shrink():
    plain, ckpt = saved_bytes(unet(False)), saved_bytes(unet(True))
    assert ckpt < 0.25 * plain, (ckpt, plain)  # measured: 0.14 of the plain network's


def test_off_in_eval_and_without_grad():
    net = unet(True).eval()
    x, t, labels = inputs()
    with torch.no_grad():
        out = net(x, t, labels)
    net.grad_checkpointing = False
    with torch.no_grad():
        assert torch.equal(out, net(x, t, labels))
    assert saved_bytes(unet(True).eval()) == saved_bytes(unet(False).eval())


def test_the_ddpm_option_reaches_the_unet():
    on = DDPM(TrainConfig(), Options(base_width=8, grad_checkpointing=True), DataInfo("digits", 1, 8, 10))
    off = DDPM(TrainConfig(), Options(base_width=8), DataInfo("digits", 1, 8, 10))
    assert on.nets["model"].grad_checkpointing and not off.nets["model"].grad_checkpointing
