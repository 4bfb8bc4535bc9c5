"""Bidirectional GRU encoder over packed sequences: nn.GRU, or on a CPU the same GRU as one Function per layer."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from nmt.model.birecurrence import BiGRUUnroll, reverse_within_lengths
from nmt.model.dropout import Dropout, uniform_dropout
from nmt.model.recurrence import apply_unrolled
from nmt.precision import pad_rows, round_up, row_quantum


class Encoder(nn.Module):
    """embedded (B, S, E), src_lens (B,) -> states (B, S, 2H) (zero at padding), final (B, 2H).

    Both paths compute the same function with the same parameters (nn.GRU's). On a GPU nn.GRU runs
    cuDNN over the packed batch. On a CPU `_fused` runs each layer as one Function
    (nmt/model/birecurrence.py) on the same packing: for the reference model its forward and backward
    took a fifth to a quarter less time than torch's CPU GRU (docs/speed.md).
    """

    def __init__(self, embedding_dim: int, hidden_size: int, num_layers: int, rnn_dropout: float, dropout: float):
        super().__init__()
        self.rnn = nn.GRU(embedding_dim, hidden_size, num_layers=num_layers, batch_first=True,
                          bidirectional=True, dropout=rnn_dropout if num_layers > 1 else 0.0)
        self.dropout = Dropout(dropout)

    def forward(self, embedded: torch.Tensor, src_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        run = self._fused if embedded.device.type == "cpu" else self._packed
        states, final = run(embedded, src_lens)
        return self.dropout(states), final

    def _packed(self, embedded: torch.Tensor, src_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Packing makes each direction stop at the sentence's real end, so the backward GRU starts
        # on the last real token rather than on padding.
        packed = pack_padded_sequence(embedded, src_lens.cpu(), batch_first=True, enforce_sorted=False)
        packed_states, hidden = self.rnn(packed)  # hidden (2 * layers, B, H)
        states, _ = pad_packed_sequence(packed_states, batch_first=True, total_length=embedded.size(1))  # (B, S, 2H)
        return states, torch.cat([hidden[-2], hidden[-1]], dim=-1)  # (B, 2H): last layer, forward and backward

    def _fused(self, embedded: torch.Tensor, src_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, S, _ = embedded.shape
        lengths = src_lens.cpu()  # this path runs on a CPU; pack_padded_sequence wants the lengths there too
        reverse = reverse_within_lengths(lengths, S)  # (B, S)
        flip = lambda x: x.gather(1, reverse.unsqueeze(-1).expand_as(x))  # noqa: E731  (B, S, D), its own inverse
        layer_input = embedded
        for layer in range(self.rnn.num_layers):
            if layer > 0:
                layer_input = uniform_dropout(layer_input, self.rnn.dropout, self.training)
            weights = [(getattr(self.rnn, f"{name}_l{layer}"), getattr(self.rnn, f"{name}_l{layer}_reverse"))
                       for name in ("weight_ih", "bias_ih", "weight_hh", "bias_hh")]
            w_ih, b_ih, w_hh, b_hh = (torch.stack(pair) for pair in weights)  # (2, 3H, In), (2, 3H), ...
            # One packing for both directions: the second reads each sentence reversed within its length
            packed = pack_padded_sequence(torch.stack([layer_input, flip(layer_input)], 2), lengths,
                                          batch_first=True, enforce_sorted=False)  # data (N, 2, In)
            N = packed.data.size(0)  # under bf16, zero rows after them: a product shape seen before
            data = pad_rows(packed.data, round_up(N, row_quantum(packed.data, tokens=True)))
            input_gates = torch.baddbmm(b_ih.unsqueeze(1), data.transpose(0, 1), w_ih.transpose(1, 2))
            states = apply_unrolled(BiGRUUnroll, input_gates, packed.batch_sizes.tolist(), w_hh, b_hh)[:, :N]  # (2, N, H)
            padded, _ = pad_packed_sequence(packed._replace(data=states.transpose(0, 1)), batch_first=True,
                                            total_length=S)  # (B, S, 2, H)
            layer_input = torch.cat([padded[:, :, 0], flip(padded[:, :, 1])], -1)  # (B, S, 2H)
        # both directions end at step L - 1: the forward one on the last real token, the backward one on the first
        last = (lengths - 1).view(B, 1, 1, 1).expand(B, 1, *padded.shape[2:])
        return layer_input, padded.gather(1, last).view(B, -1)  # (B, S, 2H), (B, 2H)
