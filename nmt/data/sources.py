"""Named data sets: their official URLs, download on first use, verification, and the local layout.

Everything lands in `paths.data_dir/<folder>/`, the same layout as a prepared offline directory,
so `paths.data_dir=/some/dir` works with no network when the files are already there.
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from nmt.errors import NMTError

log = logging.getLogger(__name__)

MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/{stem}.{lang}.gz"
MULTI30K_LINES = {
    "train": 29000,
    "val": 1014,
    "test_2016_flickr": 1000,
    "test_2017_flickr": 1000,
    "test_2017_mscoco": 461,
    "test_2018_flickr": 1071,
}
MULTI30K_LANGS = ("en", "de", "fr", "cs")

TATOEBA_FOLDER = "tatoeba-eng-fra"
TATOEBA_FILE = "eng-fra.txt"
# The PyTorch tutorial's archive first (data/eng-fra.txt, english<TAB>french), then manythings.org's
# (fra.txt, english<TAB>french<TAB>attribution), which we cut to two columns.
TATOEBA_URLS = (
    ("https://download.pytorch.org/tutorial/data.zip", "data/eng-fra.txt"),
    ("https://www.manythings.org/anki/fra-eng.zip", "fra.txt"),
)
TATOEBA_MIN_LINES = 100_000


@dataclass(frozen=True)
class SplitPaths:
    """Where one split's text lives: two aligned files, or one TSV with the given column order."""

    src: Path | None = None
    tgt: Path | None = None
    tsv: Path | None = None
    tsv_src_column: int = 0


def multi30k_paths(data_dir: Path, stem: str, src_lang: str, tgt_lang: str) -> SplitPaths:
    """Download (if needed) and return the two files of one Multi30k split."""
    for lang in (src_lang, tgt_lang):
        if lang not in MULTI30K_LANGS:
            raise NMTError(f"Multi30k has no language {lang!r}; data.src_lang/tgt_lang must be one of {MULTI30K_LANGS}.")
    if stem not in MULTI30K_LINES:
        raise NMTError(f"Multi30k has no split {stem!r}; known splits: {', '.join(MULTI30K_LINES)}.")
    folder = data_dir / "multi30k"
    paths = {}
    for lang in (src_lang, tgt_lang):
        path = folder / f"{stem}.{lang}"
        if not path.exists():
            _download_gz(MULTI30K_URL.format(stem=stem, lang=lang), path)
        _verify_line_count(path, MULTI30K_LINES[stem])
        paths[lang] = path
    return SplitPaths(src=paths[src_lang], tgt=paths[tgt_lang])


def tatoeba_path(data_dir: Path) -> Path:
    """Download (if needed) and return eng-fra.txt: english<TAB>french, one pair a line."""
    path = data_dir / TATOEBA_FOLDER / TATOEBA_FILE
    if not path.exists():
        _download_tatoeba(path)
    lines = count_lines(path)
    if lines < TATOEBA_MIN_LINES:
        raise NMTError(
            f"{path} has {lines} lines, but the Tatoeba English-French file has over {TATOEBA_MIN_LINES}. "
            f"It looks truncated: delete it and run again to download it, or replace it with a complete copy."
        )
    return path


def count_lines(path: Path) -> int:
    with open(path, "rb") as handle:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))


def _verify_line_count(path: Path, expected: int) -> None:
    lines = count_lines(path)
    if lines != expected:
        raise NMTError(
            f"{path} has {lines} lines, expected {expected}. The file is incomplete or not the official one: "
            f"delete it and run again to download it, or replace it with the official file."
        )


def _fetch(url: str, destination_hint: Path) -> bytes:
    """GET a URL into memory with a tqdm bar; a network failure becomes a message saying where files go."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            buffer = io.BytesIO()
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {url.rsplit('/', 1)[-1]}") as bar:
                for chunk in iter(lambda: response.read(1 << 16), b""):
                    buffer.write(chunk)
                    bar.update(len(chunk))
            return buffer.getvalue()
    except (urllib.error.URLError, OSError, TimeoutError) as error:
        raise NMTError(
            f"Could not download {url} ({error}). Without network, put the file in place by hand as "
            f"{destination_hint.absolute()} (uncompressed, UTF-8), or point the data directory at a folder that already "
            f"holds it: e.g. paths.data_dir=../shared/data for nmt-train, data_dir=../shared/data for nmt-evaluate."
        ) from None


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _download_gz(url: str, path: Path) -> None:
    log.info("downloading %s -> %s", url, path)
    data = _fetch(url, path)
    try:
        _write_atomically(path, gzip.decompress(data))
    except (OSError, EOFError) as error:
        raise NMTError(f"The download of {url} is not a valid gzip file ({error}); try again later.") from None


def _download_tatoeba(path: Path) -> None:
    errors = []
    for url, member in TATOEBA_URLS:
        try:
            data = _fetch(url, path)
        except NMTError as error:
            errors.append(str(error))
            continue
        with zipfile.ZipFile(io.BytesIO(data)) as archive, archive.open(member) as handle:
            lines = io.TextIOWrapper(handle, encoding="utf-8", newline="\n")
            text = "".join("\t".join(line.rstrip("\n").split("\t")[:2]) + "\n" for line in lines)
        _write_atomically(path, text.encode("utf-8"))
        return
    raise NMTError(errors[-1])

