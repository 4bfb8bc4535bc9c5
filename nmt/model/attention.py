"""Bahdanau additive attention (Bahdanau, Cho and Bengio 2015, "Neural Machine Translation by Jointly
Learning to Align and Translate", section 3.1 and appendix A.1.2).

e_ij = v^T tanh(W s_{i-1} + U h_j): the query is the decoder's *previous* state s_{i-1}; the keys
U h_j do not depend on i, so they are projected once per sentence and passed to every step.
"""

from __future__ import annotations

import torch
from torch import nn

from nmt.model.activation import tanh
from nmt.precision import with_padded_rows


class BahdanauAttention(nn.Module):
    """Stateless: query (B, H), projected keys (B, S, A), values (B, S, 2H), mask (B, S) ->
    context (B, 2H), weights (B, S)."""

    def __init__(self, query_size: int, key_size: int, attention_size: int):
        super().__init__()
        self.query_proj = nn.Linear(query_size, attention_size, bias=False)  # W
        self.key_proj = nn.Linear(key_size, attention_size, bias=True)  # U (its bias stands for W's)
        self.v = nn.Linear(attention_size, 1, bias=False)

    def project_keys(self, states: torch.Tensor) -> torch.Tensor:
        """states (B, S, 2H) -> keys (B, S, A), once per sentence."""
        return with_padded_rows(self.key_proj, states)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = self.weights(query, keys, mask)  # (B, S)
        context = torch.bmm(weights.unsqueeze(1), values).squeeze(1)  # (B, 2H)
        return context, weights

    def weights(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """query (B, H), keys (B, S, A), mask (B, S) -> weights (B, S)."""
        scores = self.v(tanh(self.query_proj(query).unsqueeze(1) + keys)).squeeze(-1)  # (B, S)
        return _masked_softmax(scores, mask)

    def beam_weights(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`weights` for K queries per sentence, as in beam search: query (B, K, H) -> weights (B, K, S),
        reading each sentence's keys once.

        The same function through the sigmoid, which took a third of tanh's time on our AVX2 CPU (where
        tanh over (B, K, S, A) was a sixth of a search step; docs/speed.md): v . tanh(y) = 2 v . sigmoid(2y)
        - sum(v), and the softmax does not see the constant - sum(v). The one-layer training recurrence
        (nmt/model/recurrence.py) computes its scores the same way.
        """
        doubled = torch.add(2 * self.query_proj(query).unsqueeze(2), keys.unsqueeze(1), alpha=2)  # (B, K, S, A)
        scores = 2 * self.v(torch.sigmoid_(doubled)).squeeze(-1)  # (B, K, S); in place: no second (B, K, S, A)
        return _masked_softmax(scores, mask.unsqueeze(1))


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """-inf before the softmax gives padded positions exactly zero weight."""
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
