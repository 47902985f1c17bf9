"""A small character-level attention classifier (multi-head self-attention + MLP blocks)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["CharTransformer"]


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: Tensor, pad: Tensor) -> Tensor:
        a = self.norm1(h)
        h = h + self.attn(a, a, a, key_padding_mask=pad, need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


class CharTransformer(nn.Module):
    """Token + position embeddings, ``depth`` pre-norm attention blocks, masked mean pooling, a linear head.

    Quantizable layers: each block's attention input projection (``in_proj_weight``) and output projection, the MLP
    linears and the head.

    Example:
        >>> CharTransformer(num_classes=3)(torch.tensor([[3, 1, 18, 12, 0, 0]])).shape
        torch.Size([1, 3])
    """

    def __init__(
        self, vocab: int = 27, num_classes: int = 3, dim: int = 64, heads: int = 4, depth: int = 2, max_len: int = 16
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList([_Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        pad = tokens == 0
        pad = pad & ~pad.all(dim=1, keepdim=True)  # an all-padding row would make attention NaN
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.embed(tokens) + self.pos(positions)[None]
        for block in self.blocks:
            h = block(h, pad)
        keep = (~pad).unsqueeze(-1).to(h.dtype)
        pooled = (self.norm(h) * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return self.head(pooled)
