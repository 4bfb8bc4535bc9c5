"""nmt-embeddings: look into a trained run's embedding tables.

`query=WORD` prints the nearest pieces by cosine similarity (a word of several pieces is the mean of
their vectors), `analogy='a - b + c'` does vector arithmetic on unit vectors (3CosAdd), `export=FILE`
writes the vectors in word2vec text format (loadable as model.embeddings.src_vectors), and
`plot=FILE` draws the most frequent training pieces on their first two principal components. Any
checkpoint works, so step0 ("before") and best ("after") can be compared.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F

from nmt.checkpoint import load_checkpoint
from nmt.config import InspectConfig
from nmt.console import setup_logging
from nmt.data.corpus import load_splits
from nmt.data.vocab import PAD_ID, SPECIAL_IDS, UNK_ID
from nmt.errors import NMTError
from nmt.model.drift import embedding_key
from nmt.model.vectors import WORD_START, write_vectors
from nmt.plots import plot_embedding_map
from nmt.run import TrainedRun, load_trained, prepare_output_file


@dataclass
class EmbeddingTable:
    """One side's embedding matrix (V, E) with its SentencePiece model."""

    side: str
    weight: torch.Tensor
    processor: spm.SentencePieceProcessor
    initial: torch.Tensor | None = None  # the step-0 values, to spot rows training never touched

    @property
    def pieces(self) -> list[str]:
        return [self.processor.id_to_piece(i) for i in range(self.processor.get_piece_size())]

    def ids(self, text: str) -> list[int]:
        """A piece written with its "▁" (▁Hund), or text to segment into pieces (Hunde -> ▁Hund e)."""
        text = text.strip()
        if not text:
            raise NMTError(f"An empty word has no {self.side} vector; give a word, e.g. query=Hund.")
        if text.startswith(WORD_START) and " " not in text:
            index = self.processor.piece_to_id(text)
            if index == UNK_ID:
                raise NMTError(f"{text!r} is not a piece of the {self.side} vocabulary; write the word without "
                               f"{WORD_START} to have it segmented into pieces.")
            return [index]
        ids = self.processor.encode(text, out_type=int)
        if UNK_ID in ids:
            raise NMTError(f"{text!r} has characters the {self.side} vocabulary does not know (they map to <unk>), "
                           f"so it has no vector. Check the side (side=src or side=tgt) and the spelling.")
        return ids

    def vector(self, text: str) -> tuple[torch.Tensor, list[int]]:
        """The mean vector of the text's pieces (E,), and those piece ids."""
        ids = self.ids(text)
        return self.weight[ids].mean(dim=0), ids

    def nearest(self, vector: torch.Tensor, k: int, exclude: set[int]) -> list[tuple[str, float]]:
        """The k pieces (specials and `exclude` left out) most cosine-similar to `vector` (E,)."""
        scores = F.cosine_similarity(self.weight, vector.unsqueeze(0), dim=1)  # (V,)
        scores[list(SPECIAL_IDS | exclude)] = -float("inf")
        top = torch.topk(scores, min(k, len(scores) - len(SPECIAL_IDS | exclude)))
        return [(self.processor.id_to_piece(int(i)), float(s)) for s, i in zip(top.values, top.indices)]

    def untrained(self, ids: list[int]) -> list[str]:
        """The pieces among `ids` whose rows still hold their step-0 values."""
        if self.initial is None:
            return []
        return [self.processor.id_to_piece(i) for i in ids if torch.equal(self.weight[i], self.initial[i])]


def load_table(run: TrainedRun, side: str) -> EmbeddingTable:
    weight = getattr(run.model, f"{side}_embed").weight.detach().float().cpu()
    table = EmbeddingTable(side, weight, run.vocab.side(side))
    step0 = run.files.checkpoint("step0")
    if step0.exists() and run.checkpoint.resolve() != step0.resolve():
        table.initial = load_checkpoint(step0)["model"][embedding_key(side)].float()
    return table


def print_neighbours(title: str, neighbours: list[tuple[str, float]]) -> None:
    print(title)
    width = max([len(piece) for piece, _ in neighbours] + [5])
    for rank, (piece, score) in enumerate(neighbours, start=1):
        print(f"  {rank:>3}  {piece:<{width}}  {score:.3f}")


def query(table: EmbeddingTable, text: str, k: int, where: str) -> list[tuple[str, float]]:
    vector, ids = table.vector(text)
    pieces = " ".join(table.processor.id_to_piece(i) for i in ids)
    neighbours = table.nearest(vector, k, set(ids))
    print_neighbours(f"nearest {table.side} pieces to {text!r} ({pieces}{', averaged' if len(ids) > 1 else ''}), "
                     f"{where}, by cosine:", neighbours)
    warn_untrained(table, ids)
    return neighbours


def parse_analogy(expression: str) -> list[tuple[float, str]]:
    """'a - b + c' -> [(+1, 'a'), (-1, 'b'), (+1, 'c')]; the signs need spaces around them (T-Shirt is a word)."""
    text, sign = expression.strip(), 1.0
    if text[:2] in ("- ", "+ "):
        sign, text = (-1.0 if text[0] == "-" else 1.0), text[2:]
    parts = re.split(r"\s+([+-])\s+", text)
    terms = [(sign, parts[0].strip())]
    terms += [(1.0 if operator == "+" else -1.0, term.strip()) for operator, term in zip(parts[1::2], parts[2::2])]
    # a sign left inside a term had a space on one side only ('a -b', 'a- b'), or stood alone ('a - - b')
    if len(terms) < 2 or any(not term or re.search(r"\s[+-]|[+-]\s|^[+-]$", term) for _, term in terms):
        raise NMTError(f"analogy={expression!r} is not of the form 'a - b + c' (words joined by ' + ' and ' - ', "
                       f"with a space on both sides of each sign).")
    return terms


def analogy(table: EmbeddingTable, expression: str, k: int, where: str) -> list[tuple[str, float]]:
    """Sum of the terms' unit vectors, signed; the answer's nearest pieces exclude the terms' own."""
    total, used = torch.zeros(table.weight.size(1)), set()
    for sign, term in parse_analogy(expression):
        vector, ids = table.vector(term)
        total += sign * F.normalize(vector, dim=0)
        used |= set(ids)
    neighbours = table.nearest(total, k, used)
    print_neighbours(f"{table.side}: {expression} ≈ ({where}, by cosine):", neighbours)
    warn_untrained(table, sorted(used))
    return neighbours


def warn_untrained(table: EmbeddingTable, ids: list[int]) -> None:
    untrained = table.untrained(ids)
    if untrained:
        holds, them = ("holds its", "it") if len(untrained) == 1 else ("hold their", "them")
        print(f"  note: {', '.join(untrained)} still {holds} step-0 values: training never updated {them} "
              f"(absent from the training data, or frozen).")


def export(table: EmbeddingTable, path: Path) -> None:
    """Every piece but <pad>, in word2vec text format."""
    pieces = table.pieces
    rows = [i for i in range(len(pieces)) if i != PAD_ID]
    write_vectors(path, [pieces[i] for i in rows], table.weight[rows])
    print(f"wrote {len(rows)} {table.side} vectors of dimension {table.weight.size(1)} to {path} "
          f"(word2vec text format; load with model.embeddings.{table.side}_vectors={path})")


def piece_counts(run: TrainedRun, side: str, data_dir: str | None) -> torch.Tensor:
    """How often each piece occurs in the run's training split (V,)."""
    data = run.config.data
    folder = Path(data_dir or run.config.paths.data_dir)
    text = load_splits(data, folder, ("train",))["train"]
    lines = (text.src if side == "src" else text.tgt)[:data.train_limit or None]
    ids = [i for row in run.vocab.encode(lines, side) for i in row]
    return torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=run.vocab.size(side))


def plot_map(table: EmbeddingTable, counts: torch.Tensor, count: int, path: Path, where: str) -> None:
    """PCA of the `count` most frequent non-special pieces, drawn labelled."""
    counts = counts.clone()
    counts[list(SPECIAL_IDS)] = -1
    top = [int(i) for i in torch.argsort(counts, descending=True, stable=True)[:count] if counts[i] > 0]
    if len(top) < 2:
        raise NMTError("The training data has fewer than two pieces to plot.")
    rows = table.weight[top]  # (N, E)
    centred = rows - rows.mean(dim=0)
    _, singular, components = torch.linalg.svd(centred, full_matrices=False)
    points = centred @ components[:2].T  # (N, 2)
    explained = float((singular[:2] ** 2).sum() / (singular ** 2).sum())
    title = (f"{table.side} embeddings ({where}): the {len(top)} most frequent pieces,\n"
             f"first two principal components ({100 * explained:.0f}% of the variance)")
    plot_embedding_map(points, [table.processor.id_to_piece(i) for i in top], path, title)
    print(f"wrote {path}: {title.replace(chr(10), ' ')}")


def inspect_embeddings(cfg: InspectConfig, cfg_dict: dict | None = None) -> None:
    setup_logging()
    for key in ("export", "plot"):
        if getattr(cfg, key):
            prepare_output_file(Path(getattr(cfg, key)), key)
    run = load_trained(cfg.run, cfg.checkpoint, torch.device("cpu"))
    table = load_table(run, cfg.side)
    where = run.checkpoint.name
    if cfg.query:
        query(table, cfg.query, cfg.k, where)
    if cfg.analogy:
        analogy(table, cfg.analogy, cfg.k, where)
    if cfg.export:
        export(table, Path(cfg.export))
    if cfg.plot:
        plot_map(table, piece_counts(run, cfg.side, cfg.data_dir), cfg.plot_pieces, Path(cfg.plot), where)
