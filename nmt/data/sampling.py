"""Subword regularization: every training epoch sees the training text segmented anew.

With a unigram model SentencePiece samples one segmentation per sentence from its n best (Kudo 2018,
"Subword Regularization", section 3; `nbest_size`, smoothed by `alpha`); with a BPE model `alpha`
is the BPE-dropout rate (Provilkov et al. 2020). Validation, evaluation and translation keep the one
best segmentation.

The pairs are the cache's, in its order. Their text comes back once, by decoding the cached ids:
SentencePiece's decode inverts its encode on normalized text, so no raw file is read again. A pair
whose sampled pieces break the length filter, or whose ids hold an unknown piece (whose text cannot
come back), keeps its best segmentation.

Even with its seed set, SentencePiece's draws differ from one process to the next. The trainer
therefore draws each epoch's sample once, on rank 0, and keeps it in the run directory
(`save_segmentation`): every DDP rank, and a run resumed in that epoch, reads the same pieces.
Later epochs are drawn anew, so a resumed run matches an uninterrupted one only to the end of the
epoch it resumed in.
"""

from __future__ import annotations

import logging
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import sentencepiece as spm

from nmt.config import DataConfig
from nmt.data.batching import EncodedCorpus, flatten_rows
from nmt.data.corpus import FilterReport, length_filter
from nmt.data.vocab import SIDES, UNK_ID, Vocab
from nmt.errors import NMTError

log = logging.getLogger(__name__)

ARRAYS = ("src_flat", "src_offsets", "tgt_flat", "tgt_offsets")  # EncodedCorpus's fields, in order
CHUNK_PAIRS = 10_000  # pairs segmented at a time: an epoch's pieces never stand as Python lists whole


class SegmentationSampler:
    """The training pairs of `corpus`, segmented by sampling: `epoch(seed, epoch)` -> an EncodedCorpus.

    It holds the training text; an epoch's pieces are drawn CHUNK_PAIRS pairs at a time into flat arrays.
    """

    def __init__(self, corpus: EncodedCorpus, vocab: Vocab, cfg: DataConfig):
        self.corpus, self.vocab, self.cfg = corpus, vocab, cfg
        self.text, self.fixed = {side: [] for side in SIDES}, set()
        for start in range(0, len(corpus), CHUNK_PAIRS):
            for side in SIDES:
                best = self.best_rows(side, start)
                self.text[side] += vocab.side(side).decode(best)
                self.fixed.update(start + i for i, ids in enumerate(best) if UNK_ID in ids)

    def best_rows(self, side: str, start: int) -> list[list[int]]:
        return [getattr(self.corpus, side)(i).tolist() for i in range(start, min(len(self.corpus), start + CHUNK_PAIRS))]

    def epoch(self, seed: int, epoch: int) -> EncodedCorpus:
        started = time.monotonic()
        spm.set_random_generator_seed(int(np.random.default_rng([seed, epoch]).integers(1, 2**31)))
        flat, lens, kept_best = {side: [] for side in SIDES}, {side: [] for side in SIDES}, 0
        for start in range(0, len(self.corpus), CHUNK_PAIRS):
            sampled = {side: self.vocab.side(side).encode(self.text[side][start:start + CHUNK_PAIRS], out_type=int,
                                                          enable_sampling=True, alpha=self.cfg.subword_alpha,
                                                          nbest_size=self.cfg.subword_nbest,
                                                          num_threads=1)  # reproducible within a process
                       for side in SIDES}
            keep = set(length_filter(sampled["src"], sampled["tgt"], self.cfg, FilterReport()))
            keep -= {i - start for i in self.fixed if start <= i < start + CHUNK_PAIRS}
            kept_best += len(sampled["src"]) - len(keep)
            for side in SIDES:
                rows = [ids if i in keep else getattr(self.corpus, side)(start + i).tolist()
                        for i, ids in enumerate(sampled[side])]
                chunk_flat, chunk_offsets = flatten_rows(rows)
                flat[side].append(chunk_flat)
                lens[side].append(np.diff(chunk_offsets))
        arrays = {}  # the training split is never empty (nmt.data.pipeline refuses one)
        for side in SIDES:
            arrays[f"{side}_flat"] = np.concatenate(flat[side])
            arrays[f"{side}_offsets"] = np.concatenate([[0], np.cumsum(np.concatenate(lens[side]))])
        corpus = EncodedCorpus(**arrays)
        growth = {side: len(arrays[f"{side}_flat"]) / max(1, len(getattr(self.corpus, f"{side}_flat"))) - 1
                  for side in SIDES}
        log.info("epoch %d: segmentation sampled (data.subword_alpha=%g, data.subword_nbest=%d) in %.1f s: "
                 "%+.1f%% source and %+.1f%% target pieces against the best segmentation; %d pairs kept the best "
                 "(length filter, unknown piece)", epoch + 1, self.cfg.subword_alpha, self.cfg.subword_nbest,
                 time.monotonic() - started, 100 * growth["src"], 100 * growth["tgt"], kept_best)
        return corpus


def save_segmentation(corpus: EncodedCorpus, path: Path) -> None:
    """Write one epoch's pieces atomically (a temporary file, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            np.savez(handle, **{name: getattr(corpus, name) for name in ARRAYS})
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise NMTError(f"Could not write the sampled segmentation {path} ({error.strerror or error}). Free some "
                       f"disk space (or fix the permissions) and resume with trainer.resume=true.") from None


def load_segmentation(path: Path) -> EncodedCorpus:
    try:
        with np.load(path) as arrays:
            return EncodedCorpus(*(arrays[name] for name in ARRAYS))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        raise NMTError(f"The sampled segmentation {path} cannot be read ({error}). Delete it and resume with "
                       f"trainer.resume=true: the epoch's pieces are then drawn again.") from None
