"""Pretrained word vectors: reading word2vec/GloVe text files and matching them onto pieces."""

from __future__ import annotations

import pytest
import torch

from nmt.errors import NMTError
from nmt.model.vectors import load_pretrained_, read_vectors

WS = "\u2581"  # SentencePiece's word-start mark


def write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_word2vec_header_and_glove_without_header(tmp_path):
    w2v = write(tmp_path / "w2v.txt", "2 3\nhaus 1 2 3\nhund 0.5 -1 2e-1\n")
    glove = write(tmp_path / "glove.txt", "haus 1 2 3\nhund 0.5 -1 2e-1\n")
    for path in (w2v, glove):
        vectors = read_vectors(path)
        assert vectors.keys() == {"haus", "hund"}
        assert torch.equal(vectors["hund"], torch.tensor([0.5, -1.0, 0.2]))


def test_only_wanted_words_are_kept(tmp_path):
    path = write(tmp_path / "v.txt", "a 1 1\nb 2 2\nc 3 3\n")
    assert read_vectors(path, wanted={"b", "zzz"}).keys() == {"b"}


@pytest.mark.parametrize("text, expected", [
    ("2 3\nhaus 1 2 3\n", "dimension 3"),  # header disagrees with the model
    ("haus 1 2 3\n", "dimension 3"),  # first vector disagrees with the model
])
def test_dimension_mismatch_names_file_line_and_both_sizes(tmp_path, text, expected):
    path = write(tmp_path / "v.txt", text)
    with pytest.raises(NMTError) as error:
        read_vectors(path, expected_dim=4)
    message = str(error.value)
    assert "v.txt" in message and expected in message and "dimension 4" in message and "line 1" in message


def test_ragged_file_and_non_numbers_are_errors(tmp_path):
    ragged = write(tmp_path / "ragged.txt", "a 1 2\nb 1 2 3\n")
    with pytest.raises(NMTError, match="line 2"):
        read_vectors(ragged)
    words = write(tmp_path / "words.txt", "a 1 2\nb x y\n")
    with pytest.raises(NMTError, match="line 2.*not all numbers"):
        read_vectors(words)
    with pytest.raises(NMTError, match="does not exist"):
        read_vectors(tmp_path / "missing.txt")


def test_load_pretrained_matches_pieces_and_bare_words(tmp_path):
    path = write(tmp_path / "v.txt", f"haus 1 1\n{WS}hund 2 2\nen 3 3\n<pad> 9 9\nkatze 4 4\n")
    pieces = ["<pad>", "<unk>", "<s>", "</s>", f"{WS}haus", f"{WS}hund", "en", f"{WS}maus"]
    weight = torch.zeros(len(pieces), 2)
    counts = torch.tensor([0, 0, 0, 0, 5, 3, 2, 10])
    coverage = load_pretrained_(weight, pieces, path, skip_ids={0, 1, 2, 3}, token_counts=counts)
    assert weight[4].tolist() == [1, 1]  # "▁haus" takes the vector of "haus"
    assert weight[5].tolist() == [2, 2]  # "▁hund" is in the file as itself
    assert weight[6].tolist() == [3, 3]
    assert weight[7].tolist() == [0, 0]  # no vector: keeps its initialisation
    assert weight[0].tolist() == [0, 0]  # special pieces are never overwritten
    assert (coverage.pieces, coverage.covered) == (4, 3)
    assert coverage.token_share == pytest.approx(10 / 20)
    assert "3/4 pieces covered (75.0%), 50.0% of training tokens" in coverage.line("src", path)
