"""From a data config to what the trainer needs: raw splits -> SentencePiece -> filtered, encoded training data.

The training split is streamed, never held as text: one pass samples sentences for SentencePiece
(when no model is cached), one pass encodes it into the memory-mapped cache (when no entry matches).
A run that finds both in the cache reads no training text at all. Dev is small and read whole.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from nmt.config import DataConfig
from nmt.console import ONCE, kept_records
from nmt.data import cache
from nmt.data.batching import EncodedCorpus
from nmt.data.corpus import FilterReport, ParallelText, TrainingSource, clean_line, load_splits, training_source
from nmt.data.encode import encode_chunks, worker_count
from nmt.data.vocab import SentenceSample, Vocab, model_files, train_vocab
from nmt.errors import NMTError

log = logging.getLogger(__name__)


@dataclass
class TrainingData:
    vocab: Vocab
    train: EncodedCorpus  # memory-mapped from the cache
    val: ParallelText  # raw dev text: decoded for BLEU and encoded for the dev loss
    val_encoded: EncodedCorpus

    def token_counts(self, side: str) -> torch.Tensor:
        """How often each piece occurs in the training data: (V,) long."""
        return torch.from_numpy(self.train.token_counts(side, self.vocab.size(side)))


def _limit(text: ParallelText, limit: int) -> ParallelText:
    return ParallelText(text.src[:limit], text.tgt[:limit], text.name) if limit else text


def prepare_training_data(cfg: DataConfig, data_dir: Path, run_dir: Path, seed: int,
                          cache_dir: Path | None = None, progress: bool = True,
                          reuse_run_vocab: bool = True) -> TrainingData:
    """Build (or reuse) the vocabulary on train, encode and filter train into the cache (or reuse it), read val.
    reuse_run_vocab=False: SentencePiece models already in run_dir are left-overs of a start that failed, made
    perhaps for other data or settings, and are replaced."""
    cache_dir = Path(cache_dir) if cache_dir is not None else cache.cache_root(None, run_dir)
    source = training_source(cfg, data_dir)
    val_text = _limit(load_splits(cfg, data_dir, ("val",))["val"], cfg.val_limit)
    check_test_data(cfg, data_dir)  # before minutes of SentencePiece and encoding
    vocab = cached_vocab(source, cfg, Path(run_dir), seed, cache_dir, progress, reuse_run_vocab)
    train = cached_corpus(source, vocab, cfg, Path(run_dir), cache_dir, progress)
    if not len(val_text):
        raise NMTError(f"The validation data {val_text.name} is empty; validation needs at least one pair.")
    # dev is never filtered; only its loss skips pairs with an empty side
    val_encoded = EncodedCorpus.from_lists(vocab.encode(val_text.src, "src"), vocab.encode(val_text.tgt, "tgt"))
    log.info("data: %d training pairs, %d validation pairs", len(train), len(val_text))
    return TrainingData(vocab, train, val_text, val_encoded)


def check_test_data(cfg: DataConfig, data_dir: Path) -> None:
    """Read the user's test files now, so that a mistake in them (a missing file, bad UTF-8, a TSV line
    without its tab, two files that are not line-aligned) stops the start of training, not nmt-evaluate
    after it. Named data sets are checked when they are downloaded."""
    if cfg.dataset != "files" or not cfg.test.given:
        return
    test = load_splits(cfg, data_dir, ("test",))["test"]
    if not len(test):
        raise NMTError(f"The test data {test.name} is empty, so nmt-evaluate would have nothing to score. Give "
                       f"data.test a file with at least one pair, or leave it out (data.test.src=null "
                       f"data.test.tgt=null data.test.tsv=null) and score files later with eval.src and eval.ref.")
    log.info("test data: %d pairs (nmt-evaluate scores them)", len(test))


# --- the vocabulary ------------------------------------------------------------------------------------

def _bar(total: int, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="pair", unit_scale=True, leave=False, dynamic_ncols=True,
                disable=not progress)


def sample_sentences(source: TrainingSource, cfg: DataConfig, seed: int, progress: bool) -> tuple[list[str], list[str]]:
    """Cleaned sentences of each side for SentencePiece, pairs with an empty side left out: all of them
    up to data.vocab.max_sentences a side, a seeded sample beyond."""
    samples = [SentenceSample(cfg.vocab.max_sentences, seed), SentenceSample(cfg.vocab.max_sentences, seed + 1)]
    with _bar(source.approximate_size(), "read for vocabulary", progress) as bar:
        for src, tgt in source.pairs():
            src, tgt = clean_line(src), clean_line(tgt)
            if src and tgt:
                samples[0].add(src)
                samples[1].add(tgt)
            bar.update()
    if not samples[0].seen:
        raise NMTError(f"The training data {source.name} has no pairs with text on both sides.")
    return samples[0].sentences, samples[1].sentences


def cached_vocab(source: TrainingSource, cfg: DataConfig, run_dir: Path, seed: int, cache_dir: Path,
                 progress: bool = True, reuse_run_vocab: bool = True) -> Vocab:
    """The run's SentencePiece model(s): those already in the run directory (a resume), else a copy of
    the cached ones, else trained on the training split, cached and copied."""
    files = model_files(run_dir, cfg.vocab.joint)
    if reuse_run_vocab and all(path.exists() for path in files.values()):
        log.info("reusing SentencePiece model(s) in %s", run_dir)
        return Vocab.load(run_dir, cfg.vocab.joint)
    key = cache.entry_key({"kind": "vocab", "source": source.settings, "files": cache.file_identity(source.files),
                           "limit": source.limit, "vocab": asdict(cfg.vocab), "seed": seed})
    entry = cache_dir / f"vocab-{key}"
    if cache.is_complete(entry):
        log.info("reusing SentencePiece model(s) from cache %s", entry)
    else:
        src_text, tgt_text = sample_sentences(source, cfg, seed, progress)
        with cache.building(entry) as folder:
            train_vocab(folder, src_text, tgt_text, cfg.vocab, seed)
            cache.write_meta(folder, {"format": cache.FORMAT, "source": source.name, "sentences": [len(src_text), len(tgt_text)]})
        del src_text, tgt_text
    run_dir.mkdir(parents=True, exist_ok=True)
    for cached in sorted(set(model_files(entry, cfg.vocab.joint).values())):
        for suffix in (".model", ".vocab"):
            _copy_atomically(cached.with_suffix(suffix), run_dir / cached.with_suffix(suffix).name)
    vocab = Vocab.load(run_dir, cfg.vocab.joint)
    log.info("SentencePiece %s: src %d pieces, tgt %d pieces (%s)", cfg.vocab.type, vocab.size("src"),
             vocab.size("tgt"), "joint" if cfg.vocab.joint else "separate")
    return vocab


def _copy_atomically(src: Path, dst: Path) -> None:
    if not src.exists():
        return
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


# --- the encoded training split ------------------------------------------------------------------------

def cached_corpus(source: TrainingSource, vocab: Vocab, cfg: DataConfig, run_dir: Path, cache_dir: Path,
                  progress: bool = True) -> EncodedCorpus:
    """The training split, encoded and filtered, memory-mapped from the cache (encoded first if no entry matches)."""
    files = model_files(run_dir, vocab.joint)
    key = cache.entry_key({"kind": "train", "source": source.settings, "files": cache.file_identity(source.files),
                           "limit": source.limit, "spm": sorted({cache.file_digest(p) for p in files.values()}),
                           "filter": {"min_len": cfg.min_len, "max_len": cfg.max_len, "max_len_ratio": cfg.max_len_ratio}})
    entry = cache_dir / f"train-{key}"
    if cache.is_complete(entry):
        try:
            corpus, meta = cache.open_corpus(entry)
        except (cache.CacheDamaged, OSError, ValueError, KeyError) as error:
            log.warning("the cache entry %s is damaged (%s); encoding again", entry, error)
            shutil.rmtree(entry, ignore_errors=True)
        else:
            log.info("reusing cache %s (%d pairs, %.1f MB)", entry, meta["pairs"], cache.entry_size(entry) / 1e6)
            for warning in meta.get("warnings", []):  # what reading the text said: this run reads none of it
                log.warning(warning, extra=ONCE)
            _report(meta).log(f"training data ({source.name})")
            return corpus
    encode_into(entry, source, files, vocab, cfg, progress)
    return cache.open_corpus(entry)[0]


def encode_into(entry: Path, source: TrainingSource, files: dict[str, Path], vocab: Vocab, cfg: DataConfig,
                progress: bool) -> None:
    """Stream, encode and filter the training split into a new cache entry; logs what it dropped."""
    workers = worker_count(cfg.encode_workers, source.total_bytes())
    dtype = cache.ids_dtype(max(vocab.size("src"), vocab.size("tgt")))
    started = time.monotonic()
    read, dropped = 0, Counter()
    with cache.building(entry) as folder, _bar(source.approximate_size(), "encode", progress) as bar:
        writer = cache.CorpusWriter(folder, dtype)
        try:
            with kept_records() as said:  # warnings about the text's lines, said again when the entry is reused
                for chunk in encode_chunks(source.pairs(), files, cfg, dtype, workers):
                    writer.append(chunk.ids, chunk.lens)
                    read, dropped = read + chunk.read, dropped + chunk.dropped
                    bar.update(chunk.read)
        finally:
            writer.close()
        report = FilterReport(writer.pairs, dropped)
        _check_kept(report, read, source, cfg)
        cache.write_meta(folder, {**writer.meta(), "read": read, "report": {"kept": report.kept, "dropped": dict(dropped)},
                                  "source": source.name, "encode_seconds": round(time.monotonic() - started, 2),
                                  "workers": workers,
                                  "warnings": [r.getMessage() for r in said if r.levelno >= logging.WARNING]})
    log.info("encoded %d training pairs in %.1f s (%d process%s) into the cache %s (%.1f MB)", writer.pairs,
             time.monotonic() - started, workers, "" if workers == 1 else "es", entry, cache.entry_size(entry) / 1e6)
    report.log(f"training data ({source.name})")


def _check_kept(report: FilterReport, read: int, source: TrainingSource, cfg: DataConfig) -> None:
    if report.kept:
        return
    if read == report.dropped["empty"]:
        raise NMTError(f"The training data {source.name} has no pairs with text on both sides.")
    raise NMTError(
        f"No training pairs are left after filtering {source.name} (data.min_len={cfg.min_len}, "
        f"data.max_len={cfg.max_len}, data.max_len_ratio={cfg.max_len_ratio}). Loosen those limits."
    )


def _report(meta: dict) -> FilterReport:
    return FilterReport(meta["report"]["kept"], Counter(meta["report"]["dropped"]))
