"""Reading parallel text: line splitting, decoding errors, alignment, filters and the held-out split."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from nmt.config import DataConfig, SplitFiles
from nmt.data.corpus import (FilterReport, ParallelText, clean_line, drop_empty, heldout_split, length_filter,
                             load_splits, read_lines, read_parallel, read_tsv, training_source, tutorial_filter)
from nmt.console import setup_logging
from nmt.errors import NMTError


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# --- read_lines ------------------------------------------------------------------------------------------

def test_crlf_endings_are_stripped(tmp_path):
    path = write(tmp_path / "a.txt", b"one\r\ntwo\r\nthree\r\n")
    assert read_lines(path) == ["one", "two", "three"]


def test_bom_is_dropped(tmp_path):
    path = write(tmp_path / "a.txt", "\ufeffHallo Welt\nzwei\n".encode("utf-8"))
    assert read_lines(path) == ["Hallo Welt", "zwei"]


def test_nul_bytes_do_not_split_lines(tmp_path):
    path = write(tmp_path / "a.txt", b"ab\x00cd\nef\n")
    assert read_lines(path) == ["abcd", "ef"]


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085", "\r", "\x0b", "\x0c"])
def test_unicode_and_stray_separators_inside_a_line_do_not_split_it(tmp_path, separator):
    path = write(tmp_path / "a.txt", f"Ein Kind{separator}mit Ball.\nzweite Zeile\n".encode("utf-8"))
    lines = read_lines(path)
    assert len(lines) == 2
    assert lines[0].split() == ["Ein", "Kind", "mit", "Ball."]
    assert lines[1] == "zweite Zeile"


def test_last_line_without_newline_and_empty_lines_are_kept(tmp_path):
    path = write(tmp_path / "a.txt", b"a\n\n  b   c \nlast")
    assert read_lines(path) == ["a", "", "b c", "last"]


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = write(tmp_path / "latin1.txt", "gut\nso schön\n".encode("latin-1"))
    with pytest.raises(NMTError) as error:
        read_lines(path)
    message = str(error.value)
    assert "latin1.txt" in message and "line 2" in message and "on_decode_error=replace" in message


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le"])
def test_a_utf16_file_is_told_to_convert_from_utf16_not_latin1(tmp_path, encoding):
    path = write(tmp_path / "wide.txt", "Ein Hund grüßt.\nZwei Katzen.\n".encode(encoding))  # without a BOM: ü fails
    with pytest.raises(NMTError) as error:
        read_lines(path)
    assert "wide.txt, line 1: invalid UTF-8" in str(error.value)
    assert "looks like UTF-16: convert it (iconv -f utf-16 -t utf-8)" in str(error.value)
    assert "latin1" not in str(error.value)


def test_replace_mode_substitutes_bad_bytes(tmp_path, caplog):
    path = write(tmp_path / "latin1.txt", "gut\nso schön\n".encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="nmt"):
        lines = read_lines(path, on_decode_error="replace")
    assert lines == ["gut", "so sch\ufffdn"]
    assert "replaced invalid UTF-8 on 1 line" in caplog.text


def test_missing_file_and_directory_are_clear_errors(tmp_path):
    with pytest.raises(NMTError, match="does not exist"):
        read_lines(tmp_path / "nope.txt")
    with pytest.raises(NMTError, match="is a directory"):
        read_lines(tmp_path)


def test_clean_line_turns_control_characters_into_spaces():
    assert clean_line("\ufeff a\x01b\x7fc\x9fd \t e ") == "a b c d e"


# --- read_parallel ---------------------------------------------------------------------------------------

def test_read_parallel_keeps_alignment_through_odd_characters(tmp_path):
    src = write(tmp_path / "s.de", "eins\u2028a\r\nzwei\x00\ndrei\n".encode("utf-8"))
    tgt = write(tmp_path / "t.en", b"one\ntwo\nthree\n")
    text = read_parallel(src, tgt)
    assert len(text) == 3
    assert text.tgt == ["one", "two", "three"]
    assert text.src[1] == "zwei" and text.src[2] == "drei"


def test_read_parallel_with_different_line_counts_names_both_files_and_counts(tmp_path):
    src = write(tmp_path / "left.de", b"a\nb\nc\n")
    tgt = write(tmp_path / "right.en", b"a\nb\n")
    with pytest.raises(NMTError) as error:
        read_parallel(src, tgt)
    message = str(error.value)
    assert "left.de" in message and "right.en" in message
    assert "3 lines" in message and "has 2" in message


# --- read_tsv --------------------------------------------------------------------------------------------

def test_read_tsv_columns(tmp_path):
    path = write(tmp_path / "p.tsv", "Go.\tVa !\nHi.\tSalut !\n".encode("utf-8"))
    forward = read_tsv(path)
    assert forward.src == ["Go.", "Hi."] and forward.tgt == ["Va !", "Salut !"]
    backward = read_tsv(path, src_column=1)
    assert backward.src == ["Va !", "Salut !"] and backward.tgt == ["Go.", "Hi."]


def test_read_tsv_bad_lines_are_an_error_naming_them(tmp_path):
    path = write(tmp_path / "p.tsv", b"a\tb\nno tab here\nx\ty\tz\nc\td\n")
    with pytest.raises(NMTError) as error:
        read_tsv(path)
    message = str(error.value)
    assert "p.tsv" in message and "2 line(s)" in message and "lines 2, 3" in message
    assert "on_bad_line=skip" in message


def test_read_tsv_skip_drops_bad_lines_and_keeps_pairs_aligned(tmp_path, caplog):
    path = write(tmp_path / "p.tsv", b"a\tb\nno tab here\nx\ty\tz\nc\td\n")
    with caplog.at_level(logging.WARNING, logger="nmt"):
        text = read_tsv(path, on_bad_line="skip")
    assert text.src == ["a", "c"] and text.tgt == ["b", "d"]
    assert "skipped 2 line(s)" in caplog.text


def test_a_file_read_twice_warns_once_on_the_console_and_in_the_log(tmp_path, capsys):
    # training text is read for SentencePiece, then to encode it: the same warning twice says nothing new
    path = write(tmp_path / "p.tsv", b"a\tb\nno tab here\nc\td\n")
    latin = write(tmp_path / "l.txt", "Gr\u00fcn\n".encode("latin-1"))
    log_file = tmp_path / "run" / "train.log"
    try:
        setup_logging(log_file)
        for _ in range(3):
            read_tsv(path, on_bad_line="skip")
            read_lines(latin, on_decode_error="replace")
        logging.getLogger("nmt.data").warning("said twice")
        logging.getLogger("nmt.data").warning("said twice")  # only warnings marked ONCE are merged
        setup_logging(log_file)  # a new command (or run) says it again
        read_tsv(path, on_bad_line="skip")
    finally:
        setup_logging()
    err = capsys.readouterr().err.splitlines()
    logged = [line.split(" ", 3)[3] for line in log_file.read_text(encoding="utf-8").splitlines()]
    skipped = f"{path}: skipped 1 line(s) without exactly one tab (line 2)"
    expected = [skipped, f"{latin}: replaced invalid UTF-8 on 1 line(s)", "said twice", "said twice", skipped]
    assert err == expected and logged == expected


def test_files_dataset_reads_tsv_and_two_file_splits(tiny_corpus):
    paths = tiny_corpus["paths"]
    cfg = DataConfig(dataset="files", src_lang="de", tgt_lang="en",
                     train=SplitFiles(tsv=str(paths["train_tsv"])),
                     val=SplitFiles(src=str(paths["val_src"]), tgt=str(paths["val_tgt"])))
    splits = load_splits(cfg, tiny_corpus["dir"], ("train", "val"))
    assert splits["train"].src == tiny_corpus["src"] and splits["train"].tgt == tiny_corpus["tgt"]
    assert len(splits["val"]) == 4


# --- cleaning and filters --------------------------------------------------------------------------------

def test_drop_empty_drops_whole_pairs():
    text = ParallelText(["a", "", "c", "d"], ["A", "B", "", "D"])
    report = FilterReport()
    kept = drop_empty(text, report)
    assert kept.src == ["a", "d"] and kept.tgt == ["A", "D"]
    assert report.dropped["empty"] == 2


def test_length_filter_rules():
    cfg = DataConfig(min_len=2, max_len=10, max_len_ratio=2.0)
    ids = lambda n: list(range(4, 4 + n))  # noqa: E731
    pairs = [
        (3, 3),    # kept
        (1, 3),    # too short (source below min_len)
        (3, 1),    # too short (target)
        (11, 8),   # too long
        (3, 11),   # too long beats ratio
        (2, 5),    # ratio 2.5 > 2 and longer > 3 -> length_ratio
        (2, 3),    # ratio 1.5: kept
        (2, 4),    # ratio exactly 2: kept
        (10, 10),  # at max_len: kept
    ]
    report = FilterReport()
    keep = length_filter([ids(s) for s, _ in pairs], [ids(t) for _, t in pairs], cfg, report)
    assert keep == [0, 6, 7, 8]
    assert report.kept == 4
    assert report.dropped == {"too_short": 2, "too_long": 2, "length_ratio": 1}


def test_length_filter_ratio_spares_very_short_pairs():
    cfg = DataConfig(min_len=1, max_len=100, max_len_ratio=1.5)
    report = FilterReport()
    # 1 vs 3 is a ratio of 3, but pairs up to 3 pieces are never dropped for their ratio
    assert length_filter([[5]], [[5, 6, 7]], cfg, report) == [0]
    assert length_filter([[5]], [[5, 6, 7, 8]], cfg, report) == []
    assert report.dropped["length_ratio"] == 1


def test_tutorial_filter():
    english = ["I am cold.", "He's tall.", "You're right!", "The cat is black.",
               "I am a very long sentence with far too many words in it.", "they are here"]
    french = ["J'ai froid.", "Il est grand.", "Tu as raison !", "Le chat est noir.", "Court.",
              "Ils sont ici " + "très " * 10]
    assert tutorial_filter(english, french) == [0, 1, 2]


def test_heldout_split_is_stable_and_roughly_proportional():
    sentences = [f"sentence number {i}" for i in range(20_000)]
    first = [heldout_split(s, 0.05) for s in sentences]
    assert first == [heldout_split(s, 0.05) for s in sentences]
    shares = {name: first.count(name) / len(first) for name in ("train", "val", "test")}
    assert shares["test"] == pytest.approx(0.05, abs=0.01)
    assert shares["val"] == pytest.approx(0.05, abs=0.01)
    # a larger fraction only moves pairs out of train, never between val and test the other way
    wider = [heldout_split(s, 0.1) for s in sentences]
    assert all(w == "test" for f, w in zip(first, wider) if f == "test")
    assert heldout_split("anything", 0.0) == "train"


def test_tatoeba_duplicates_never_straddle_splits(shared_data_dir):
    cfg = DataConfig(dataset="tatoeba", src_lang="fr", tgt_lang="en", tutorial_filter=True, heldout_fraction=0.05)
    splits = load_splits(cfg, shared_data_dir)
    english = {name: set(split.tgt) for name, split in splits.items()}
    assert english["train"] and english["val"] and english["test"]
    assert not english["train"] & english["val"] and not english["train"] & english["test"]
    assert not english["val"] & english["test"]
    assert all(len(s.split(" ")) < 10 for s in splits["train"].tgt)


@pytest.mark.parametrize("limit", [0, 500])
def test_the_progress_bars_of_tatoeba_count_its_training_pairs_not_the_file_lines(shared_data_dir, limit):
    cfg = DataConfig(dataset="tatoeba", src_lang="fr", tgt_lang="en", tutorial_filter=True, train_limit=limit)
    source = training_source(cfg, shared_data_dir)
    pairs = sum(1 for _ in source.pairs())
    assert pairs == (limit or len(load_splits(cfg, shared_data_dir, ("train",))["train"]))
    assert source.approximate_size() == pairs and sum(1 for _ in source.pairs()) == pairs  # and read again


def test_a_download_without_network_says_where_the_file_goes(tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    from nmt.data.sources import multi30k_paths

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network here")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NMTError) as error:
        multi30k_paths(Path("data"), "val", "de", "en")
    message = str(error.value)
    assert "Could not download" in message and "no network here" in message
    assert str(tmp_path / "data" / "multi30k" / "val.de") in message  # absolute: the folder it looked in
    assert "paths.data_dir=../shared/data for nmt-train, data_dir=../shared/data for nmt-evaluate" in message
    assert not list(tmp_path.rglob("val.*"))  # nothing half-written
