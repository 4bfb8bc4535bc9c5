"""GRU decoder with Bahdanau attention and a deep output layer.

At step i the attention reads the previous state s_{i-1}, giving the context c_i; the GRU reads
[embedding(y_{i-1}); c_i] and moves to s_i; the output layer reads [s_i; c_i; embedding(y_{i-1})].
`forward` (teacher forcing) and `step` go through the same `_advance`, so unrolling `step` reproduces
`forward`; the one-layer `forward` runs the fused recurrence, which tests hold to it. The search uses
`search_step`, the same function in an order that costs less when several beams share a source.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nmt.model.activation import tanh
from nmt.model.attention import BahdanauAttention
from nmt.model.dropout import Dropout
from nmt.model.recurrence import AttentionGRUUnroll, apply_unrolled
from nmt.precision import with_padded_rows


def gru_update(input_gates: torch.Tensor, hidden_gates: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The GRU cell's gate arithmetic (torch's r, z, n order): gates (B, 3H), hidden (B, H) -> (B, H)."""
    i_r, i_z, i_n = input_gates.chunk(3, dim=-1)
    h_r, h_z, h_n = hidden_gates.chunk(3, dim=-1)
    reset = torch.sigmoid(i_r + h_r)
    update = torch.sigmoid(i_z + h_z)
    candidate = tanh(i_n + reset * h_n)
    return candidate + update * (hidden - candidate)  # (1 - z) * n + z * h


class Decoder(nn.Module):
    def __init__(self, embedding_dim: int, hidden_size: int, encoder_size: int, attention_size: int,
                 num_layers: int, dropout: float, rnn_dropout: float, output_size: int | None = None):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.hidden_size = hidden_size
        self.encoder_size = encoder_size
        self.num_layers = num_layers
        self.bridge = nn.Linear(encoder_size, num_layers * hidden_size)
        self.attention = BahdanauAttention(hidden_size, encoder_size, attention_size)
        # Layer 0's input is [embedding; context]. Its weight is split so the embedding half can be
        # applied to all target positions at once, outside the step loop.
        self.cell = nn.GRUCell(embedding_dim + encoder_size, hidden_size)
        self.upper_cells = nn.ModuleList(nn.GRUCell(hidden_size, hidden_size) for _ in range(num_layers - 1))
        self.rnn_dropout = Dropout(rnn_dropout)
        self.pre_output = nn.Linear(hidden_size + encoder_size + embedding_dim, output_size or embedding_dim)
        self.dropout = Dropout(dropout)

    def init_hidden(self, encoder_final: torch.Tensor) -> torch.Tensor:
        """encoder_final (B, 2H) -> hidden (L, B, H)."""
        bridged = tanh(self.bridge(encoder_final))  # (B, L * H)
        return bridged.view(-1, self.num_layers, self.hidden_size).transpose(0, 1).contiguous()  # (L, B, H)

    def _embedding_gates(self, embedded: torch.Tensor) -> torch.Tensor:
        """embedded (..., E) -> layer 0's input gates from the embedding half, bias included (..., 3H)."""
        weight, bias = self.cell.weight_ih[:, :self.embedding_dim], self.cell.bias_ih
        return with_padded_rows(lambda rows: F.linear(rows, weight, bias), embedded)

    def _advance(self, embedding_gates: torch.Tensor, hidden: torch.Tensor, states: torch.Tensor,
                 keys: torch.Tensor, src_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step: gates (B, 3H), hidden (L, B, H) -> top state (B, H), context (B, 2H), weights (B, S), hidden."""
        context, weights = self.attention(hidden[-1], keys, states, src_mask)  # (B, 2H), (B, S)
        input_gates = embedding_gates + F.linear(context, self.cell.weight_ih[:, self.embedding_dim:])  # (B, 3H)
        hidden_gates = F.linear(hidden[0], self.cell.weight_hh, self.cell.bias_hh)  # (B, 3H)
        top, new_hidden = self._upper_layers(gru_update(input_gates, hidden_gates, hidden[0]), hidden)
        return top, context, weights, new_hidden

    def _upper_layers(self, layer_out: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer 0's new state (B, H) through the layers above it -> top state (B, H), new hidden (L, B, H)."""
        new_hidden = [layer_out]
        for layer, cell in enumerate(self.upper_cells, start=1):
            layer_out = cell(self.rnn_dropout(layer_out), hidden[layer])  # (B, H)
            new_hidden.append(layer_out)
        return layer_out, torch.stack(new_hidden)

    def _output(self, top: torch.Tensor, context: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """[s_i; c_i; embedding] (..., H + 2H + E) -> pre-output (..., O), O = output_size (default E)."""
        joined = torch.cat([top, context, embedded], dim=-1)
        return self.dropout(tanh(with_padded_rows(self.pre_output, joined)))

    def forward(self, embedded: torch.Tensor, hidden: torch.Tensor, states: torch.Tensor, keys: torch.Tensor,
                src_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced unroll: embedded (B, T, E) -> pre-output (B, T, E), attention (B, T, S)."""
        embedding_gates = self._embedding_gates(embedded)  # (B, T, 3H)
        if self.num_layers == 1:
            tops, contexts, attention = self._unroll(embedding_gates, hidden[0], states, keys, src_mask)
        else:
            steps = []
            for t in range(embedded.size(1)):
                top, context, weights, hidden = self._advance(embedding_gates[:, t], hidden, states, keys, src_mask)
                steps.append((top, context, weights))
            tops, contexts, attention = (torch.stack(parts, 1) for parts in zip(*steps))
        # The output layer does not feed back into the recurrence, so it runs once over all steps.
        pre_output = self._output(tops, contexts, embedded)  # (B, T, E)
        return pre_output, attention  # (B, T, S)

    def _unroll(self, embedding_gates: torch.Tensor, hidden: torch.Tensor, states: torch.Tensor, keys: torch.Tensor,
                src_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The one-layer recurrence as one autograd Function (nmt/model/recurrence.py): the same numbers as
        unrolling `_advance`, with every weight gradient computed once per batch instead of once per step."""
        attention = self.attention
        weights = (torch.cat([self.cell.weight_hh, attention.query_proj.weight]), self.cell.bias_hh,
                   self.cell.weight_ih[:, self.embedding_dim:], attention.v.weight.view(-1))
        return apply_unrolled(AttentionGRUUnroll, embedding_gates, hidden, states, keys, src_mask, *weights)

    def step(self, embedded: torch.Tensor, hidden: torch.Tensor, states: torch.Tensor, keys: torch.Tensor,
             src_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token: embedded (B, E), hidden (L, B, H) -> pre-output (B, E), hidden (L, B, H), weights (B, S)."""
        top, context, weights, hidden = self._advance(self._embedding_gates(embedded), hidden, states, keys, src_mask)
        return self._output(top, context, embedded), hidden, weights

    def project_states(self, states: torch.Tensor) -> torch.Tensor:
        """states (B, S, 2H) -> (B, S, 3H + O): each source state through the two weights that read the context,
        layer 0's input gates and the deep output's context part. Once per sentence, for `search_step`."""
        H = self.hidden_size
        context_weights = (self.cell.weight_ih[:, self.embedding_dim:], self.pre_output.weight[:, H:H + self.encoder_size])
        return F.linear(states, torch.cat(context_weights))

    def project_tokens(self, embedded: torch.Tensor) -> torch.Tensor:
        """embedded (..., E) -> (..., 3H + O): what a step computes from the previous token alone, layer 0's input
        gates from the embedding and the deep output's embedding part, biases included. For `search_step`;
        outside training the search looks these up per piece (`Seq2Seq.token_terms`)."""
        H, E = self.hidden_size, self.embedding_dim
        weight = torch.cat([self.cell.weight_ih[:, :E], self.pre_output.weight[:, H + self.encoder_size:]])
        return F.linear(embedded, weight, torch.cat([self.cell.bias_ih, self.pre_output.bias]))

    def search_step(self, token_terms: torch.Tensor, hidden: torch.Tensor, keys: torch.Tensor,
                    projected: torch.Tensor, src_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`step` for K rows per sentence (a beam): the previous tokens' `project_tokens` (B * K, 3H + O), hidden
        (L, B * K, H), and per sentence keys (B, S, A), projected states (B, S, 3H + O), src_mask (B, S) ->
        pre-output (B * K, O), hidden, weights (B * K, S).

        The same function as `step`, computed in another order: the context is a weighted sum of source
        states, so its product with a weight equals the weighted sum of the states' products, which
        `project_states` made once per sentence. A step then costs a (K, S) x (S, 3H + O) product per
        sentence instead of (K, 2H) x (2H, 3H + O): about a third of the search's arithmetic at beam 5
        and sentences of Multi30k's length. The context itself is never formed.
        """
        batch, rows = keys.size(0), token_terms.size(0)
        weights = self.attention.beam_weights(hidden[-1].view(batch, rows // batch, -1), keys, src_mask)  # (B, K, S)
        mixed = torch.bmm(weights, projected).view(rows, -1) + token_terms  # (B * K, 3H + O)
        input_gates, output_part = mixed.split([3 * self.hidden_size, mixed.size(-1) - 3 * self.hidden_size], -1)
        hidden_gates = F.linear(hidden[0], self.cell.weight_hh, self.cell.bias_hh)  # (B * K, 3H)
        top, new_hidden = self._upper_layers(gru_update(input_gates, hidden_gates, hidden[0]), hidden)
        pre_output = F.linear(top, self.pre_output.weight[:, :self.hidden_size]) + output_part  # (B * K, O)
        return self.dropout(tanh(pre_output)), new_hidden, weights.view(rows, -1)
