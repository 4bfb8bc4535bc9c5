"""From a data config to what the trainer needs: raw splits -> SentencePiece -> filtered, encoded training data."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from nmt.config import DataConfig
from nmt.data.batching import EncodedCorpus
from nmt.data.corpus import FilterReport, ParallelText, drop_empty, length_filter, load_splits
from nmt.data.vocab import Vocab
from nmt.errors import NMTError

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    vocab: Vocab
    train: EncodedCorpus
    val: ParallelText  # raw dev text: decoded for BLEU and encoded for the dev loss
    val_encoded: EncodedCorpus

    def token_counts(self, side: str) -> torch.Tensor:
        """How often each piece occurs in the training data: (V,) long."""
        flat = self.train.src_flat if side == "src" else self.train.tgt_flat
        return torch.bincount(torch.from_numpy(flat.astype("int64")), minlength=self.vocab.size(side))


def _limit(text: ParallelText, limit: int) -> ParallelText:
    return ParallelText(text.src[:limit], text.tgt[:limit], text.name) if limit else text


def prepare_training_data(cfg: DataConfig, data_dir: Path, run_dir: Path, seed: int) -> TrainingData:
    """Read train and val, build (or reuse) the vocabulary on train, encode and filter train."""
    splits = load_splits(cfg, data_dir, ("train", "val"))
    train_text, val_text = _limit(splits["train"], cfg.train_limit), _limit(splits["val"], cfg.val_limit)
    report = FilterReport()
    train_text = drop_empty(train_text, report)
    if not len(train_text):
        raise NMTError(f"The training data {splits['train'].name} has no pairs with text on both sides.")
    vocab = Vocab.build(run_dir, train_text.src, train_text.tgt, cfg.vocab, seed)
    src_ids, tgt_ids = vocab.encode(train_text.src, "src"), vocab.encode(train_text.tgt, "tgt")
    keep = length_filter(src_ids, tgt_ids, cfg, report)
    report.log(f"training data ({train_text.name})")
    if not keep:
        raise NMTError(
            f"No training pairs are left after filtering {train_text.name} (data.min_len={cfg.min_len}, "
            f"data.max_len={cfg.max_len}, data.max_len_ratio={cfg.max_len_ratio}). Loosen those limits."
        )
    train = EncodedCorpus.from_lists([src_ids[i] for i in keep], [tgt_ids[i] for i in keep])
    if not len(val_text):
        raise NMTError(f"The validation data {splits['val'].name} is empty; validation needs at least one pair.")
    # dev is never filtered; only its loss skips pairs with an empty side
    val_encoded = EncodedCorpus.from_lists(vocab.encode(val_text.src, "src"), vocab.encode(val_text.tgt, "tgt"))
    log.info("data: %d training pairs, %d validation pairs", len(train), len(val_text))
    return TrainingData(vocab, train, val_text, val_encoded)
