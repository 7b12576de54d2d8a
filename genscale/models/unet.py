"""The DDPM U-Net (Ho et al. 2020, with ADM's class embedding), used by the diffusion families."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from genscale.errors import UserError
from genscale.models.layers import (AttentionBlock, Downsample, GroupNormSiLU, ResBlock, TimestepEmbedding,
                                    Upsample, group_count, zero_init)

MIN_BOTTOM_RESOLUTION = 2  # below 2x2 the deepest 3x3 convolutions see only padding


class ImageSizeError(UserError, ValueError):
    """The image size does not suit the U-Net's depth (a ValueError, and a UserError for the CLI)."""


def level_resolutions(image_size: int, channel_mults: Sequence[int]) -> list[int]:
    """The pixel resolution each U-Net level works at: image_size, image_size / 2, ..."""
    return [image_size // 2**i for i in range(len(channel_mults))]


class UNet(nn.Module):
    """Noise-prediction U-Net: forward(x [N,C,H,W], t [N], labels [N] | None) -> [N, out_channels, H, W].

    Level i works at resolution image_size / 2**i with base_width * channel_mults[i] channels and
    ``num_res_blocks`` ResBlocks (self-attention after each where the resolution is listed in
    ``attention_resolutions``); the middle is ResBlock-attention-ResBlock; the up path has
    ``num_res_blocks + 1`` ResBlocks per level, each taking one skip connection, as in DDPM.
    With ``num_classes`` > 0 a class embedding of ``num_classes + 1`` rows (the last is the null
    label of classifier-free guidance) is added to the time embedding.

    ``grad_checkpointing``: in training, every block group (a level's ResBlock and attention, a
    resampling, the middle) keeps only its input for the backward pass and runs again there
    (torch.utils.checkpoint, non-reentrant, dropout masks replayed): activation memory falls to
    the blocks' inputs for ~one more forward pass of compute. Same gradients (tested).
    """

    def __init__(self, in_channels: int, out_channels: int, base_width: int = 64,
                 channel_mults: Sequence[int] = (1, 2, 2), num_res_blocks: int = 2,
                 attention_resolutions: Sequence[int] = (8,), image_size: int = 16, num_classes: int = 0,
                 dropout: float = 0.0, num_groups: int = 32, num_heads: int = 1,
                 grad_checkpointing: bool = False) -> None:
        super().__init__()
        self.grad_checkpointing = grad_checkpointing
        self.check_image_size(image_size, channel_mults)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.image_size, self.num_classes = image_size, num_classes
        self.num_levels = len(channel_mults)
        embed_dim = 4 * base_width

        self.time_embed = TimestepEmbedding(base_width, embed_dim)
        self.class_embed = nn.Embedding(num_classes + 1, embed_dim) if num_classes > 0 else None

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, embed_dim, dropout, num_groups)

        def attn(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, num_heads, num_groups)

        self.conv_in = nn.Conv2d(in_channels, base_width, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [base_width]
        ch, resolution = base_width, image_size
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                blocks = [res(ch, base_width * mult)]
                ch = base_width * mult
                if resolution in attention_resolutions:
                    blocks.append(attn(ch))
                self.down.append(nn.ModuleList(blocks))
                skip_channels.append(ch)
            if level != len(channel_mults) - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skip_channels.append(ch)
                resolution //= 2

        # Resolutions asked for attention that no level has: nothing is built for them. Training
        # refuses them (train.py); loading an old run that had them must still work.
        self.level_resolutions = level_resolutions(image_size, channel_mults)
        self.unused_attention = tuple(r for r in attention_resolutions if r not in self.level_resolutions)

        self.mid = nn.ModuleList([res(ch, ch), attn(ch), res(ch, ch)])

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                blocks = [res(ch + skip_channels.pop(), base_width * mult)]
                ch = base_width * mult
                if resolution in attention_resolutions:
                    blocks.append(attn(ch))
                self.up.append(nn.ModuleList(blocks))
            if level != 0:
                self.up.append(nn.ModuleList([Upsample(ch)]))
                resolution *= 2

        self.norm_out = GroupNormSiLU(ch, group_count(ch, num_groups))
        self.conv_out = zero_init(nn.Conv2d(ch, out_channels, 3, padding=1))

    @staticmethod
    def check_image_size(image_size: int, channel_mults: Sequence[int]) -> None:
        """Raise ImageSizeError (a ValueError) unless the image halves cleanly down to >= 2x2."""
        if len(channel_mults) < 1:
            raise ImageSizeError("The U-Net needs at least one entry in channel_mults.")
        factor = 2 ** (len(channel_mults) - 1)
        if image_size % factor != 0 or image_size // factor < MIN_BOTTOM_RESOLUTION:
            raise ImageSizeError(
                f"Image size {image_size} does not fit a U-Net with {len(channel_mults)} levels: it must be a "
                f"multiple of {factor} (2**{len(channel_mults) - 1}) and at least "
                f"{factor * MIN_BOTTOM_RESOLUTION} so the deepest level is {MIN_BOTTOM_RESOLUTION}x"
                f"{MIN_BOTTOM_RESOLUTION} or larger.")

    def embed(self, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Time embedding plus class embedding; labels None or negative mean the null label."""
        emb = self.time_embed(t)
        if self.class_embed is not None:
            if labels is None:
                labels = torch.full_like(t, self.num_classes, dtype=torch.long)
            labels = torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels)
            emb = emb + self.class_embed(labels)
        elif labels is not None:
            raise ValueError("labels were given to a U-Net built with num_classes=0")
        return emb

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: [N, in_channels, H, W] (channels_last allowed); t: [N] or a 0-d timestep; labels: [N] or None.

        H and W other than image_size work when they halve cleanly (attention stays at the levels
        chosen for image_size).
        """
        factor = 2 ** (self.num_levels - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"input of size {tuple(x.shape[-2:])} does not halve cleanly {self.num_levels - 1} times")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = F.silu(self.embed(t, labels))
        h = self.conv_in(x)
        skips = [h]
        for blocks in self.down:
            h = self._run(blocks, h, emb)
            skips.append(h)
        h = self._run(self.mid, h, emb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(blocks, h, emb)
        return self.conv_out(self.norm_out(h))

    def _run(self, blocks: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._run_blocks, blocks, h, emb, use_reentrant=False)
        return self._run_blocks(blocks, h, emb)

    @staticmethod
    def _run_blocks(blocks: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        return h
