"""Encode the training split for the cache: stream raw pairs in chunks; clean, tokenize and filter each
chunk (in worker processes for a big corpus); hand the chunks back in corpus order.

A chunk is CHUNK_PAIRS pairs, and at most two chunks per worker are in flight, so memory does not
grow with the corpus. The result does not depend on the number of workers. Workers are spawned
(not forked: the trainer may already run threads) and import no torch; each loads the SentencePiece
model(s) once and tokenizes with one thread, so N workers use about N cores.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import sentencepiece as spm

from nmt.config import DataConfig
from nmt.data.corpus import FilterReport, clean_line, length_filter

CHUNK_PAIRS = 10_000
MAX_WORKERS = 8
BYTES_PER_WORKER = 16 << 20  # below this much text per worker, starting processes costs more than it saves


@dataclass
class EncodedChunk:
    """One chunk's kept pairs, ids back to back per side, and what it dropped and why."""

    ids: dict[str, np.ndarray]
    lens: dict[str, np.ndarray]
    read: int  # raw pairs in the chunk
    dropped: Counter = field(default_factory=Counter)

    @property
    def kept(self) -> int:
        return len(self.lens["src"])


class ChunkEncoder:
    """Clean, drop pairs with an empty side, tokenize and length-filter one chunk of raw pairs."""

    def __init__(self, model_files: dict[str, Path], cfg: DataConfig, dtype: np.dtype, num_threads: int = -1):
        src = spm.SentencePieceProcessor(model_file=str(model_files["src"]), num_threads=num_threads)
        same = Path(model_files["src"]) == Path(model_files["tgt"])
        tgt = src if same else spm.SentencePieceProcessor(model_file=str(model_files["tgt"]), num_threads=num_threads)
        self.processors = {"src": src, "tgt": tgt}
        self.cfg, self.dtype = cfg, np.dtype(dtype)

    def __call__(self, pairs: list[tuple[str, str]]) -> EncodedChunk:
        report = FilterReport()
        texts = {"src": [], "tgt": []}
        for src, tgt in pairs:
            src, tgt = clean_line(src), clean_line(tgt)
            if not src or not tgt:
                report.dropped["empty"] += 1
                continue
            texts["src"].append(src)
            texts["tgt"].append(tgt)
        encoded = {side: self.processors[side].encode(texts[side], out_type=int) for side in texts}
        keep = length_filter(encoded["src"], encoded["tgt"], self.cfg, report)
        ids, lens = {}, {}
        for side, rows in encoded.items():
            kept = [rows[i] for i in keep]
            lens[side] = np.fromiter((len(r) for r in kept), dtype=np.int64, count=len(kept))
            ids[side] = np.fromiter(itertools.chain.from_iterable(kept), dtype=self.dtype, count=int(lens[side].sum()))
        return EncodedChunk(ids, lens, len(pairs), report.dropped)


_worker_encoder: ChunkEncoder | None = None


def _start_worker(model_files: dict[str, Path], cfg: DataConfig, dtype: np.dtype) -> None:
    global _worker_encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle: it stops the pool
    _worker_encoder = ChunkEncoder(model_files, cfg, dtype, num_threads=1)


def _encode_in_worker(pairs: list[tuple[str, str]]) -> EncodedChunk:
    return _worker_encoder(pairs)


def chunked(pairs: Iterable[tuple[str, str]], size: int) -> Iterator[list[tuple[str, str]]]:
    iterator = iter(pairs)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def worker_count(configured: int, total_bytes: int) -> int:
    """data.encode_workers, or (0) as many as the text warrants, up to the CPUs this process may use."""
    if configured:
        return configured
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, MAX_WORKERS, total_bytes // BYTES_PER_WORKER))


def encode_chunks(pairs: Iterable[tuple[str, str]], model_files: dict[str, Path], cfg: DataConfig,
                  dtype: np.dtype, workers: int = 1, chunk_pairs: int = CHUNK_PAIRS) -> Iterator[EncodedChunk]:
    """The encoded chunks of `pairs`, in order; with workers > 1, in that many processes."""
    chunks = chunked(pairs, chunk_pairs)
    if workers <= 1:
        encoder = ChunkEncoder(model_files, cfg, dtype)
        for chunk in chunks:
            yield encoder(chunk)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_start_worker, initargs=(model_files, cfg, dtype)) as pool:
        pending: deque = deque()
        for chunk in chunks:  # Pool.imap would read the whole corpus ahead; this keeps 2 chunks per worker
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
