"""The translation model: embeddings, encoder, decoder and output layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nmt.config import ModelConfig
from nmt.data.vocab import PAD_ID
from nmt.model.decoder import Decoder
from nmt.model.embedding import Embeddings
from nmt.model.encoder import Encoder


@dataclass
class EncoderOutput:
    """What every decoder step needs about the source: states (B, S, 2H), keys (B, S, A), mask (B, S)."""

    states: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor

    def select(self, rows: torch.Tensor) -> "EncoderOutput":
        """Pick (and repeat) batch rows, e.g. to expand each sentence into its beam."""
        return EncoderOutput(self.states.index_select(0, rows), self.keys.index_select(0, rows),
                             self.mask.index_select(0, rows))


class Seq2Seq(nn.Module):
    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int):
        super().__init__()
        E, H = cfg.embedding_dim, cfg.hidden_size
        self.src_embed = Embeddings(src_vocab_size, E, PAD_ID, cfg.embeddings)
        self.tgt_embed = Embeddings(tgt_vocab_size, E, PAD_ID, cfg.embeddings)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        # word dropout: Dropout1d zeroes whole channels of (N, C, L); given (B, L, E), a channel is a token,
        # so a dropped token's vector goes whole and the kept ones are scaled by 1/(1-p)
        self.word_dropout = nn.Dropout1d(cfg.word_dropout)
        self.encoder = Encoder(E, H, cfg.encoder_layers, cfg.rnn_dropout, cfg.dropout)
        O = cfg.output_size or E
        self.decoder = Decoder(E, H, 2 * H, cfg.attention_size or H, cfg.decoder_layers, cfg.dropout, cfg.rnn_dropout, O)
        self.output = nn.Linear(O, tgt_vocab_size)
        if cfg.tie_src_tgt:  # a joint vocabulary: one (V, E) matrix embeds both languages
            if src_vocab_size != tgt_vocab_size:
                raise ValueError(f"tie_src_tgt needs one vocabulary, got sizes {src_vocab_size} and {tgt_vocab_size}")
            self.src_embed.embedding.weight = self.tgt_embed.embedding.weight
        if cfg.tie_embeddings:
            self.output.weight = self.tgt_embed.weight  # one (V, E) matrix reads and writes pieces

    def _dropped(self, embedded: torch.Tensor) -> torch.Tensor:
        return self.embed_dropout(self.word_dropout(embedded))

    def encode(self, src_ids: torch.Tensor, src_lens: torch.Tensor) -> tuple[EncoderOutput, torch.Tensor]:
        """src_ids (B, S), src_lens (B,) -> encoder output, initial decoder hidden (L, B, H)."""
        states, final = self.encoder(self._dropped(self.src_embed(src_ids)), src_lens)  # (B, S, 2H), (B, 2H)
        keys = self.decoder.attention.project_keys(states)  # (B, S, A)
        return EncoderOutput(states, keys, src_ids != PAD_ID), self.decoder.init_hidden(final)

    def forward(self, src_ids: torch.Tensor, src_lens: torch.Tensor, tgt_in: torch.Tensor,
                tgt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: src_ids (B, S), src_lens (B,), tgt_in (B, T) -> logits (B, T, V).

        With tgt_mask (B, T) bool, only the real target positions reach the output layer: logits (N, V)
        for the N True positions in row-major order, so padding costs no vocabulary projection or softmax.
        """
        encoded, hidden = self.encode(src_ids, src_lens)
        embedded = self._dropped(self.tgt_embed(tgt_in))  # (B, T, E)
        pre_output, _ = self.decoder(embedded, hidden, encoded.states, encoded.keys, encoded.mask)  # (B, T, E)
        if tgt_mask is not None:
            pre_output = pre_output[tgt_mask]  # (N, E)
        return self.output(pre_output)  # (B, T, V) or (N, V)

    def step(self, prev_ids: torch.Tensor, hidden: torch.Tensor,
             encoded: EncoderOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One search step: prev_ids (B,) -> log-probs (B, V), hidden (L, B, H), attention (B, S)."""
        embedded = self.embed_dropout(self.tgt_embed(prev_ids))  # (B, E)
        pre_output, hidden, weights = self.decoder.step(embedded, hidden, encoded.states, encoded.keys, encoded.mask)
        return torch.log_softmax(self.output(pre_output).float(), dim=-1), hidden, weights  # (B, V)


def build_model(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> Seq2Seq:
    return Seq2Seq(cfg, src_vocab_size, tgt_vocab_size)
