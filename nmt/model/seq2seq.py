"""The translation model: embeddings, encoder, decoder and output layer."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from nmt.config import ModelConfig
from nmt.data.vocab import PAD_ID
from nmt.loss import linear_cross_entropy_sum
from nmt.model.decoder import Decoder
from nmt.model.dropout import Dropout
from nmt.model.embedding import Embeddings
from nmt.model.encoder import Encoder

TOKEN_TABLE_LIMIT = 64 * 2**20  # entries (V x (3H + O)) of the search's token table: 256 MB in fp32


@dataclass
class EncoderOutput:
    """What every decoder step needs about the source: states (B, S, 2H), keys (B, S, A), mask (B, S).

    For search, `projected` (B, S, 3H + O) holds the states as the decoder's context weights see them
    (`Decoder.project_states`), and each sentence may feed several decoder rows, its beam: the rows
    of sentence b are b * beam ... b * beam + beam - 1, and the sentence's tensors are not repeated.
    """

    states: torch.Tensor
    keys: torch.Tensor
    mask: torch.Tensor
    projected: torch.Tensor | None = None
    beam: int = 1

    def select(self, sentences: torch.Tensor) -> "EncoderOutput":
        """Keep the listed sentences (M,), in that order; each keeps its beam."""
        pick = lambda t: None if t is None else t.index_select(0, sentences)  # noqa: E731
        return EncoderOutput(pick(self.states), pick(self.keys), pick(self.mask), pick(self.projected), self.beam)

    def with_beam(self, beam: int) -> "EncoderOutput":
        return replace(self, beam=beam)


class Seq2Seq(nn.Module):
    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int):
        super().__init__()
        E, H = cfg.embedding_dim, cfg.hidden_size
        self.src_embed = Embeddings(src_vocab_size, E, PAD_ID, cfg.embeddings)
        self.tgt_embed = Embeddings(tgt_vocab_size, E, PAD_ID, cfg.embeddings)
        self.embed_dropout = Dropout(cfg.dropout)
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
        self._token_table: torch.Tensor | None = None  # (V, 3H + O) while `token_table` is open

    def _dropped(self, embedded: torch.Tensor) -> torch.Tensor:
        return self.embed_dropout(self.word_dropout(embedded))

    def encode(self, src_ids: torch.Tensor, src_lens: torch.Tensor,
               for_search: bool = False) -> tuple[EncoderOutput, torch.Tensor]:
        """src_ids (B, S), src_lens (B,) -> encoder output, initial decoder hidden (L, B, H).

        for_search: also the projected states that `step` uses to decode with less arithmetic."""
        states, final = self.encoder(self._dropped(self.src_embed(src_ids)), src_lens)  # (B, S, 2H), (B, 2H)
        keys = self.decoder.attention.project_keys(states)  # (B, S, A)
        projected = self.decoder.project_states(states) if for_search else None  # (B, S, 3H + O)
        return EncoderOutput(states, keys, src_ids != PAD_ID, projected), self.decoder.init_hidden(final)

    def forward(self, src_ids: torch.Tensor, src_lens: torch.Tensor, tgt_in: torch.Tensor,
                tgt_mask: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                label_smoothing: float = 0.0) -> torch.Tensor:
        """Teacher forcing: src_ids (B, S), src_lens (B,), tgt_in (B, T) -> logits (B, T, V).

        With tgt_mask (B, T) bool, only the real target positions reach the output layer: logits (N, V)
        for the N True positions in row-major order, so padding costs no vocabulary projection or softmax.
        With targets (N,) as well, the pieces expected at those positions, it returns their summed
        label-smoothed cross-entropy instead, without making the logits (`linear_cross_entropy_sum`).
        """
        encoded, hidden = self.encode(src_ids, src_lens)
        embedded = self._dropped(self.tgt_embed(tgt_in))  # (B, T, E)
        pre_output, _ = self.decoder(embedded, hidden, encoded.states, encoded.keys, encoded.mask)  # (B, T, E)
        if tgt_mask is not None:
            pre_output = pre_output[tgt_mask]  # (N, E)
        if targets is not None:
            return linear_cross_entropy_sum(pre_output, self.output.weight, self.output.bias, targets, label_smoothing)
        return self.output(pre_output)  # (B, T, V) or (N, V)

    def token_terms(self, prev_ids: torch.Tensor) -> torch.Tensor:
        """prev_ids (R,) -> the decoder's `project_tokens` of their embeddings (R, 3H + O); from the table of
        `token_table` while one is open."""
        if self._token_table is not None and not self.training:
            return self._token_table.index_select(0, prev_ids)
        return self.decoder.project_tokens(self.embed_dropout(self.tgt_embed(prev_ids)))

    @contextmanager
    def token_table(self) -> Iterator[None]:
        """Within this block the search looks each previous token's terms up in a table of the whole vocabulary
        instead of multiplying R embeddings by a (3H + O, E) weight at every step: about a sixth of a beam
        step's arithmetic for the recipe's model. Outside training those terms depend on the piece alone.
        Making the table is one product of V rows (a beam-5 step of 128 sentences multiplies 640), so
        `translate_sentences` opens one per call; the weights must not change inside it. Vocabularies over
        TOKEN_TABLE_LIMIT entries and max_norm embeddings (whose lookup renormalises rows) get no table.
        """
        weight = self.tgt_embed.weight
        width = 3 * self.decoder.hidden_size + self.output.in_features
        if self.training or self.tgt_embed.embedding.max_norm is not None or weight.size(0) * width > TOKEN_TABLE_LIMIT:
            yield
            return
        with torch.no_grad():
            self._token_table = self.decoder.project_tokens(self.tgt_embed(torch.arange(weight.size(0),
                                                                                        device=weight.device)))
        try:
            yield
        finally:
            self._token_table = None

    def step(self, prev_ids: torch.Tensor, hidden: torch.Tensor,
             encoded: EncoderOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One search step: prev_ids (R,) -> log-probs (R, V), hidden (L, R, H), attention (R, S), with
        R = B * encoded.beam decoder rows."""
        if encoded.projected is not None:
            pre_output, hidden, weights = self.decoder.search_step(self.token_terms(prev_ids), hidden, encoded.keys,
                                                                   encoded.projected, encoded.mask)
        elif encoded.beam == 1:  # the plain step, which teacher forcing unrolls
            embedded = self.embed_dropout(self.tgt_embed(prev_ids))  # (R, E)
            pre_output, hidden, weights = self.decoder.step(embedded, hidden, encoded.states, encoded.keys,
                                                            encoded.mask)
        else:
            raise ValueError("a beam of decoder rows per sentence needs encode(..., for_search=True)")
        return torch.log_softmax(self.output(pre_output).float(), dim=-1), hidden, weights  # (R, V)


def build_model(cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int) -> Seq2Seq:
    return Seq2Seq(cfg, src_vocab_size, tgt_vocab_size)
