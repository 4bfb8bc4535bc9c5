"""nn.Embedding with a selectable init, padding_idx, optional max_norm, sqrt(E) scaling and sparse gradients.

An embedding is a lookup table: `embed(ids)` equals `one_hot(ids) @ weight`, so only the rows of
pieces that occur in a batch receive gradient. The pad row is zero and never updated. With
`sparse=true` the gradient is a sparse tensor holding just those rows (see nmt.optim for the update).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nmt.config import EmbeddingConfig


def init_embedding_(weight: torch.Tensor, scheme: str, scale: float, pad_id: int | None) -> None:
    """Fill an embedding matrix (V, E) in place by the named scheme; the pad row becomes zero."""
    with torch.no_grad():
        if scheme == "normal":
            nn.init.normal_(weight, std=scale)
        elif scheme == "uniform":
            nn.init.uniform_(weight, -scale, scale)
        elif scheme == "xavier_uniform":
            nn.init.xavier_uniform_(weight)
        elif scheme == "xavier_normal":
            nn.init.xavier_normal_(weight)
        elif scheme == "kaiming_uniform":
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        elif scheme == "kaiming_normal":
            nn.init.kaiming_normal_(weight)
        else:
            raise ValueError(f"unknown embedding init {scheme!r}")
        if pad_id is not None:
            weight[pad_id].zero_()


class Embeddings(nn.Module):
    """ids (B, L) long -> vectors (B, L, E)."""

    def __init__(self, vocab_size: int, embedding_dim: int, pad_id: int, cfg: EmbeddingConfig):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=pad_id, max_norm=cfg.max_norm,
                                      sparse=cfg.sparse)
        self.multiplier = math.sqrt(embedding_dim) if cfg.scale else 1.0
        init_embedding_(self.embedding.weight, cfg.init, cfg.init_scale, pad_id)

    @property
    def weight(self) -> nn.Parameter:
        return self.embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vectors = self.embedding(ids)  # (B, L, E)
        return vectors * self.multiplier if self.multiplier != 1.0 else vectors
