"""Bidirectional GRU encoder over packed sequences."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence


class Encoder(nn.Module):
    """embedded (B, S, E), src_lens (B,) -> states (B, S, 2H), final (B, 2H)."""

    def __init__(self, embedding_dim: int, hidden_size: int, num_layers: int, rnn_dropout: float, dropout: float):
        super().__init__()
        self.rnn = nn.GRU(embedding_dim, hidden_size, num_layers=num_layers, batch_first=True,
                          bidirectional=True, dropout=rnn_dropout if num_layers > 1 else 0.0)
        self.dropout = nn.Dropout(dropout)

    def forward(self, embedded: torch.Tensor, src_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Packing makes each direction stop at the sentence's real end, so the backward GRU starts
        # on the last real token rather than on padding.
        packed = pack_padded_sequence(embedded, src_lens.cpu(), batch_first=True, enforce_sorted=False)
        packed_states, hidden = self.rnn(packed)  # hidden (2 * layers, B, H)
        states, _ = pad_packed_sequence(packed_states, batch_first=True, total_length=embedded.size(1))  # (B, S, 2H)
        final = torch.cat([hidden[-2], hidden[-1]], dim=-1)  # (B, 2H): last layer, forward and backward
        return self.dropout(states), final
