"""Pretrained word vectors (word2vec / GloVe / fastText text files) matched onto SentencePiece pieces.

A piece takes a vector when the file has the piece itself, or else the word it spells without the
"▁" word-start mark: "▁house" takes the vector of "house". Other pieces keep their initialisation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from nmt.errors import NMTError

log = logging.getLogger(__name__)
WORD_START = "\u2581"


def _candidates(piece: str) -> list[str]:
    bare = piece.lstrip(WORD_START)
    return [piece, bare] if bare and bare != piece else [piece]


def read_vectors(path: Path, wanted: set[str] | None = None, expected_dim: int | None = None) -> dict[str, torch.Tensor]:
    """Stream a text vectors file; keep only the `wanted` words (all when None).

    The first line is skipped when it is a word2vec/fastText header ("count dim"). A line with the
    wrong number of values, or values that are not numbers, is an error naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise NMTError(f"The vectors file {path} does not exist (model.embeddings.src_vectors / tgt_vectors).")
    vectors: dict[str, torch.Tensor] = {}
    dim = expected_dim
    with open(path, "rb") as handle, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                          desc=f"vectors {path.name}", leave=False) as bar:
        for number, raw in enumerate(handle, start=1):
            bar.update(len(raw))
            fields = raw.decode("utf-8", errors="replace").rstrip("\r\n").rstrip(" ").split(" ")
            if number == 1 and len(fields) == 2 and all(f.isdigit() for f in fields):
                header_dim = int(fields[1])
                if dim is not None and header_dim != dim:
                    raise _dim_error(path, 1, header_dim, dim)
                dim = header_dim
                continue
            if len(fields) < 2 or not fields[0]:
                if raw.strip():
                    raise NMTError(f"{path}, line {number}: expected a word followed by numbers, got {raw[:60]!r}.")
                continue
            if dim is None:
                dim = len(fields) - 1
            if len(fields) - 1 != dim:
                raise _dim_error(path, number, len(fields) - 1, dim)
            word = fields[0]
            if wanted is not None and word not in wanted:
                continue
            try:
                vectors[word] = torch.tensor([float(x) for x in fields[1:]], dtype=torch.float32)
            except ValueError:
                raise NMTError(f"{path}, line {number}: the values for {word!r} are not all numbers.") from None
    return vectors


def _dim_error(path: Path, line: int, found: int, expected: int) -> NMTError:
    return NMTError(
        f"{path}, line {line}: vectors of dimension {found}, but the model's embeddings have dimension {expected}. "
        f"Set model.embedding_dim={found}, or use vectors of dimension {expected}."
    )


@dataclass
class Coverage:
    pieces: int
    covered: int
    token_share: float | None  # share of training tokens whose piece got a vector

    def line(self, side: str, path: Path) -> str:
        share = f", {100 * self.token_share:.1f}% of training tokens" if self.token_share is not None else ""
        return (f"{side} vectors {path}: {self.covered}/{self.pieces} pieces covered "
                f"({100 * self.covered / max(1, self.pieces):.1f}%){share}")


def load_pretrained_(weight: torch.Tensor, pieces: list[str], path: Path, skip_ids: set[int],
                     token_counts: torch.Tensor | None = None) -> Coverage:
    """Copy matching vectors into rows of `weight` (V, E) in place; returns the coverage."""
    wanted = {c for p in pieces for c in _candidates(p)}
    vectors = read_vectors(path, wanted, expected_dim=weight.size(1))
    covered = torch.zeros(len(pieces), dtype=torch.bool)
    with torch.no_grad():
        for index, piece in enumerate(pieces):
            if index in skip_ids:
                continue
            for candidate in _candidates(piece):
                if candidate in vectors:
                    weight[index].copy_(vectors[candidate])
                    covered[index] = True
                    break
    share = None
    if token_counts is not None and token_counts.sum() > 0:
        share = float(token_counts[covered].sum() / token_counts.sum())
    return Coverage(len(pieces) - len(skip_ids), int(covered.sum()), share)
