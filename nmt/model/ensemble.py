"""Several trained models that decode as one: at every search step their next-token probabilities
are averaged (fairseq's ensemble decoding; Sennrich et al. 2016 ensembled checkpoints of one run).

`Ensemble` offers the two methods the search uses, `encode` and `step`, so greedy and beam search
run on it unchanged. The members' decoder states travel stacked along the layer dimension, so
that the search's row selection (`hidden[:, rows]`) moves them all together.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from nmt.model.seq2seq import EncoderOutput, Seq2Seq


@dataclass
class EnsembleEncoderOutput:
    """One EncoderOutput per member."""

    parts: list[EncoderOutput]

    def select(self, sentences: torch.Tensor) -> "EnsembleEncoderOutput":
        return EnsembleEncoderOutput([part.select(sentences) for part in self.parts])

    def with_beam(self, beam: int) -> "EnsembleEncoderOutput":
        return EnsembleEncoderOutput([part.with_beam(beam) for part in self.parts])


class Ensemble(nn.Module):
    def __init__(self, models: list[Seq2Seq]):
        super().__init__()
        sizes = {(m.output.out_features, m.decoder.hidden_size) for m in models}
        if len(sizes) != 1:
            raise ValueError(f"ensemble members need one target vocabulary and decoder size, got {sorted(sizes)}")
        self.members = nn.ModuleList(models)
        self.layers = [m.decoder.num_layers for m in models]

    def encode(self, src_ids: torch.Tensor, src_lens: torch.Tensor,
               for_search: bool = False) -> tuple[EnsembleEncoderOutput, torch.Tensor]:
        """src_ids (B, S), src_lens (B,) -> the members' encoder outputs, their hidden states (sum L, B, H)."""
        encoded = [member.encode(src_ids, src_lens, for_search) for member in self.members]
        return EnsembleEncoderOutput([e for e, _ in encoded]), torch.cat([h for _, h in encoded])

    @contextmanager
    def token_table(self) -> Iterator[None]:
        """Each member's `Seq2Seq.token_table` at once."""
        with ExitStack() as stack:
            for member in self.members:
                stack.enter_context(member.token_table())
            yield

    def step(self, prev_ids: torch.Tensor, hidden: torch.Tensor,
             encoded: EnsembleEncoderOutput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """prev_ids (B,) -> log of the mean probability (B, V), hidden (sum L, B, H), mean attention (B, S)."""
        steps = [member.step(prev_ids, h, e)
                 for member, h, e in zip(self.members, hidden.split(self.layers), encoded.parts)]
        log_probs = torch.logsumexp(torch.stack([s[0] for s in steps]), dim=0) - math.log(len(steps))
        weights = torch.stack([s[2].float() for s in steps]).mean(dim=0)
        return log_probs, torch.cat([s[1] for s in steps]), weights
