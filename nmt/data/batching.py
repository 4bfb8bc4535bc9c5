"""Token-budget batches built from length buckets, and the Batch that the model consumes.

An encoded corpus is stored flat (all ids in one array plus offsets), the layout of the memory-mapped
cache (nmt.data.cache), so a batch is a handful of slices and the arrays may live on disk. Each
training epoch's batch order is a pure function of (seed, epoch): a resumed run replays the same
order and skips the batches it already saw. A batch is an int32 array of example indices, so an
epoch's plan costs 4 bytes per example rather than a Python object each.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from nmt.data.vocab import BOS_ID, EOS_ID, PAD_ID


@dataclass
class EncodedCorpus:
    """Piece ids of both sides, flat: side i of pair k is flat[offsets[k]:offsets[k + 1]]."""

    src_flat: np.ndarray
    src_offsets: np.ndarray
    tgt_flat: np.ndarray
    tgt_offsets: np.ndarray

    @classmethod
    def from_lists(cls, src_ids: list[list[int]], tgt_ids: list[list[int]]) -> "EncodedCorpus":
        return cls(*flatten_rows(src_ids), *flatten_rows(tgt_ids))

    def __len__(self) -> int:
        return len(self.src_offsets) - 1

    @cached_property
    def src_lens(self) -> np.ndarray:
        """(N,) int32, in memory even when the ids are memory-mapped (bucketing reads every length)."""
        return np.diff(self.src_offsets).astype(np.int32)

    @cached_property
    def tgt_lens(self) -> np.ndarray:
        return np.diff(self.tgt_offsets).astype(np.int32)

    def token_counts(self, side: str, size: int, chunk: int = 1 << 24) -> np.ndarray:
        """How often each id occurs on one side: (size,) int64, read in chunks so a memory map stays on disk."""
        flat = self.src_flat if side == "src" else self.tgt_flat
        counts = np.zeros(size, dtype=np.int64)
        for start in range(0, len(flat), chunk):
            counts += np.bincount(np.asarray(flat[start:start + chunk]), minlength=size)[:size]
        return counts

    def src(self, index: int) -> np.ndarray:
        return self.src_flat[self.src_offsets[index]:self.src_offsets[index + 1]]

    def tgt(self, index: int) -> np.ndarray:
        return self.tgt_flat[self.tgt_offsets[index]:self.tgt_offsets[index + 1]]


def flatten_rows(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of token ids -> flat (total,) int32 and offsets (len(rows) + 1,) int64; row i is
    flat[offsets[i]:offsets[i + 1]]."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((i for r in rows for i in r), dtype=np.int32, count=int(offsets[-1]))
    return flat, offsets


@dataclass
class Batch:
    """src_ids (B, S) ends in eos; tgt_in (B, T) starts with bos; tgt_out (B, T) ends in eos; pad = 0."""

    src_ids: torch.Tensor
    src_lens: torch.Tensor  # (B,) on the CPU, as pack_padded_sequence wants
    tgt_in: torch.Tensor | None = None
    tgt_out: torch.Tensor | None = None
    indices: list[int] | None = None  # positions in the corpus, to restore order after decoding

    @property
    def src_mask(self) -> torch.Tensor:
        return self.src_ids != PAD_ID  # (B, S)

    @property
    def num_tgt_tokens(self) -> int:
        return int((self.tgt_out != PAD_ID).sum()) if self.tgt_out is not None else 0

    def to(self, device: torch.device) -> "Batch":
        """Copy the id tensors to `device`; to a GPU from pinned memory without blocking the host."""
        if device.type == "cuda":
            move = lambda t: None if t is None else t.pin_memory().to(device, non_blocking=True)  # noqa: E731
        else:
            move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.src_ids), self.src_lens, move(self.tgt_in), move(self.tgt_out), self.indices)


def pad_rows(rows: list[np.ndarray], prefix: int | None = None, suffix: int | None = None) -> torch.Tensor:
    """Stack id rows into a (B, L) long tensor, adding an optional first and last id, padding with 0."""
    extra = (prefix is not None) + (suffix is not None)
    width = max(len(r) for r in rows) + extra
    out = np.full((len(rows), width), PAD_ID, dtype=np.int64)
    start = 1 if prefix is not None else 0
    for i, row in enumerate(rows):
        if prefix is not None:
            out[i, 0] = prefix
        out[i, start:start + len(row)] = row
        if suffix is not None:
            out[i, start + len(row)] = suffix
    return torch.from_numpy(out)


def collate(corpus: EncodedCorpus, indices, with_target: bool = True) -> Batch:
    """Example indices (a list or an int array) -> a padded Batch."""
    indices = [int(i) for i in indices]
    src_rows = [corpus.src(i) for i in indices]
    src_ids = pad_rows(src_rows, suffix=EOS_ID)  # (B, S)
    src_lens = torch.tensor([len(r) + 1 for r in src_rows], dtype=torch.long)
    if not with_target:
        return Batch(src_ids, src_lens, indices=indices)
    tgt_rows = [corpus.tgt(i) for i in indices]
    tgt_in = pad_rows(tgt_rows, prefix=BOS_ID)  # (B, T)
    tgt_out = pad_rows(tgt_rows, suffix=EOS_ID)  # (B, T)
    return Batch(src_ids, src_lens, tgt_in, tgt_out, indices)


def token_batches(src_lens: np.ndarray, tgt_lens: np.ndarray, batch_tokens: int, sort_pool: int,
                  rng: np.random.Generator | None) -> list[np.ndarray]:
    """Group example indices into int32 arrays so that B * max(S, T) stays within `batch_tokens` (padding included).

    Examples are shuffled, then sorted by length within pools of about `sort_pool` batches, so each
    batch holds similar lengths (little padding) while the order still varies from epoch to epoch.
    Without an rng the whole set is sorted and the batch order is by length (for decoding).
    """
    cost = np.maximum(src_lens, tgt_lens).astype(np.int64) + 1  # +1 for eos / bos
    order = rng.permutation(len(cost)) if rng is not None else np.arange(len(cost))
    per_batch = max(1, batch_tokens // max(1, int(cost.mean()))) if len(cost) else 1
    pool = len(cost) if rng is None else per_batch * sort_pool
    batches = []
    for start in range(0, len(order), pool):
        chunk = order[start:start + pool]
        chunk = chunk[np.lexsort((src_lens[chunk], tgt_lens[chunk]))]
        batches.extend(_cut(chunk, cost, batch_tokens))
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def _cut(sorted_indices: np.ndarray, cost: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Cut a length-sorted run of examples into batches greedily: a batch grows while its widest
    example times its size fits the budget."""
    ends, size, widest = [], 0, 0
    for position, example_cost in enumerate(cost[sorted_indices].tolist()):
        width = max(widest, example_cost)
        if size and width * (size + 1) > batch_tokens:
            ends.append(position)
            size, width = 0, example_cost
        size += 1
        widest = width
    return [part.astype(np.int32) for part in np.split(sorted_indices, ends)] if len(sorted_indices) else []


def epoch_batches(corpus: EncodedCorpus, batch_tokens: int, sort_pool: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The training batches of one epoch; the same (seed, epoch) always gives the same batches."""
    rng = np.random.default_rng([seed, epoch])
    return token_batches(corpus.src_lens, corpus.tgt_lens, batch_tokens, sort_pool, rng)


def decode_batches(src_lens: np.ndarray, max_sentences: int) -> list[list[int]]:
    """Batches of at most `max_sentences` similar-length sources, longest first, for decoding."""
    order = np.argsort(-src_lens, kind="stable").tolist()
    return [order[i:i + max_sentences] for i in range(0, len(order), max_sentences)]


def padding_share(corpus: EncodedCorpus, batches) -> float:
    """The share of target positions in these batches that are padding."""
    real = padded = 0
    lens = corpus.tgt_lens + 1
    for batch in batches:
        widths = lens[batch]
        real += int(widths.sum())
        padded += int(widths.max()) * len(batch)
    return 1.0 - real / padded if padded else 0.0

