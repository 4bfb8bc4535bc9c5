"""SentencePiece vocabularies: train on the training split, save in the run directory, encode and decode.

Every model we train reserves the same ids: pad 0, unk 1, bos 2, eos 3, so one set of constants
serves both sides and a joint or separate vocabulary alike.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

from nmt.config import VocabConfig
from nmt.errors import NMTError

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_IDS = {PAD_ID, UNK_ID, BOS_ID, EOS_ID}
SIDES = ("src", "tgt")


def model_files(run_dir: Path, joint: bool) -> dict[str, Path]:
    """Where each side's SentencePiece model lives in a run directory."""
    if joint:
        path = Path(run_dir) / "spm.joint.model"
        return {"src": path, "tgt": path}
    return {side: Path(run_dir) / f"spm.{side}.model" for side in SIDES}


def train_sentencepiece(sentences: list[str], prefix: Path, cfg: VocabConfig, seed: int) -> Path:
    """Train one SentencePiece model on `sentences`; writes prefix.model and prefix.vocab.

    SentencePiece writes under a temporary name that is then renamed, so a run killed while it trains
    never leaves a torn model behind for the next start to reuse.
    """
    sentences = [s for s in sentences if s]
    if not sentences:
        raise NMTError(f"No training text left to build the vocabulary {prefix}.model; check the training data.")
    if len(sentences) > cfg.max_sentences:  # sample here, seeded, rather than inside SentencePiece
        sentences = random.Random(seed).sample(sentences, cfg.max_sentences)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = prefix.with_name(f".{prefix.name}.tmp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=str(tmp_prefix),
        model_type=cfg.type,
        vocab_size=cfg.size,
        character_coverage=cfg.character_coverage,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        hard_vocab_limit=False,  # a small corpus gets a smaller vocabulary instead of an error
        max_sentence_length=1 << 16,
        num_threads=1,  # one thread keeps the result reproducible
        minloglevel=2,
    )
    # .vocab first: a model file present means both are complete
    for suffix in (".vocab", ".model"):
        os.replace(f"{tmp_prefix}{suffix}", f"{prefix}{suffix}")
    return Path(f"{prefix}.model")


def train_vocab(out_dir: Path, src_text: list[str], tgt_text: list[str], cfg: VocabConfig, seed: int) -> None:
    """Train the model file(s) that `model_files(out_dir, cfg.joint)` names."""
    files = model_files(out_dir, cfg.joint)
    if cfg.joint:
        train_sentencepiece(src_text + tgt_text, files["src"].with_suffix(""), cfg, seed)
    else:
        train_sentencepiece(src_text, files["src"].with_suffix(""), cfg, seed)
        train_sentencepiece(tgt_text, files["tgt"].with_suffix(""), cfg, seed)


class SentenceSample:
    """At most `capacity` sentences of a stream of unknown length: every one, in order, while they
    fit; beyond that a uniform sample (reservoir sampling, seeded). This bounds the memory that
    vocabulary training needs, whatever the corpus size."""

    def __init__(self, capacity: int, seed: int):
        self.capacity, self.seen, self.sentences = capacity, 0, []
        self.rng = random.Random(seed)

    def add(self, sentence: str) -> None:
        self.seen += 1
        if len(self.sentences) < self.capacity:
            self.sentences.append(sentence)
            return
        slot = self.rng.randrange(self.seen)
        if slot < self.capacity:
            self.sentences[slot] = sentence


def _load_processor(path: Path) -> spm.SentencePieceProcessor:
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (RuntimeError, OSError) as error:
        raise NMTError(f"{path} is not a SentencePiece model that can be read ({str(error).strip()}): it is "
                       f"truncated or damaged. The run's checkpoints need this exact model; restore it from a "
                       f"copy, or train the run again.") from None


@dataclass
class Vocab:
    """One SentencePiece processor per side (the same object twice when the vocabulary is joint)."""

    src: spm.SentencePieceProcessor
    tgt: spm.SentencePieceProcessor

    @classmethod
    def load(cls, run_dir: Path, joint: bool) -> "Vocab":
        files = model_files(run_dir, joint)
        for path in set(files.values()):
            if not path.exists():
                raise NMTError(f"{path} is missing: the run directory {run_dir} has no SentencePiece model.")
        src = _load_processor(files["src"])
        tgt = src if joint else _load_processor(files["tgt"])
        return cls(src, tgt)

    @classmethod
    def build(cls, run_dir: Path, src_text: list[str], tgt_text: list[str], cfg: VocabConfig, seed: int) -> "Vocab":
        """Train the model(s) on the training split, or reuse those already in the run directory."""
        files = model_files(run_dir, cfg.joint)
        if all(path.exists() for path in files.values()):
            log.info("reusing SentencePiece model(s) in %s", run_dir)
            return cls.load(run_dir, cfg.joint)
        train_vocab(run_dir, src_text, tgt_text, cfg, seed)
        vocab = cls.load(run_dir, cfg.joint)
        log.info("SentencePiece %s: src %d pieces, tgt %d pieces (%s)", cfg.type, vocab.size("src"),
                 vocab.size("tgt"), "joint" if cfg.joint else "separate")
        return vocab

    @property
    def joint(self) -> bool:
        return self.src is self.tgt

    def side(self, side: str) -> spm.SentencePieceProcessor:
        return self.src if side == "src" else self.tgt

    def size(self, side: str) -> int:
        return self.side(side).get_piece_size()

    def encode(self, texts: list[str], side: str) -> list[list[int]]:
        """Text -> piece ids, without bos/eos (the batcher adds those)."""
        return self.side(side).encode(texts, out_type=int)

    def pieces(self, text: str, side: str) -> list[str]:
        return self.side(side).encode(text, out_type=str)

    def id_to_piece(self, ids: list[int], side: str) -> list[str]:
        return [self.side(side).id_to_piece(i) for i in ids]

    def decode(self, ids: list[int], side: str = "tgt") -> str:
        """Piece ids -> detokenized text; stops at eos and skips pad/bos."""
        clean = []
        for i in ids:
            if i == EOS_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                clean.append(i)
        return self.side(side).decode(clean)
