"""The on-disk cache: the training split encoded once into flat binary arrays that every later run
memory-maps, and the SentencePiece models trained on it.

An entry is a folder in the cache directory. `train-<key>/` holds src.ids.bin and tgt.ids.bin (all
piece ids of one side back to back: uint16 when the vocabulary fits, else int32),
src.offsets.bin and tgt.offsets.bin (int64, N + 1: pair k is ids[offsets[k]:offsets[k + 1]]) and
meta.json (counts, types, the filter report, and what the key was made of). `vocab-<key>/` holds
the SentencePiece model file(s). An entry is built in a temporary folder beside it and renamed into
place, so one that exists is complete; two runs that build the same entry at once both succeed.

The key hashes what decides the content: the training files' absolute paths, sizes and
modification times, the settings that select and filter pairs, and (for the encoded corpus) the
bytes of the SentencePiece model(s). Editing a corpus file, or changing a filter or the vocabulary,
makes a new entry; old entries are never used again and may be deleted at any time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from nmt.data.batching import EncodedCorpus
from nmt.errors import NMTError

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the layout changes: old entries then simply stop matching
SIDES = ("src", "tgt")


def default_cache_dir() -> Path:
    """$NMT_CACHE_DIR, else $XDG_CACHE_HOME/nmt, else ~/.cache/nmt."""
    if os.environ.get("NMT_CACHE_DIR"):
        return Path(os.environ["NMT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nmt"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def cache_root(configured: str | None, run_dir: Path) -> Path:
    """Where cache entries live: paths.cache_dir, else default_cache_dir(); RUN/cache when that is not writable.

    Never the data directory, which is often shared or read-only.
    """
    folder = Path(configured).expanduser() if configured else default_cache_dir()
    if _writable(folder):
        return folder
    fallback = Path(run_dir) / "cache"
    if configured:
        raise NMTError(f"paths.cache_dir={configured} is not a writable directory; choose another, or leave "
                       f"it unset to use {default_cache_dir()}.")
    log.warning("the cache directory %s is not writable; caching in %s for this run only (set paths.cache_dir "
                "or NMT_CACHE_DIR to share a cache between runs)", folder, fallback)
    return fallback


def file_identity(paths: list[Path]) -> list[dict]:
    """What identifies input files cheaply: absolute path, size and modification time (ns)."""
    out = []
    for path in paths:
        stat = Path(path).stat()
        out.append({"path": str(Path(path).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return out


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (used for the small SentencePiece models)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def entry_key(parts: dict) -> str:
    text = json.dumps({"format": FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


def is_complete(entry: Path) -> bool:
    return (entry / "meta.json").is_file()


def read_meta(entry: Path) -> dict:
    with open(entry / "meta.json", encoding="utf-8") as handle:
        return json.load(handle)


def write_meta(folder: Path, meta: dict) -> None:
    """meta.json is written last: an entry with it is complete."""
    with open(folder / "meta.json", "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


@contextmanager
def building(entry: Path) -> Iterator[Path]:
    """A temporary folder to fill; renamed to `entry` when the block ends without an error, removed otherwise."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        yield tmp
        if entry.exists() and not is_complete(entry):
            shutil.rmtree(entry, ignore_errors=True)  # left by a crash of an older version or by hand
        try:
            os.rename(tmp, entry)
        except OSError:
            if not is_complete(entry):
                raise
            # another process built the same entry first; its content is the same as ours
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def entry_size(entry: Path) -> int:
    return sum(f.stat().st_size for f in entry.iterdir() if f.is_file())


# --- the encoded corpus -----------------------------------------------------------------------------------

def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.int32)


class CorpusWriter:
    """Appends encoded pairs, chunk by chunk, to the four binary files of an entry being built."""

    def __init__(self, folder: Path, dtype: np.dtype):
        self.folder, self.dtype = folder, np.dtype(dtype)
        self.pairs = 0
        self.tokens = {side: 0 for side in SIDES}
        self.ids = {side: open(folder / f"{side}.ids.bin", "wb") for side in SIDES}
        self.offsets = {side: open(folder / f"{side}.offsets.bin", "wb") for side in SIDES}
        for side in SIDES:
            self.offsets[side].write(np.zeros(1, dtype=np.int64).tobytes())

    def append(self, side_ids: dict[str, np.ndarray], side_lens: dict[str, np.ndarray]) -> None:
        """side_ids[side]: the chunk's ids back to back; side_lens[side]: (n,) lengths."""
        for side in SIDES:
            lens = np.asarray(side_lens[side], dtype=np.int64)
            self.ids[side].write(np.asarray(side_ids[side], dtype=self.dtype).tobytes())
            self.offsets[side].write((self.tokens[side] + np.cumsum(lens)).astype(np.int64).tobytes())
            self.tokens[side] += int(lens.sum())
        self.pairs += len(side_lens["src"])

    def close(self) -> None:
        for handle in (*self.ids.values(), *self.offsets.values()):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()

    def meta(self) -> dict:
        return {"format": FORMAT, "pairs": self.pairs, "dtype": self.dtype.name,
                "tokens": dict(self.tokens)}


def _map(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    expected = count * np.dtype(dtype).itemsize
    if not path.is_file() or path.stat().st_size != expected:
        raise CacheDamaged(f"{path} should hold {expected} bytes")
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


class CacheDamaged(Exception):
    """An entry's files do not match its meta.json (a disk fault, or a file edited by hand)."""


def open_corpus(entry: Path) -> tuple[EncodedCorpus, dict]:
    """Memory-map an entry: nothing is read until a batch needs it (the lengths, 8 bytes a pair, excepted)."""
    meta = read_meta(entry)
    if meta.get("format") != FORMAT:
        raise CacheDamaged(f"{entry} has format {meta.get('format')}, not {FORMAT}")
    pairs, dtype = meta["pairs"], np.dtype(meta["dtype"])
    arrays = {}
    for side in SIDES:
        arrays[f"{side}_flat"] = _map(entry / f"{side}.ids.bin", dtype, meta["tokens"][side])
        arrays[f"{side}_offsets"] = _map(entry / f"{side}.offsets.bin", np.dtype(np.int64), pairs + 1)
    return EncodedCorpus(**arrays), meta
