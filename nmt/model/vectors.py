"""Pretrained word vectors: read word2vec (text or binary), GloVe and fastText files, match them onto
SentencePiece pieces, and write vectors back out.

The formats (model.embeddings.vectors_format): `word2vec_text` starts with a "count dim" header line,
then one "word v1 ... vdim" line per word (fastText's .vec files are this format); `glove` is the
same without the header; `word2vec_binary` has the header line, then per word the word, a space and
dim little-endian float32 values (word2vec's C tool adds a newline after each, gensim does not).
`auto` tells them apart from the first bytes of the file.

A piece takes a vector by the first rule that finds one:
1. the piece itself ("▁Hund" in the file);
2. the word it spells without the "▁" word-start mark ("Hund");
3. with `lowercase`, that word lowercased against the file's words lowercased ("hund", "HUND");
   the file's first such word wins (files are usually sorted by frequency);
4. with `words` (vectors_subword_mean), the mean of the vectors of the distinct training words whose
   segmentation uses the piece ("e" from "Hunde", "Katze", ...).
Other pieces keep their initialisation; special pieces (<pad>, <unk>, <s>, </s>) are never touched.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Collection, Iterator

import numpy as np
import torch
from tqdm import tqdm

from nmt.errors import NMTError

log = logging.getLogger(__name__)
WORD_START = "\u2581"
FORMATS = ("word2vec_text", "glove", "word2vec_binary")
HEADER = re.compile(rb"\s*(\d+)\s+(\d+)\s*")
CHUNK = 1 << 20  # bytes read at a time from a binary file


# --- reading --------------------------------------------------------------------------------------------

def _missing(path: Path, key: str = "model.embeddings.src_vectors / tgt_vectors") -> NMTError:
    what = "is a directory, not a vectors file" if path.is_dir() else "does not exist"
    return NMTError(f"The vectors file {path} ({key}) {what}. Give a word2vec (text or binary), GloVe or fastText "
                    f".vec file.")


def check_vectors_exist(src_vectors: str | None, tgt_vectors: str | None) -> None:
    """Fail before any data preparation when a configured vectors file is missing, naming its key."""
    for side, path in (("src", src_vectors), ("tgt", tgt_vectors)):
        if path is not None and not Path(path).is_file():
            raise _missing(Path(path), f"model.embeddings.{side}_vectors")


def _all_numbers(fields: list[str]) -> bool:
    try:
        for field in fields:
            float(field)
    except ValueError:
        return False
    return True


def detect_format(path: Path) -> str:
    """word2vec_text, glove or word2vec_binary, from the first line and the bytes after it."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    with open(path, "rb") as handle:
        head = handle.read(CHUNK)
    first, _, rest = head.partition(b"\n")
    header = HEADER.fullmatch(first)
    if not header:
        return "glove"
    dim = int(header.group(2))
    # text: the next line is "word v1 ... vdim" in plain digits; binary: "word " then 4 * dim raw bytes
    line = rest.split(b"\n", 1)[0]
    if not rest.strip():
        return "word2vec_text"
    try:
        fields = line.decode("utf-8").split()
        if len(fields) == dim + 1:
            [float(x) for x in fields[1:]]
            return "word2vec_text"
    except (UnicodeDecodeError, ValueError):
        pass
    return "word2vec_binary"


COMPRESSED = {b"\x1f\x8b": ("gzip", "gunzip"), b"PK\x03\x04": ("zip", "unzip"), b"BZh": ("bzip2", "bunzip2"),
              b"\xfd7zXZ\x00": ("xz", "unxz")}


def _check_plain(path: Path) -> None:
    """A vectors file must hold something, uncompressed: an empty or compressed file is named, with what to do."""
    with open(path, "rb") as handle:
        head = handle.read(CHUNK)
    if not head.strip():
        raise NMTError(f"{path} holds no vectors (it is empty). Check that its download or export finished, "
                       f"or point the setting at another file.")
    for magic, (kind, tool) in COMPRESSED.items():
        if head.startswith(magic):
            raise NMTError(f"{path} is {kind}-compressed; nmt reads vectors files uncompressed. Decompress it first "
                           f"({tool} {path.name}) and give the path of the decompressed file.")


def _dim_error(path: Path, where: str, found: int, expected: int) -> NMTError:
    return NMTError(
        f"{path}, {where}: vectors of dimension {found}, but the model's embeddings have dimension {expected}. "
        f"Set model.embedding_dim={found}, or use vectors of dimension {expected}."
    )


def _check_finite(path: Path, where: str, word: str, vector: torch.Tensor) -> torch.Tensor:
    if not torch.isfinite(vector).all():
        raise NMTError(f"{path}, {where}: the vector of {word!r} holds NaN or infinite values.")
    return vector


class _Undecodable:
    """Counts the words that are not valid UTF-8; they are read with U+FFFD in place of the bad bytes."""

    def __init__(self, path: Path, unit: str):
        self.path, self.unit, self.count, self.first = path, unit, 0, 0

    def decode(self, raw: bytes, number: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.count += 1
            self.first = self.first or number
            return raw.decode("utf-8", errors="replace")

    def warn(self) -> None:
        if self.count:
            log.warning("%s: %d %s not valid UTF-8 (the first is %s %d); their bad bytes were read as U+FFFD, so "
                        "those words will not match their pieces. If the file is in another encoding, convert it "
                        "to UTF-8 (e.g. iconv -f latin1 -t utf-8).", self.path, self.count,
                        f"{self.unit}s are" if self.count > 1 else f"{self.unit} is", self.unit, self.first)


def _text_vectors(handle: BinaryIO, path: Path, fmt: str, dim: int | None, keep,
                  bar) -> Iterator[tuple[str, torch.Tensor]]:
    """(word, vector) for every kept line of a word2vec_text or glove file, checking every line's shape."""
    expected, promised, seen, header_like = dim, None, 0, ""
    undecodable = _Undecodable(path, "line")
    for number, raw in enumerate(handle, start=1):
        bar.update(len(raw))
        line = undecodable.decode(raw, number).rstrip("\r\n").rstrip(" ")
        fields = line.split(" ")
        if number == 1 and fmt == "glove" and len(fields) == 2 and all(f.isdigit() for f in fields):
            header_like = line  # a word "2" with the one value 3, or a word2vec header read as GloVe
        if number == 1 and fmt == "word2vec_text":
            if not (len(fields) == 2 and all(f.isdigit() for f in fields)):
                raise NMTError(
                    f"{path}, line 1: expected the word2vec header 'count dim', got {raw[:60]!r}. For a file "
                    f"without a header (GloVe), set model.embeddings.vectors_format=glove (or auto)."
                )
            promised, header_dim = int(fields[0]), int(fields[1])
            if dim is not None and header_dim != dim:
                raise _dim_error(path, "line 1 (header)", header_dim, dim)
            dim = header_dim
            continue
        if len(fields) < 2 or not fields[0]:
            if raw.strip():
                raise NMTError(f"{path}, line {number}: expected a word followed by numbers, got {raw[:60]!r}.")
            continue
        if dim is None:
            dim = len(fields) - 1
        if len(fields) - 1 != dim:
            if header_like and number <= 2:  # the first line's one value does not fit: it was a header
                raise NMTError(
                    f"{path}, line 1: {header_like!r} is a word2vec header ('count dim'), which GloVe files do not "
                    f"have. Set model.embeddings.vectors_format=word2vec_text (or auto, which detects it)."
                )
            if not _all_numbers(fields[1:]):
                raise NMTError(f"{path}, line {number}: expected a word followed by {dim} numbers, got {raw[:60]!r}. "
                               f"Fix or delete that line.")
            if expected is None and number > 1 + (fmt == "word2vec_text"):
                raise NMTError(f"{path}, line {number}: {len(fields) - 1} values, but the lines before have {dim}.")
            raise _dim_error(path, f"line {number}", len(fields) - 1, dim)
        seen += 1
        word = fields[0]
        if not keep(word):
            continue
        try:
            vector = torch.tensor([float(x) for x in fields[1:]], dtype=torch.float32)
        except ValueError:
            raise NMTError(f"{path}, line {number}: the values for {word!r} are not all numbers.") from None
        yield word, _check_finite(path, f"line {number}", word, vector)
    undecodable.warn()
    if promised is not None and seen != promised:  # a truncated download, or a file edited by hand
        log.warning("%s: its header promises %d vectors, but it holds %d. If it was cut short, download it "
                    "again.", path, promised, seen)


def _binary_vectors(handle: BinaryIO, path: Path, dim: int | None, keep, bar) -> Iterator[tuple[str, torch.Tensor]]:
    """(word, vector) for every kept entry of a word2vec binary file, read in chunks."""
    first = handle.readline()
    bar.update(len(first))
    header = HEADER.fullmatch(first.rstrip(b"\r\n"))
    if not header:
        raise NMTError(f"{path}, line 1: expected the word2vec header 'count dim', got {first[:60]!r}.")
    count, header_dim = int(header.group(1)), int(header.group(2))
    if dim is not None and header_dim != dim:
        raise _dim_error(path, "line 1 (header)", header_dim, dim)
    size = 4 * header_dim
    buffer, pos, offset = b"", 0, len(first)  # offset: file position of buffer[0]
    undecodable = _Undecodable(path, "vector")
    for number in range(1, count + 1):
        while True:
            space = buffer.find(b" ", pos)
            if space >= 0 and len(buffer) >= space + 1 + size:
                break
            chunk = handle.read(CHUNK)
            if not chunk:
                raise NMTError(
                    f"{path}: the header promises {count} vectors of dimension {header_dim}, but the file ends "
                    f"inside vector {number} (byte {offset + pos}); it is truncated, or not word2vec binary "
                    f"(set model.embeddings.vectors_format)."
                )
            bar.update(len(chunk))
            buffer, offset, pos = buffer[pos:] + chunk, offset + pos, 0
        word = undecodable.decode(buffer[pos:space].lstrip(b"\r\n"), number)
        if not word or "\n" in word:
            raise NMTError(f"{path}, vector {number} (byte {offset + pos}): no word before the values; "
                           f"the file is damaged or not word2vec binary (set model.embeddings.vectors_format).")
        values = buffer[space + 1:space + 1 + size]
        pos = space + 1 + size
        if keep(word):
            vector = torch.from_numpy(np.frombuffer(values, dtype="<f4").astype(np.float32))
            yield word, _check_finite(path, f"vector {number}", word, vector)
    undecodable.warn()


def read_vectors(path: Path, wanted: Collection[str] | None = None, expected_dim: int | None = None,
                 fmt: str = "auto", wanted_lower: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """Stream a vectors file -> {word: vector (E,)}, in file order, keeping only the words asked for.

    A word is kept when it is in `wanted` or its lowercase form is in `wanted_lower`; everything is
    kept when both are None. Every line's number of values is checked, and the values of every kept
    word: either wrong is an error naming the file and line. (Parsing the numbers of words that are not
    kept would make reading a large file several times slower.)
    """
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    _check_plain(path)
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown vectors format {fmt!r}")
    if wanted is None and wanted_lower is None:
        keep = lambda word: True  # noqa: E731
    else:
        wanted, wanted_lower = wanted or (), wanted_lower or ()
        keep = lambda word: word in wanted or word.lower() in wanted_lower  # noqa: E731
    with open(path, "rb") as handle, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                          desc=f"vectors {path.name}", leave=False) as bar:
        if fmt == "word2vec_binary":
            return dict(_binary_vectors(handle, path, expected_dim, keep, bar))
        return dict(_text_vectors(handle, path, fmt, expected_dim, keep, bar))


def write_vectors(path: Path, words: list[str], vectors: torch.Tensor, binary: bool = False) -> None:
    """Write word2vec text (or binary) format: a "count dim" header, then one word and its vector each.

    Text values carry 9 significant digits, which read back to the same float32 values bit for bit.
    """
    if len(words) != vectors.size(0):
        raise ValueError(f"{len(words)} words but {vectors.size(0)} vectors")
    for word in words:
        if not word or any(c.isspace() for c in word):
            raise ValueError(f"a word2vec word cannot be empty or hold whitespace: {word!r}")
    matrix = vectors.detach().float().cpu().numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(f"{len(words)} {matrix.shape[1]}\n".encode())
        for word, row in zip(words, matrix):
            if binary:
                handle.write(word.encode("utf-8") + b" " + row.astype("<f4").tobytes() + b"\n")
            else:
                handle.write((word + " " + " ".join(f"{x:.9g}" for x in row.tolist()) + "\n").encode("utf-8"))


# --- matching onto pieces ---------------------------------------------------------------------------------

def bare_word(piece: str) -> str:
    """The word a piece spells without its word-start mark: "▁house" -> "house"."""
    return piece.lstrip(WORD_START)


def training_words(flat: np.ndarray, offsets: np.ndarray, pieces: list[str],
                   skip_ids: Collection[int] = ()) -> dict[str, tuple[int, ...]]:
    """The distinct words of an encoded corpus -> their piece ids.

    A word runs from a piece that starts with "▁" (or a sentence start) to the next one: the pieces
    ["▁Hund", "e"] make the word "Hunde". Words holding a special piece (<unk>) are left out.
    """
    starts = np.array([p.startswith(WORD_START) for p in pieces], dtype=bool)  # (V,)
    boundaries = np.union1d(np.flatnonzero(starts[flat]), offsets[:-1])
    boundaries = boundaries[(boundaries > 0) & (boundaries < len(flat))]
    words: dict[bytes, np.ndarray] = {}
    for ids in np.split(flat.astype(np.int64), boundaries):
        if len(ids):
            words.setdefault(ids.tobytes(), ids)
    skip = set(skip_ids)
    result = {}
    for ids in words.values():
        ids = tuple(int(i) for i in ids)
        if skip.isdisjoint(ids):
            word = bare_word("".join(pieces[i] for i in ids))
            if word:
                result.setdefault(word, ids)
    return result


@dataclass
class Coverage:
    """How many pieces of one side got a vector, by which rule, and the training tokens they cover."""

    pieces: int  # non-special pieces
    as_piece: int = 0
    as_word: int = 0
    lowercased: int = 0
    subword_mean: int = 0
    token_share: float | None = None  # share of training tokens whose piece got a vector
    fmt: str = ""
    rules: tuple[str, ...] = ("as_piece", "as_word")

    @property
    def covered(self) -> int:
        return self.as_piece + self.as_word + self.lowercased + self.subword_mean

    def line(self, side: str, path: Path) -> str:
        names = {"as_piece": "as the piece", "as_word": "as the word without \u2581",
                 "lowercased": "lowercased", "subword_mean": "from the mean of words using them"}
        rules = ", ".join(f"{getattr(self, rule)} {names[rule]}" for rule in self.rules)
        share = f", {100 * self.token_share:.1f}% of training tokens" if self.token_share is not None else ""
        fmt = f" ({self.fmt})" if self.fmt else ""
        return (f"{side} vectors {path}{fmt}: {self.covered}/{self.pieces} pieces covered "
                f"({100 * self.covered / max(1, self.pieces):.1f}%: {rules}){share}")


def load_pretrained_(weight: torch.Tensor, pieces: list[str], path: Path, skip_ids: Collection[int],
                     token_counts: torch.Tensor | None = None, fmt: str = "auto", lowercase: bool = False,
                     words: dict[str, tuple[int, ...]] | None = None) -> Coverage:
    """Copy matching vectors into rows of `weight` (V, E) in place, by the rules in the module docstring.

    `words` (training word -> piece ids) turns on the subword mean. Returns the coverage.
    """
    path = Path(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    bare = [bare_word(p) for p in pieces]
    wanted = set(pieces) | set(bare) | set(words or ())
    wanted_lower = {w.lower() for w in (*bare, *(words or ()))} if lowercase else None
    vectors = read_vectors(path, wanted, expected_dim=weight.size(1), fmt=fmt, wanted_lower=wanted_lower)
    by_lower: dict[str, torch.Tensor] = {}
    if lowercase:
        for word, vector in vectors.items():
            by_lower.setdefault(word.lower(), vector)

    def lookup(text: str) -> torch.Tensor | None:
        if text in vectors:
            return vectors[text]
        return by_lower.get(text.lower()) if lowercase and text else None

    rules = ["as_piece", "as_word"] + (["lowercased"] if lowercase else []) + (["subword_mean"] if words else [])
    coverage = Coverage(pieces=len(pieces) - len(set(skip_ids)), fmt=fmt, rules=tuple(rules))
    covered = torch.zeros(len(pieces), dtype=torch.bool)
    with torch.no_grad():
        for index, piece in enumerate(pieces):
            if index in skip_ids:
                continue
            if piece in vectors:
                rule, vector = "as_piece", vectors[piece]
            elif bare[index] and bare[index] in vectors:
                rule, vector = "as_word", vectors[bare[index]]
            elif lowercase and bare[index] and bare[index].lower() in by_lower:
                rule, vector = "lowercased", by_lower[bare[index].lower()]
            else:
                continue
            weight[index].copy_(vector)
            covered[index] = True
            setattr(coverage, rule, getattr(coverage, rule) + 1)
        if words:
            means = _subword_means(words, lookup, len(pieces), weight.size(1))
            for index, vector in means.items():
                if index not in skip_ids and not covered[index]:
                    weight[index].copy_(vector)
                    covered[index] = True
                    coverage.subword_mean += 1
    if token_counts is not None and token_counts.sum() > 0:
        coverage.token_share = float(token_counts[covered].sum() / token_counts.sum())
    return coverage


def _subword_means(words: dict[str, tuple[int, ...]], lookup, vocab_size: int, dim: int) -> dict[int, torch.Tensor]:
    """piece id -> mean vector of the distinct training words (with a vector) whose pieces include it."""
    sums = torch.zeros(vocab_size, dim, dtype=torch.float64)
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for word, ids in words.items():
        vector = lookup(word)
        if vector is None:
            continue
        unique = torch.tensor(sorted(set(ids)), dtype=torch.long)
        sums[unique] += vector.double()
        counts[unique] += 1
    return {int(i): (sums[i] / counts[i]).float() for i in torch.nonzero(counts).flatten()}

