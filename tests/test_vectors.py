"""Pretrained word vectors: the formats, their detection, writing, and matching them onto pieces."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nmt.errors import NMTError
from nmt.model.vectors import detect_format, load_pretrained_, read_vectors, training_words, write_vectors

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
    assert (coverage.as_piece, coverage.as_word) == (2, 1)
    line = coverage.line("src", path)
    assert "3/4 pieces covered (75.0%: 2 as the piece, 1 as the word without \u2581), 50.0% of training tokens" in line
    assert "(glove)" in line


# --- formats: detection, binary, round trips ---------------------------------------------------------------

def random_vectors(count: int, dim: int, seed: int = 0) -> tuple[list[str], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    words = [f"w{i}" for i in range(count - 3)] + [f"{WS}Hund", "Straße", "naïve"]
    return words, torch.randn(count, dim, generator=generator)


@pytest.mark.parametrize("binary", [False, True])
def test_write_then_read_gives_the_same_float32_values_bit_for_bit(tmp_path, binary):
    words, vectors = random_vectors(50, 7)
    vectors[0] = torch.tensor([1e-30, -3.4e38, 0.1, 1 / 3, -0.0, 123456.789, 2 ** -20])  # awkward values
    path = tmp_path / ("v.bin" if binary else "v.txt")
    write_vectors(path, words, vectors, binary=binary)
    assert detect_format(path) == ("word2vec_binary" if binary else "word2vec_text")
    read = read_vectors(path)
    assert list(read) == words  # file order kept
    assert torch.equal(torch.stack([read[w] for w in words]), vectors)


def test_word2vec_binary_as_the_c_tool_and_gensim_write_it(tmp_path):
    """Little-endian float32 after "word "; the C tool ends each vector with a newline, gensim does not."""
    rows = {"haus": [1.0, 2.0, 3.0], f"{WS}hund": [0.5, -1.0, 0.25]}
    for newline in (b"\n", b""):
        path = tmp_path / "v.bin"
        body = b"".join(w.encode() + b" " + np.array(v, dtype="<f4").tobytes() + newline for w, v in rows.items())
        path.write_bytes(b"2 3\n" + body)
        assert detect_format(path) == "word2vec_binary"
        read = read_vectors(path, expected_dim=3)
        assert {w: v.tolist() for w, v in read.items()} == rows


def test_the_format_is_detected_from_the_content(tmp_path):
    assert detect_format(write(tmp_path / "a.txt", "2 3\nhaus 1 2 3\nhund 4 5 6\n")) == "word2vec_text"
    assert detect_format(write(tmp_path / "b.txt", "haus 1 2 3\nhund 4 5 6\n")) == "glove"
    # fastText .vec: a header, and a space at the end of every line
    vec = write(tmp_path / "c.vec", "2 3 \nhaus 1 2 3 \nhund 4 5 6 \n")
    assert detect_format(vec) == "word2vec_text"
    assert read_vectors(vec)["hund"].tolist() == [4, 5, 6]
    # a GloVe file whose first word and vector look like a header stays text with the right format
    assert read_vectors(write(tmp_path / "d.txt", "2 3\n"), fmt="glove") == {"2": torch.tensor([3.0])}


def test_an_explicit_format_that_does_not_fit_is_a_clear_error(tmp_path):
    glove = write(tmp_path / "glove.txt", "haus 1 2 3\n")
    with pytest.raises(NMTError, match=r"glove.txt, line 1: expected the word2vec header.*vectors_format=glove"):
        read_vectors(glove, fmt="word2vec_text")
    with pytest.raises(NMTError, match=r"glove.txt, line 1: expected the word2vec header"):
        read_vectors(glove, fmt="word2vec_binary")


def test_a_word2vec_file_read_as_glove_is_told_to_change_the_format(tmp_path):
    w2v = write(tmp_path / "w2v.txt", "2 3\nhaus 1 2 3\nhund 0.5 -1 2e-1\n")
    with pytest.raises(NMTError, match=r"w2v.txt, line 1: '2 3' is a word2vec header.*vectors_format=word2vec_text"):
        read_vectors(w2v, fmt="glove", expected_dim=3)
    with pytest.raises(NMTError, match=r"w2v.txt, line 1: '2 3' is a word2vec header"):  # found at line 2
        read_vectors(w2v, fmt="glove")


def test_a_text_file_with_fewer_vectors_than_its_header_promises_is_pointed_out(tmp_path, caplog):
    cut = write(tmp_path / "cut.txt", "5 3\nhaus 1 2 3\nhund 0.5 -1 2e-1\n\n")  # a download cut short
    assert read_vectors(cut).keys() == {"haus", "hund"}
    assert "cut.txt: its header promises 5 vectors, but it holds 2" in caplog.text
    caplog.clear()
    read_vectors(write(tmp_path / "whole.txt", "2 3\nhaus 1 2 3\nhund 0.5 -1 2e-1\n\n"))  # a blank last line is no vector
    assert "promises" not in caplog.text


@pytest.mark.parametrize("binary", [False, True])
def test_words_that_are_not_utf8_are_counted_and_pointed_out(tmp_path, caplog, binary):
    words, vectors = ["w0", "Straße", "Hund", "Öl"], torch.randn(4, 3)
    path = tmp_path / "v.vec"
    write_vectors(path, words, vectors, binary=binary)
    path.write_bytes(path.read_bytes().replace("Straße".encode(), "Straße".encode("latin-1"))
                     .replace("Öl".encode(), "Öl".encode("latin-1")))  # a file saved in Latin-1
    read = read_vectors(path)
    assert list(read) == [words[0], "Stra\ufffde", words[2], "\ufffdl"]
    unit, first = ("vector", 2) if binary else ("line", 3)  # the text file's line 1 is its header
    assert f"v.vec: 2 {unit}s are not valid UTF-8 (the first is {unit} {first})" in caplog.text
    assert "iconv" in caplog.text
    caplog.clear()
    write_vectors(path, words, vectors, binary=binary)
    assert list(read_vectors(path)) == words
    assert "UTF-8" not in caplog.text


def test_a_truncated_binary_file_names_the_vector_and_byte(tmp_path):
    words, vectors = random_vectors(5, 4)
    path = tmp_path / "v.bin"
    write_vectors(path, words, vectors, binary=True)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(NMTError, match=r"v.bin: the header promises 5 vectors of dimension 4, but the file ends "
                                       r"inside vector 5 \(byte \d+\)"):
        read_vectors(path)


def test_binary_dimension_mismatch_and_non_finite_values(tmp_path):
    words, vectors = random_vectors(3, 4)
    path = tmp_path / "v.bin"
    write_vectors(path, words, vectors, binary=True)
    with pytest.raises(NMTError, match=r"v.bin, line 1 \(header\): vectors of dimension 4.*dimension 6"):
        read_vectors(path, expected_dim=6)
    nan = write(tmp_path / "nan.txt", "a 1 2\nb nan 2\n")
    with pytest.raises(NMTError, match=r"nan.txt, line 2: the vector of 'b' holds NaN"):
        read_vectors(nan)


# --- matching: lowercase and subword means ---------------------------------------------------------------

PIECES = ["<pad>", "<unk>", "<s>", "</s>", f"{WS}Hund", f"{WS}Katze", "e", "n", f"{WS}Maus", f"{WS}Zebra"]
SPECIAL = {0, 1, 2, 3}


def test_lowercase_matching_is_an_option_and_comes_after_exact_matches(tmp_path):
    path = write(tmp_path / "v.txt", "hund 1 1\nKATZE 2 2\nkatze 3 3\nMaus 4 4\n")
    plain = torch.zeros(len(PIECES), 2)
    coverage = load_pretrained_(plain, PIECES, path, SPECIAL)
    assert coverage.covered == 1 and plain[8].tolist() == [4, 4]  # only "Maus" matches as it is
    lowered = torch.zeros(len(PIECES), 2)
    coverage = load_pretrained_(lowered, PIECES, path, SPECIAL, lowercase=True)
    assert lowered[4].tolist() == [1, 1]  # ▁Hund -> hund
    assert lowered[5].tolist() == [2, 2]  # ▁Katze -> the file's first word that lowercases to katze
    assert lowered[8].tolist() == [4, 4]  # exact still first
    assert (coverage.as_word, coverage.lowercased) == (1, 2)
    assert "2 lowercased" in coverage.line("src", path)


def test_training_words_join_pieces_from_one_word_start_to_the_next():
    # "▁Hund e ▁Katze n" | "e ▁Hund" (a sentence that starts inside a word) | "▁Katze <unk>"
    flat = np.array([4, 6, 5, 7, 6, 4, 5, 1], dtype=np.int32)
    offsets = np.array([0, 4, 6, 8])
    words = training_words(flat, offsets, PIECES, SPECIAL)
    assert words == {"Hunde": (4, 6), "Katzen": (5, 7), "e": (6,), "Hund": (4,)}  # "Katze<unk>" left out


def test_subword_mean_fills_pieces_without_a_vector_from_the_words_using_them(tmp_path):
    path = write(tmp_path / "v.txt", "Hunde 2 0\nKatzen 0 4\nKatze 9 9\nmaus 1 1\n")
    words = {"Hunde": (4, 6), "Katzen": (5, 7), "Katze": (5,), "Maus": (8,), "Mause": (8, 6)}
    weight = torch.full((len(PIECES), 2), -7.0)
    counts = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1, 5])
    coverage = load_pretrained_(weight, PIECES, path, SPECIAL, counts, words=words)
    assert weight[5].tolist() == [9, 9]  # ▁Katze has its own vector: the mean does not replace it
    assert weight[6].tolist() == [2, 0]  # e: only "Hunde" has a vector ("Mause" has none)
    assert weight[7].tolist() == [0, 4]  # n: from "Katzen"
    assert weight[4].tolist() == [2, 0]  # ▁Hund: no vector of its own; "Hunde" uses it
    assert weight[9].tolist() == [-7, -7]  # ▁Zebra: no word with a vector uses it
    assert weight[8].tolist() == [-7, -7]  # ▁Maus: "maus" needs lowercase matching
    assert (coverage.as_word, coverage.subword_mean) == (1, 3)
    assert coverage.token_share == pytest.approx(4 / 10)
    # with lowercasing too, "Maus" and "Mause" (-> maus) supply the mean of ▁Maus and e's second word
    weight = torch.full((len(PIECES), 2), -7.0)
    coverage = load_pretrained_(weight, PIECES, path, SPECIAL, counts, lowercase=True, words=words)
    assert weight[8].tolist() == [1, 1] and coverage.lowercased == 1
    assert weight[6].tolist() == [2, 0]  # "Mause" still has no vector: lowercasing "Mause" gives "mause"
    assert "from the mean of words using them" in coverage.line("src", path)


# --- per side, in the trainer ------------------------------------------------------------------------------

def test_setup_embeddings_reports_coverage_per_side_and_loads_a_shared_table_once(tiny_corpus, tmp_path, caplog):
    from nmt.config import DataConfig, EmbeddingConfig, ModelConfig, SplitFiles, TrainConfig, VocabConfig
    from nmt.data.pipeline import prepare_training_data
    from nmt.model.seq2seq import build_model
    from nmt.train import setup_embeddings

    paths = tiny_corpus["paths"]
    data_cfg = DataConfig(dataset="files", train=SplitFiles(src=str(paths["train_src"]), tgt=str(paths["train_tgt"])),
                          val=SplitFiles(src=str(paths["val_src"]), tgt=str(paths["val_tgt"])),
                          vocab=VocabConfig(size=60))
    data = prepare_training_data(data_cfg, tmp_path, tmp_path / "run", seed=1)
    # a vocabulary this small is mostly short pieces: give vectors to two pieces of each side
    counts = {side: data.token_counts(side) for side in ("src", "tgt")}
    chosen = {side: [int(i) for i in torch.argsort(counts[side], descending=True)[:2]] for side in ("src", "tgt")}
    pieces = {side: [data.vocab.side(side).id_to_piece(i) for i in chosen[side]] for side in ("src", "tgt")}
    german = write(tmp_path / "de.txt", f"{pieces['src'][0]} 1 1\n{pieces['src'][1]} 2 2\n")
    english = write(tmp_path / "en.txt", f"{pieces['tgt'][0]} 3 3\n{pieces['tgt'][1]} 4 4\n")

    def setup(**model) -> tuple[object, list[str]]:
        cfg = TrainConfig(data=data_cfg, model=ModelConfig(embedding_dim=2, hidden_size=3, **model))
        net = build_model(cfg.model, data.vocab.size("src"), data.vocab.size("tgt"))
        caplog.clear()
        with caplog.at_level("INFO", logger="nmt"):
            setup_embeddings(net, cfg, data)
        return net, [r.getMessage() for r in caplog.records if r.getMessage().startswith("coverage:")]

    net, lines = setup(embeddings=EmbeddingConfig(src_vectors=str(german), tgt_vectors=str(english)))
    assert [line.split()[1] for line in lines] == ["src", "tgt"]
    for side, line in zip(("src", "tgt"), lines):
        share = float(counts[side][chosen[side]].sum() / counts[side].sum())
        assert f"2/{data.vocab.size(side) - 4} pieces covered" in line and f"{100 * share:.1f}% of training" in line
    assert net.src_embed.weight[chosen["src"][1]].tolist() == [2, 2]
    assert net.tgt_embed.weight[chosen["tgt"][0]].tolist() == [3, 3]
    assert "rows stay at their random initial values" not in caplog.text  # trainable: nothing to point out
    net, lines = setup(tie_src_tgt=True, embeddings=EmbeddingConfig(src_vectors=str(german), tgt_vectors=str(german)))
    assert len(lines) == 1 and lines[0].startswith("coverage: src vectors")  # one shared table: loaded once
    assert net.tgt_embed.weight[chosen["src"][1]].tolist() == [2, 2]
    # frozen, with vectors for two pieces: most training tokens keep random rows for good, and the log says so
    setup(embeddings=EmbeddingConfig(src_vectors=str(german), freeze="src"))
    share = float(counts["src"][chosen["src"]].sum() / counts["src"].sum())
    assert (f"model.embeddings.freeze=src: {100 * (1 - share):.1f}% of the src training tokens are pieces without a "
            f"vector") in caplog.text
    setup(embeddings=EmbeddingConfig(src_vectors=str(german), freeze="src", unfreeze_after=5))
    assert "rows stay at their random initial values" not in caplog.text  # they will train later


def test_an_empty_or_compressed_vectors_file_is_named_with_what_to_do(tmp_path):
    import gzip

    for text in ("", "\n\n"):
        with pytest.raises(NMTError, match=r"empty.vec holds no vectors \(it is empty\)"):
            read_vectors(write(tmp_path / "empty.vec", text))
    packed = tmp_path / "v.vec.gz"
    packed.write_bytes(gzip.compress("haus 1 2 3\n".encode()))
    with pytest.raises(NMTError, match=r"v.vec.gz is gzip-compressed; .* \(gunzip v.vec.gz\)"):
        read_vectors(packed)
