"""An encoder-only transformer over image patches with a learned mask token (BERT / MAE style).

The image is cut into non-overlapping ``patch_size`` squares; each patch is a token made by a
linear map of its pixels. Masked tokens are replaced by one learned mask token *before* anything
else sees them, so a masked patch's pixels cannot reach the output. A 2D position embedding
(a learned row vector plus a learned column vector) is added to every token; with classes, a
label token (the last row is the null label) is prepended. Pre-norm transformer layers, then a
linear head predicts every patch's pixels.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, (H/p)(W/p), C p p], tokens in row-major order."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, p: int, channels: int, h: int, w: int) -> torch.Tensor:
    """The inverse of ``patchify``."""
    n = tokens.shape[0]
    x = tokens.reshape(n, h // p, w // p, channels, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(n, channels, h, w)


def patch_mask(pixel_mask: torch.Tensor, p: int) -> torch.Tensor:
    """Pixel masks [N, 1, H, W] (1 = known) -> token masks [N, L] (True = masked): a patch is
    masked as soon as one of its pixels is a hole."""
    return patchify((pixel_mask < 0.5).float(), p).amax(-1) > 0


class MaskedTransformer(nn.Module):
    """forward(x [N, C, H, W], masked [N, L] bool, labels [N] | None) -> predicted patches [N, L, C p p]."""

    def __init__(self, channels: int, image_size: int, patch_size: int = 1, dim: int = 128, depth: int = 4,
                 heads: int = 4, mlp_ratio: int = 4, num_classes: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        if dim % heads:
            raise ValueError(f"the width {dim} does not divide into {heads} heads")
        self.channels, self.image_size, self.patch_size = channels, image_size, patch_size
        self.side = image_size // patch_size
        self.num_tokens = self.side ** 2
        self.num_classes = num_classes
        patch_dim = channels * patch_size ** 2
        self.embed = nn.Linear(patch_dim, dim)
        self.mask_token = nn.Parameter(torch.randn(dim) * 0.02)
        # Unit-variance positions, as strong as the pixel embeddings: with BERT's 0.02 the
        # tokens of pixel-sized patches barely know where they are and training stalls.
        self.row_embed = nn.Parameter(torch.randn(self.side, dim) / math.sqrt(2))
        self.col_embed = nn.Parameter(torch.randn(self.side, dim) / math.sqrt(2))
        self.label_embed = nn.Embedding(num_classes + 1, dim) if num_classes > 0 else None
        layer = nn.TransformerEncoderLayer(dim, heads, dim * mlp_ratio, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch_dim)

    def position_embedding(self) -> torch.Tensor:
        """[L, dim]: row i, column j gets row_embed[i] + col_embed[j]."""
        return (self.row_embed[:, None] + self.col_embed[None, :]).reshape(self.num_tokens, -1)

    def forward(self, x: torch.Tensor, masked: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        tokens = self.embed(patchify(x, self.patch_size))
        tokens = torch.where(masked[..., None], self.mask_token.to(tokens.dtype), tokens)
        tokens = tokens + self.position_embedding().to(tokens.dtype)
        if self.label_embed is not None:
            if labels is None:
                labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            labels = torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels)
            tokens = torch.cat([self.label_embed(labels)[:, None].to(tokens.dtype), tokens], 1)
        out = self.head(self.norm(self.blocks(tokens)))
        return out[:, -self.num_tokens:]
