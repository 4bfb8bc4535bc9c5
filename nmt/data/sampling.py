"""Subword regularization: every training epoch sees the training text segmented anew.

With a unigram model SentencePiece samples one segmentation per sentence from its n best (Kudo 2018,
"Subword Regularization", section 3; `nbest_size`, smoothed by `alpha`); with a BPE model `alpha`
is the BPE-dropout rate (Provilkov et al. 2020). Validation, evaluation and translation keep the one
best segmentation.

The pairs are the cache's, in its order. Their text comes back once, by decoding the cached ids:
SentencePiece's decode inverts its encode on normalized text, so no raw file is read again. A pair
whose sampled pieces break the length filter, or whose ids hold an unknown piece (whose text cannot
come back), keeps its best segmentation.

SentencePiece seeds its sampler per thread, so even a seeded draw differs from one process to the
next. The trainer therefore draws each epoch's sample once, on rank 0, and keeps it in the run
directory (`save_segmentation`): every DDP rank, and a run resumed in that epoch, reads the same pieces.
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
from nmt.data.batching import EncodedCorpus
from nmt.data.corpus import FilterReport, length_filter
from nmt.data.vocab import SIDES, UNK_ID, Vocab
from nmt.errors import NMTError

log = logging.getLogger(__name__)

ARRAYS = ("src_flat", "src_offsets", "tgt_flat", "tgt_offsets")  # EncodedCorpus's fields, in order


class SegmentationSampler:
    """The training pairs of `corpus`, segmented by sampling: `epoch(seed, epoch)` -> an EncodedCorpus."""

    def __init__(self, corpus: EncodedCorpus, vocab: Vocab, cfg: DataConfig):
        self.corpus, self.vocab, self.cfg = corpus, vocab, cfg
        self.best = {side: [getattr(corpus, side)(i).tolist() for i in range(len(corpus))] for side in SIDES}
        self.text = {side: vocab.side(side).decode(self.best[side]) for side in SIDES}
        self.fixed = {i for side in SIDES for i, ids in enumerate(self.best[side]) if UNK_ID in ids}

    def epoch(self, seed: int, epoch: int) -> EncodedCorpus:
        started = time.monotonic()
        spm.set_random_generator_seed(int(np.random.default_rng([seed, epoch]).integers(1, 2**31)))
        sampled = {side: self.vocab.side(side).encode(self.text[side], out_type=int, enable_sampling=True,
                                                      alpha=self.cfg.subword_alpha, nbest_size=self.cfg.subword_nbest,
                                                      num_threads=1)  # reproducible within a process
                   for side in SIDES}
        keep = set(length_filter(sampled["src"], sampled["tgt"], self.cfg, FilterReport())) - self.fixed
        for side in SIDES:
            sampled[side] = [ids if i in keep else self.best[side][i] for i, ids in enumerate(sampled[side])]
        corpus = EncodedCorpus.from_lists(sampled["src"], sampled["tgt"])
        pieces = {side: len(getattr(corpus, f"{side}_flat")) / max(1, len(getattr(self.corpus, f"{side}_flat")))
                  for side in SIDES}
        log.info("epoch %d: segmentation sampled (data.subword_alpha=%g, data.subword_nbest=%d) in %.1f s: "
                 "%+.1f%% source and %+.1f%% target pieces against the best segmentation; %d pairs kept the best "
                 "(length filter, unknown piece)",
                 epoch + 1, self.cfg.subword_alpha, self.cfg.subword_nbest, time.monotonic() - started,
                 100 * (pieces["src"] - 1), 100 * (pieces["tgt"] - 1), len(self.corpus) - len(keep))
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
