"""Read parallel text (two files or a TSV), clean it, and report what was dropped.

Lines are split on b"\\n" alone, so U+2028, U+2029, U+0085 or a stray CR inside a line never shift
the two sides against each other; CRLF endings, a BOM and NUL bytes are normalised per line.
The training split can also be streamed (`training_source`), so a corpus larger than memory is
never held as Python strings; dev and test are small and read whole.
"""

from __future__ import annotations

import functools
import logging
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice, zip_longest
from pathlib import Path
from typing import Callable, Iterator

from nmt.config import DataConfig
from nmt.console import ONCE
from nmt.data.sources import SplitPaths, multi30k_paths, tatoeba_path
from nmt.errors import NMTError

log = logging.getLogger(__name__)

# Control characters (C0, DEL, C1) and Unicode line/paragraph separators become spaces.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
_SPACES = re.compile(r"\s+")


@dataclass
class ParallelText:
    src: list[str]
    tgt: list[str]
    name: str = ""

    def __len__(self) -> int:
        return len(self.src)


@dataclass
class ReadReport:
    replaced_lines: int = 0
    skipped_lines: int = 0


def clean_line(text: str) -> str:
    """Normalise one decoded line: drop a BOM, turn control characters into spaces, squeeze spaces."""
    text = text.replace("\ufeff", "").replace("\x00", "")
    text = _CONTROL.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def decoded_lines(path: Path, on_decode_error: str = "error", report: ReadReport | None = None):
    """Yield (line number, text) for a UTF-8 file; invalid UTF-8 is an error naming file and line."""
    path = Path(path)
    _check_file(path)
    report = report if report is not None else ReadReport()
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            raw = raw.rstrip(b"\n").rstrip(b"\r")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                if on_decode_error != "replace":
                    # UTF-16 starts with a byte-order mark, and its ASCII characters come with a NUL byte each
                    utf16 = raw.startswith((b"\xff\xfe", b"\xfe\xff")) or raw.count(b"\x00") * 4 > len(raw)
                    convert = ("The file looks like UTF-16: convert it (iconv -f utf-16 -t utf-8)" if utf16 else
                               "Convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)")
                    raise NMTError(
                        f"{path}, line {number}: invalid UTF-8 (byte {error.start + 1} of the line). {convert}, or "
                        f"set data.on_decode_error=replace to replace bad bytes with U+FFFD."
                    ) from None
                text = raw.decode("utf-8", errors="replace")
                report.replaced_lines += 1
            yield number, text
    if report.replaced_lines:
        log.warning("%s: replaced invalid UTF-8 on %d line(s)", path, report.replaced_lines, extra=ONCE)


def read_lines(path: Path, on_decode_error: str = "error") -> list[str]:
    """Read a UTF-8 text file into cleaned lines."""
    return [clean_line(text) for _, text in decoded_lines(path, on_decode_error)]


def iter_parallel(src_path: Path, tgt_path: Path, on_decode_error: str = "error") -> Iterator[tuple[str, str]]:
    """Stream (source, target) lines of two line-aligned files, not yet cleaned; when one file ends
    first, the error names both files and both line counts."""
    src_lines, tgt_lines = decoded_lines(src_path, on_decode_error), decoded_lines(tgt_path, on_decode_error)
    count = 0
    for src, tgt in zip_longest(src_lines, tgt_lines):
        if src is None or tgt is None:
            src_count = count + (src is not None) + sum(1 for _ in src_lines)
            tgt_count = count + (tgt is not None) + sum(1 for _ in tgt_lines)
            raise NMTError(
                f"The parallel files are not line-aligned: {src_path} has {src_count} lines but {tgt_path} has "
                f"{tgt_count}. Each line of one must translate the same line of the other; fix the files so "
                f"their line counts match."
            )
        count += 1
        yield src[1], tgt[1]


def read_parallel(src_path: Path, tgt_path: Path, on_decode_error: str = "error") -> ParallelText:
    """Read two line-aligned files; different line counts are an error naming both files."""
    text = ParallelText([], [], name=str(src_path))
    for src, tgt in iter_parallel(src_path, tgt_path, on_decode_error):
        text.src.append(clean_line(src))
        text.tgt.append(clean_line(tgt))
    return text


class BadTsvLines(NMTError):
    """TSV lines without exactly one tab; the message's remedy can be another command's (`describe`)."""

    def __init__(self, path: Path, count: int, where: str):
        self.path, self.count, self.where = path, count, where
        super().__init__(self.describe("set data.on_bad_line=skip to drop them (counted in the log)"))

    def describe(self, remedy: str) -> str:
        return (f"{self.path}: {self.count} line(s) do not have exactly one tab ({_lines(self.count)} {self.where}). "
                f"Each line must be source<TAB>target. Fix those lines, or {remedy}.")


def _lines(count: int) -> str:
    return "line" if count == 1 else "lines"


def iter_tsv(path: Path, src_column: int = 0, on_decode_error: str = "error",
             on_bad_line: str = "error") -> Iterator[tuple[str, str]]:
    """Stream (source, target) fields of source<TAB>target lines, not yet cleaned; lines without exactly
    one tab are an error at the end (naming them), or skipped with a count."""
    bad = []
    for number, text in decoded_lines(Path(path), on_decode_error):
        fields = text.split("\t")
        if len(fields) != 2:
            bad.append(number)
            continue
        yield fields[src_column], fields[1 - src_column]
    if bad:
        where = ", ".join(str(n) for n in bad[:5]) + (" ..." if len(bad) > 5 else "")
        if on_bad_line != "skip":
            raise BadTsvLines(path, len(bad), where)
        log.warning("%s: skipped %d line(s) without exactly one tab (%s %s)", path, len(bad), _lines(len(bad)), where,
                    extra=ONCE)


def read_tsv(path: Path, src_column: int = 0, on_decode_error: str = "error", on_bad_line: str = "error") -> ParallelText:
    """Read source<TAB>target lines; a line without exactly one tab is an error (or a counted skip)."""
    text = ParallelText([], [], name=str(path))
    for src, tgt in iter_tsv(path, src_column, on_decode_error, on_bad_line):
        text.src.append(clean_line(src))
        text.tgt.append(clean_line(tgt))
    return text


def _check_file(path: Path) -> None:
    if not path.exists():
        raise NMTError(f"{path} does not exist. Check the path (relative paths start from {Path.cwd()}).")
    if path.is_dir():
        raise NMTError(f"{path} is a directory; a text file was expected.")


def read_split(paths: SplitPaths, cfg: DataConfig) -> ParallelText:
    if paths.tsv is not None:
        return read_tsv(paths.tsv, paths.tsv_src_column, cfg.on_decode_error, cfg.on_bad_line)
    return read_parallel(paths.src, paths.tgt, cfg.on_decode_error)


def count_lines(path: Path) -> int:
    """Lines in a file (a last line without a newline counts), reading bytes in blocks."""
    count, last = 0, b"\n"
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            count += block.count(b"\n")
            last = block[-1:]
    return count + (last != b"\n")


# --- named data sets -------------------------------------------------------------------------------

TUTORIAL_PREFIXES = ("i am ", "i m ", "he is", "he s ", "she is", "she s ", "you are", "you re ",
                     "we are", "we re ", "they are", "they re ")
TUTORIAL_MAX_WORDS = 10


def _tutorial_normal_form(text: str) -> str:
    """Lowercase, letters only, as the PyTorch tutorial normalises before its prefix test."""
    return _SPACES.sub(" ", re.sub(r"[^a-zà-ÿ.!?]+", " ", text.lower())).strip()


def tutorial_filter(english: list[str], french: list[str]) -> list[int]:
    """Indices of pairs the PyTorch tutorial keeps: both sides under 10 words, English with a set prefix."""
    keep = []
    for index, (en, fr) in enumerate(zip(english, french)):
        if len(en.split(" ")) < TUTORIAL_MAX_WORDS and len(fr.split(" ")) < TUTORIAL_MAX_WORDS:
            if _tutorial_normal_form(en).startswith(TUTORIAL_PREFIXES):
                keep.append(index)
    return keep


def heldout_split(key: str, fraction: float) -> str:
    """A stable split for one pair, keyed on a sentence so duplicates never straddle splits."""
    bucket = zlib.crc32(key.encode("utf-8")) % 10_000 / 10_000
    if bucket < fraction:
        return "test"
    if bucket < 2 * fraction:
        return "val"
    return "train"


def load_tatoeba(cfg: DataConfig, data_dir: Path) -> dict[str, ParallelText]:
    path = tatoeba_path(data_dir)
    langs = {cfg.src_lang, cfg.tgt_lang}
    if langs != {"en", "fr"}:
        raise NMTError(f"Tatoeba eng-fra holds English and French; set data.src_lang/tgt_lang to fr and en, not {sorted(langs)}.")
    pairs = read_tsv(path, 0, cfg.on_decode_error, on_bad_line="skip")
    english, french = pairs.src, pairs.tgt
    indices = tutorial_filter(english, french) if cfg.tutorial_filter else range(len(english))
    splits = {name: ParallelText([], [], name=f"{path}:{name}") for name in ("train", "val", "test")}
    for index in indices:
        split = splits[heldout_split(english[index], cfg.heldout_fraction)]
        en, fr = english[index], french[index]
        split.src.append(en if cfg.src_lang == "en" else fr)
        split.tgt.append(fr if cfg.src_lang == "en" else en)
    return splits


def split_paths(cfg: DataConfig, data_dir: Path, split: str) -> SplitPaths:
    """The files behind one split of a two-file data set (multi30k or the user's own)."""
    if cfg.dataset == "multi30k":
        stem = cfg.test_set if split == "test" else split
        return multi30k_paths(data_dir, stem, cfg.src_lang, cfg.tgt_lang)
    files = getattr(cfg, split)
    if files.tsv:
        return SplitPaths(tsv=_given_file(f"data.{split}.tsv", files.tsv))
    if not files.given:
        raise NMTError(f"No {split} data: set data.{split}.src and data.{split}.tgt, or data.{split}.tsv.")
    return SplitPaths(src=_given_file(f"data.{split}.src", files.src), tgt=_given_file(f"data.{split}.tgt", files.tgt))


def _given_file(key: str, value: str) -> Path:
    """A data file the user named, checked with the key that named it (the error says which setting to fix)."""
    path = Path(value)
    if not path.exists():
        raise NMTError(f"{key}={value}: there is no such file (relative paths start from {Path.cwd()}). "
                       f"Check the path, or give {key} the file's absolute path.")
    if path.is_dir():
        raise NMTError(f"{key}={value} is a directory; {key} takes a text file with one sentence per line"
                       f"{' (source<TAB>target)' if key.endswith('.tsv') else ''}: give the path of the file in it.")
    return path


def load_splits(cfg: DataConfig, data_dir: Path, splits: tuple[str, ...] = ("train", "val", "test")) -> dict[str, ParallelText]:
    """Read the requested splits of the configured data set, raw (no filtering)."""
    data_dir = Path(data_dir)
    if cfg.dataset == "tatoeba":
        loaded = load_tatoeba(cfg, data_dir)
        return {name: loaded[name] for name in splits}
    return {name: read_split(split_paths(cfg, data_dir, name), cfg) for name in splits}


@dataclass
class TrainingSource:
    """The training split as a stream of raw (source, target) pairs that can be read again, with what
    identifies it for the cache: its files and the settings that decide which pairs it yields."""

    name: str
    files: list[Path]
    settings: dict
    open_pairs: Callable[[], Iterator[tuple[str, str]]]
    limit: int = 0  # data.train_limit: only the first pairs (0 = all)
    count: Callable[[], int] | None = None  # the number of pairs, where the first file's lines are not it

    def pairs(self) -> Iterator[tuple[str, str]]:
        """Raw pairs, not yet cleaned (clean_line each side); read from disk each time."""
        pairs = self.open_pairs()
        return islice(pairs, self.limit) if self.limit else pairs

    def approximate_size(self) -> int:
        """Pairs to expect, for progress bars: the first file's line count (cut to the limit)."""
        lines = self.count() if self.count else count_lines(self.files[0])
        return min(lines, self.limit) if self.limit else lines

    def total_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)


def training_source(cfg: DataConfig, data_dir: Path) -> TrainingSource:
    """The configured training split as a stream (downloading a named data set first if needed)."""
    settings = {"dataset": cfg.dataset, "src_lang": cfg.src_lang, "tgt_lang": cfg.tgt_lang,
                "on_decode_error": cfg.on_decode_error, "on_bad_line": cfg.on_bad_line}
    if cfg.dataset == "tatoeba":  # one small TSV, split by a hash of each pair: read whole
        settings.update(tutorial_filter=cfg.tutorial_filter, heldout_fraction=cfg.heldout_fraction)
        path = tatoeba_path(Path(data_dir))

        @functools.cache  # read once: it is small, and the pairs are counted as well as read
        def tatoeba_train() -> ParallelText:
            return load_tatoeba(cfg, Path(data_dir))["train"]

        return TrainingSource(f"{path}:train", [path], settings,
                              lambda: zip(tatoeba_train().src, tatoeba_train().tgt), cfg.train_limit,
                              count=lambda: len(tatoeba_train()))  # not the file's lines: test, val, the filter
    paths = split_paths(cfg, Path(data_dir), "train")
    if paths.tsv is not None:
        _check_file(paths.tsv)
        return TrainingSource(str(paths.tsv), [paths.tsv], settings,
                              lambda: iter_tsv(paths.tsv, paths.tsv_src_column, cfg.on_decode_error, cfg.on_bad_line),
                              cfg.train_limit)
    _check_file(paths.src)
    _check_file(paths.tgt)
    return TrainingSource(str(paths.src), [paths.src, paths.tgt], settings,
                          lambda: iter_parallel(paths.src, paths.tgt, cfg.on_decode_error), cfg.train_limit)


# --- cleaning ----------------------------------------------------------------------------------------

@dataclass
class FilterReport:
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)

    def log(self, name: str) -> None:
        total = self.kept + sum(self.dropped.values())
        rules = ", ".join(f"{rule}: {count}" for rule, count in sorted(self.dropped.items())) or "none"
        log.info("%s: kept %d of %d pairs; dropped by rule: %s", name, self.kept, total, rules)


def drop_empty(text: ParallelText, report: FilterReport) -> ParallelText:
    """Drop pairs with an empty side (pairs are dropped whole, so the sides stay aligned)."""
    kept = ParallelText([], [], name=text.name)
    for src, tgt in zip(text.src, text.tgt):
        if not src or not tgt:
            report.dropped["empty"] += 1
            continue
        kept.src.append(src)
        kept.tgt.append(tgt)
    return kept


def length_filter(src_ids: list[list[int]], tgt_ids: list[list[int]], cfg: DataConfig, report: FilterReport) -> list[int]:
    """Indices of training pairs within the length and ratio limits (lengths in pieces)."""
    keep = []
    for index, (src, tgt) in enumerate(zip(src_ids, tgt_ids)):
        shorter, longer = sorted((len(src), len(tgt)))
        if shorter < cfg.min_len:
            report.dropped["too_short"] += 1
        elif longer > cfg.max_len:
            report.dropped["too_long"] += 1
        elif longer > cfg.max_len_ratio * shorter and longer > 3:
            report.dropped["length_ratio"] += 1
        else:
            keep.append(index)
    report.kept = len(keep)
    return keep
