"""How far the embedding tables have moved from their initial values (checkpoints/step0.pt).

At each validation the trainer records, per side: the mean L2 distance of the rows from their step-0
values, the share of rows that moved at all, and the rows that never changed, with how many of those
are pieces absent from the training data (a lookup gives gradient only to the rows it reads, so such
rows stay put unless weight decay moves them). The pad row is left out: it is zero by design.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from nmt.checkpoint import load_checkpoint
from nmt.data.vocab import BOS_ID, EOS_ID, PAD_ID
from nmt.model.seq2seq import Seq2Seq

log = logging.getLogger(__name__)
SIDES = ("src", "tgt")


def embedding_key(side: str) -> str:
    """The state_dict key of a side's embedding table."""
    return f"{side}_embed.embedding.weight"


def drift_stats(weight: torch.Tensor, initial: torch.Tensor, token_counts: torch.Tensor | None = None,
                pad_id: int = PAD_ID) -> dict:
    """weight, initial (V, E); token_counts (V,) -> mean_l2, moved_share, unchanged_rows, unchanged_unseen, rows."""
    rows = torch.ones(weight.size(0), dtype=torch.bool)
    rows[pad_id] = False
    distance = (weight.float() - initial.float()).norm(dim=1)  # (V,)
    unchanged = (weight == initial).all(dim=1) & rows  # (V,) bit-identical to step 0
    unseen = token_counts == 0 if token_counts is not None else torch.zeros_like(rows)
    return {
        "rows": int(rows.sum()),
        "mean_l2": float(distance[rows].mean()),
        "moved_share": 1.0 - float(unchanged.sum()) / max(1, int(rows.sum())),
        "unchanged_rows": int(unchanged.sum()),
        "unchanged_unseen": int((unchanged & unseen).sum()),
    }


def describe(record: dict) -> str:
    """One log line for a drift record."""
    parts = []
    for side in SIDES:
        stats = record[side]
        parts.append(f"{side} {100 * stats['moved_share']:.1f}% of rows moved, mean L2 from step 0 "
                     f"{stats['mean_l2']:.4f}, {stats['unchanged_rows']} unchanged "
                     f"({stats['unchanged_unseen']} absent from the training data)")
    return "embeddings: " + "; ".join(parts)


class EmbeddingDrift:
    """Measures the embedding tables against step0.pt, which it reads at the first measurement."""

    def __init__(self, step0_path: Path, token_counts: dict[str, torch.Tensor], shared: bool = False):
        """shared: one table for both sides (model.tie_src_tgt), so a row is read when either side uses it."""
        self.step0_path = Path(step0_path)
        self.token_counts = {side: counts.cpu().clone() for side, counts in token_counts.items()}
        # the batcher adds </s> to every source and <s>, </s> to every target: those rows are read too
        for side, counts in self.token_counts.items():
            counts[EOS_ID] += 1
            counts[BOS_ID] += side == "tgt"
        if shared:
            both = self.token_counts["src"] + self.token_counts["tgt"]
            self.token_counts = {"src": both, "tgt": both}
        self.initial: dict[str, torch.Tensor] | None = None

    def measure(self, model: Seq2Seq, step: int) -> dict:
        """A metrics.jsonl record: {"kind": "embeddings", "step": N, "src": {...}, "tgt": {...}}; logs a line."""
        if self.initial is None:
            state = load_checkpoint(self.step0_path)["model"]
            self.initial = {side: state[embedding_key(side)] for side in SIDES}
        record = {"kind": "embeddings", "step": step}
        for side in SIDES:
            weight = getattr(model, f"{side}_embed").weight.detach().cpu()
            record[side] = drift_stats(weight, self.initial[side], self.token_counts.get(side))
        log.info("%s", describe(record))
        return record
