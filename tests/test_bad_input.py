"""Bad input fed to the real console scripts: a one-paragraph error naming the file, line or key (exit 2, no
traceback), or a counted, logged skip that keeps the pairs aligned. The README's troubleshooting table
lists these cases and their messages."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import run_cli, script_path
from nmt.config import TranslateOptions
from nmt.run import load_trained
from nmt.translate import Session, _read_chunks

PAIRS = 200
# A tiny model and two steps: these runs only have to get through the data and one validation.
TINY = ["experiment=files", "model.hidden_size=16", "model.embedding_dim=8", "data.vocab.size=300",
        "trainer.max_steps=2", "trainer.device=cpu", "data.val_limit=10"]


@pytest.fixture(scope="module")
def corpus(shared_data_dir, tmp_path_factory) -> Path:
    """train.{de,en} (200 pairs) and val.{de,en} (20 pairs) cut from Multi30k."""
    folder = tmp_path_factory.mktemp("bad_input")
    for split, stem, count in (("train", "train", PAIRS), ("val", "val", 20)):
        for lang in ("de", "en"):
            lines = (shared_data_dir / "multi30k" / f"{stem}.{lang}").read_text(encoding="utf-8").splitlines()
            (folder / f"{split}.{lang}").write_text("\n".join(lines[:count]) + "\n", encoding="utf-8")
    return folder


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def nmt_train(corpus: Path, run_dir: Path, train_src: Path, train_tgt: Path | None = None, *extra: str):
    train = [f"data.train.tsv={train_src}"] if train_tgt is None else \
        [f"data.train.src={train_src}", f"data.train.tgt={train_tgt}"]
    return run_cli("nmt-train", *TINY, *train, f"data.val.src={corpus / 'val.de'}",
                   f"data.val.tgt={corpus / 'val.en'}", f"paths.run_dir={run_dir}", *extra)


def assert_clean_error(out: subprocess.CompletedProcess, *fragments: str) -> None:
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    message = out.stderr.strip().splitlines()[-1]  # progress lines may come first; the error is one paragraph
    assert message.startswith("nmt: error:"), out.stderr[-3000:]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def assert_trained(out: subprocess.CompletedProcess, pairs: int) -> None:
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert f"data: {pairs} training pairs" in out.stderr


# --- training data ---------------------------------------------------------------------------------------------

def test_different_line_counts_name_both_files_and_counts(corpus, tmp_path):
    short = write_lines(tmp_path / "short.en", lines_of(corpus / "train.en")[:150])
    out = nmt_train(corpus, tmp_path / "run", corpus / "train.de", short)
    assert_clean_error(out, "not line-aligned", str(corpus / "train.de"), "200 lines", str(short), "has 150")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_missing_empty_line_is_caught_not_misaligned(corpus, tmp_path):
    lines = lines_of(corpus / "train.en")
    dropped = write_lines(tmp_path / "train.en", lines[:50] + lines[51:])  # someone deleted one line
    out = nmt_train(corpus, tmp_path / "run", corpus / "train.de", dropped)
    assert_clean_error(out, "not line-aligned", "has 199")


def test_invalid_utf8_names_file_and_line_and_replace_counts_it(corpus, tmp_path):
    lines = lines_of(corpus / "train.de")
    lines[6] = "Ein Mädchen in Grün".encode("latin-1")
    latin = write_lines(tmp_path / "train.de", lines)
    out = nmt_train(corpus, tmp_path / "run", latin, corpus / "train.en")
    assert_clean_error(out, str(latin), "line 7", "data.on_decode_error=replace")
    out = nmt_train(corpus, tmp_path / "run2", latin, corpus / "train.en", "data.on_decode_error=replace")
    assert_trained(out, PAIRS)
    assert out.stderr.count("replaced invalid UTF-8 on 1 line") == 1  # read twice (SentencePiece, encoding), said once
    out = nmt_train(corpus, tmp_path / "run3", latin, corpus / "train.en", "data.on_decode_error=replace")
    assert_trained(out, PAIRS)  # from the cache, without reading the text: the warning comes from the entry
    assert "reusing cache" in out.stderr and out.stderr.count("replaced invalid UTF-8 on 1 line") == 1
    assert "replaced invalid UTF-8 on 1 line" in (tmp_path / "run3" / "train.log").read_text(encoding="utf-8")


def test_crlf_bom_nul_and_unicode_separators_keep_pairs_aligned(corpus, tmp_path):
    src, tgt = lines_of(corpus / "train.de"), lines_of(corpus / "train.en")
    src = [line + b"\r" for line in src]  # CRLF endings on one side only
    src[0] = b"\xef\xbb\xbf" + src[0]  # a byte-order mark
    src[10] = src[10].replace(b" ", b"\x00", 1)  # a NUL byte
    src[20] = src[20].replace(b" ", "\u2028".encode(), 1)  # LINE SEPARATOR inside a line
    tgt[30] = tgt[30].replace(b" ", "\u2029".encode(), 1)  # PARAGRAPH SEPARATOR
    tgt[40] = tgt[40].replace(b" ", b"\x85", 1).decode("latin-1").encode()  # NEXT LINE (U+0085)
    tgt[50] = tgt[50] + b"\x0b\x0c"  # vertical tab and form feed
    out = nmt_train(corpus, tmp_path / "run", write_lines(tmp_path / "odd.de", src),
                    write_lines(tmp_path / "odd.en", tgt))
    assert_trained(out, PAIRS)  # 200 in, 200 pairs: nothing split a line, nothing was dropped


def test_tsv_lines_without_one_tab_are_named_and_skip_counts_them(corpus, tmp_path):
    src, tgt = lines_of(corpus / "train.de"), lines_of(corpus / "train.en")
    rows = [s + b"\t" + t for s, t in zip(src, tgt)]
    rows[4] = src[4] + b" " + tgt[4]  # no tab
    rows[9] = src[9] + b"\t" + tgt[9] + b"\textra"  # two tabs
    tsv = write_lines(tmp_path / "train.tsv", rows)
    out = nmt_train(corpus, tmp_path / "run", tsv)
    assert_clean_error(out, str(tsv), "lines 5, 10", "data.on_bad_line=skip")
    out = nmt_train(corpus, tmp_path / "run2", tsv, None, "data.on_bad_line=skip")
    assert_trained(out, PAIRS - 2)
    assert "skipped 2 line(s)" in out.stderr


def test_bad_test_data_stops_the_start_of_training_not_the_evaluation_after_it(corpus, tmp_path):
    # nmt-evaluate would find these only after the whole run; nothing may be trained or recorded first
    rows = [s + b"\t" + t for s, t in zip(lines_of(corpus / "val.de"), lines_of(corpus / "val.en"))]
    rows[2] = rows[2].replace(b"\t", b" ")
    out = nmt_train(corpus, tmp_path / "run", corpus / "train.de", corpus / "train.en",
                    f"data.test.tsv={write_lines(tmp_path / 'test.tsv', rows)}")
    assert_clean_error(out, f"{tmp_path / 'test.tsv'}: 1 line(s) do not have exactly one tab (line 3)")
    assert not (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "spm.joint.model").exists()
    (tmp_path / "empty.de").write_text("")
    out = nmt_train(corpus, tmp_path / "run2", corpus / "train.de", corpus / "train.en",
                    f"data.test.src={tmp_path / 'empty.de'}", f"data.test.tgt={tmp_path / 'empty.de'}")
    assert_clean_error(out, "The test data", "is empty, so nmt-evaluate would have nothing to score")
    out = nmt_train(corpus, tmp_path / "run3", corpus / "train.de", corpus / "train.en",
                    f"data.test.src={corpus / 'val.de'}", f"data.test.tgt={corpus / 'train.en'}")
    assert_clean_error(out, "not line-aligned", "val.de has 20 lines", "train.en has 200")
    out = nmt_train(corpus, tmp_path / "run4", corpus / "train.de", corpus / "train.en",
                    f"data.test.src={corpus / 'val.de'}", f"data.test.tgt={corpus / 'val.en'}")
    assert_trained(out, PAIRS)
    assert "test data: 20 pairs" in out.stderr


def test_a_one_megabyte_line_is_filtered_and_counted(corpus, tmp_path):
    src, tgt = lines_of(corpus / "train.de"), lines_of(corpus / "train.en")
    src[100] = b"Ein Mann " * 120_000  # about 1 MB
    out = nmt_train(corpus, tmp_path / "run", write_lines(tmp_path / "long.de", src),
                    write_lines(tmp_path / "long.en", tgt))
    assert_trained(out, PAIRS - 1)
    assert "too_long: 1" in out.stderr


def test_a_missing_file_names_the_path_and_its_key(corpus, tmp_path):
    missing = tmp_path / "nowhere" / "train.de"
    out = nmt_train(corpus, tmp_path / "run", missing, corpus / "train.en")
    assert_clean_error(out, f"data.train.src={missing}: there is no such file")


def test_a_directory_where_a_file_belongs_names_it_and_its_key(corpus, tmp_path):
    out = nmt_train(corpus, tmp_path / "run", corpus / "train.de", corpus)
    assert_clean_error(out, f"data.train.tgt={corpus} is a directory; data.train.tgt takes a text file")


def test_a_corpus_empty_after_filtering_names_the_limits(corpus, tmp_path):
    out = nmt_train(corpus, tmp_path / "run", corpus / "train.de", corpus / "train.en", "data.max_len=2")
    assert_clean_error(out, "No training pairs are left after filtering", "data.max_len=2")


def test_a_corpus_of_empty_lines_is_a_clean_error(corpus, tmp_path):
    blank = write_lines(tmp_path / "blank.de", [b""] * PAIRS)
    out = nmt_train(corpus, tmp_path / "run", blank, corpus / "train.en")
    assert_clean_error(out, "no pairs with text on both sides")


# --- pretrained vectors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, fragments", [
    ("2 8\nMann " + " ".join(["0.1"] * 8) + "\nHund 0.1 0.2 zwei\n", ["line 3", "followed by 8 numbers"]),
    ("Mann " + " ".join(["0.1"] * 8) + "\nHund " + " ".join(["0.1"] * 5) + "\n", ["line 2"]),
    ("Mann " + " ".join(["0.1"] * 6) + "\n", ["dimension 6", "8"]),
], ids=["garbage", "ragged", "wrong-dimension"])
def test_bad_vectors_files_name_file_and_line(corpus, tmp_path, content, fragments):
    vectors = tmp_path / "vectors.txt"
    vectors.write_text(content, encoding="utf-8")
    out = nmt_train(corpus, tmp_path / "run", corpus / "train.de", corpus / "train.en",
                    f"model.embeddings.src_vectors={vectors}")
    assert_clean_error(out, str(vectors), *fragments)


def test_a_missing_vectors_file_names_it(corpus, tmp_path):
    out = nmt_train(corpus, tmp_path / "run", corpus / "train.de", corpus / "train.en",
                    f"model.embeddings.src_vectors={tmp_path / 'none.vec'}")
    assert_clean_error(out, "none.vec (model.embeddings.src_vectors) does not exist")
    assert not list((tmp_path / "run").glob("spm.*"))  # refused before the vocabulary was trained
    out = nmt_train(corpus, tmp_path / "run", corpus / "train.de", corpus / "train.en",
                    f"model.embeddings.tgt_vectors={tmp_path}")
    assert_clean_error(out, f"{tmp_path} (model.embeddings.tgt_vectors) is a directory, not a vectors file")


# --- an existing run directory ---------------------------------------------------------------------------------

def test_a_run_directory_holding_another_run_is_refused(corpus, tmp_path):
    run_dir = tmp_path / "run"
    assert_trained(nmt_train(corpus, run_dir, corpus / "train.de", corpus / "train.en"), PAIRS)
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    out = nmt_train(corpus, run_dir, corpus / "train.de", corpus / "train.en", "model.hidden_size=32")
    assert_clean_error(out, str(run_dir), "already holds a run", "trainer.resume=true")
    out = nmt_train(corpus, run_dir, corpus / "train.de", corpus / "train.en", "model.hidden_size=32",
                    "trainer.resume=true")
    assert_clean_error(out, "model.hidden_size")
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()} == before  # nothing touched


def test_resume_with_nothing_to_resume_says_so_on_the_console_and_in_the_run_log(corpus, tmp_path):
    run_dir = tmp_path / "run"
    out = nmt_train(corpus, run_dir, corpus / "train.de", corpus / "train.en", "trainer.resume=true")
    assert_trained(out, PAIRS)
    said = f"trainer.resume=true but {run_dir} holds no run yet; starting from the beginning"
    assert said in out.stderr
    started, first = [line.split(" ", 2)[2] for line in (run_dir / "train.log").read_text(encoding="utf-8").splitlines()[:2]]
    assert started.startswith("INFO started in ") and "nmt-train experiment=files" in started
    assert first == f"WARNING {said}"


# --- evaluation and translation --------------------------------------------------------------------------------

def test_an_evaluation_reference_with_the_wrong_line_count(debug_run, tmp_path):
    src, ref = tmp_path / "src.txt", tmp_path / "ref.txt"
    src.write_text("Ein Hund.\nZwei Katzen.\nEin Haus.\n", encoding="utf-8")
    ref.write_text("A dog.\nTwo cats.\n", encoding="utf-8")
    out = run_cli("nmt-evaluate", f"run={debug_run}", f"eval.src={src}", f"eval.ref={ref}")
    assert_clean_error(out, str(src), "3 lines", str(ref), "has 2")


GARBAGE = [bytes(range(256)).replace(b"\n", b""), b"\x00\x00\x00", b"\xff\xfe\xfd\xfc", b"\x1b[31mrot\x1b[0m",
           b"\r", b"Ein Mann\x07\x08 f\xc3\xa4hrt.", b"\xc3", "Ünïcödé ☃".encode()]


def test_binary_garbage_into_nmt_translate_gives_one_line_per_line(debug_run):
    out = subprocess.run(["nmt-translate", f"run={debug_run}"], input=b"\n".join(GARBAGE) + b"\n",
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert b"Traceback" not in out.stderr
    outputs = out.stdout.decode("utf-8").split("\n")
    assert outputs[-1] == "" and len(outputs) - 1 == len(GARBAGE)


def test_garbage_is_translated_as_its_cleaned_text(debug_run):
    """What the model reads of each line: NUL dropped, other control characters read as spaces, spaces squeezed,
    invalid bytes read as U+FFFD; a line left empty is not decoded, and gets an empty line."""
    device = torch.device("cpu")
    session = Session(load_trained(debug_run, "best", device), TranslateOptions(), device)
    lines = [line for chunk in _read_chunks(io.BytesIO(b"\n".join(GARBAGE) + b"\r\n")) for line in chunk]
    results = session.translate(lines)
    assert [result.source for result in results[1:]] == [
        "", "\ufffd" * 4, "[31mrot [0m", "", "Ein Mann fährt.", "\ufffd", "Ünïcödé ☃"]
    assert results[0].source == bytes(range(0x21, 0x7F)).decode() + " " + "\ufffd" * 128  # 1-0x20 lead, 0x7F: DEL
    # SentencePiece's normalisation drops U+FFFD, so a line of invalid bytes alone is empty too
    assert [bool(result.hypotheses) for result in results] == [True, False, False, True, False, True, False, True]
    expected = session.run.vocab.id_to_piece(session.run.vocab.encode(["Ein Mann fährt."], "src")[0], "src")
    assert results[5].src_pieces == expected + ["</s>"]


# --- paths the user gives that cannot be written, and damaged run directories ----------------------------------

def test_a_start_that_failed_leaves_no_vocabulary_the_next_start_reuses(corpus, tmp_path):
    run = tmp_path / "run"
    empty = tmp_path / "empty"
    empty.write_text("", encoding="utf-8")
    out = run_cli("nmt-train", *TINY, f"data.train.src={corpus / 'train.de'}", f"data.train.tgt={corpus / 'train.en'}",
                  f"data.val.src={empty}", f"data.val.tgt={empty}", f"paths.run_dir={run}",
                  f"paths.cache_dir={tmp_path / 'cache'}")
    assert_clean_error(out, "The validation data", "is empty")
    assert (run / "spm.joint.model").is_file()  # trained before the dev file was read
    out = nmt_train(corpus, run, corpus / "train.de", corpus / "train.en", "data.vocab.size=250",
                    f"paths.cache_dir={tmp_path / 'cache'}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert len((run / "spm.joint.vocab").read_text(encoding="utf-8").splitlines()) == 250


def test_relative_data_paths_are_kept_absolute_for_evaluation_elsewhere_and_resuming(corpus, tmp_path):
    import os
    import shutil

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    (work / "corpus").mkdir(parents=True)
    elsewhere.mkdir()
    for name in ("train.de", "train.en", "val.de", "val.en"):
        shutil.copy(corpus / name, work / "corpus" / name)
    shutil.copy(corpus / "val.de", work / "corpus" / "test.de")
    shutil.copy(corpus / "val.en", work / "corpus" / "test.en")
    relative = [f"data.{split}.{side}=corpus/{split}.{lang}" for split in ("train", "val", "test")
                for side, lang in (("src", "de"), ("tgt", "en"))]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}

    def cli(*args, cwd):
        return subprocess.run([script_path(args[0]), *args[1:]], capture_output=True, text=True, cwd=cwd, env=env,
                              timeout=300)

    out = cli("nmt-train", *TINY, *relative, "paths.run_dir=run", cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    saved = (work / "run" / "config.yaml").read_text(encoding="utf-8")
    assert f"src: {work / 'corpus' / 'train.de'}" in saved and "tsv: null" in saved
    out = cli("nmt-evaluate", f"run={work / 'run'}", "eval.beam_size=1", cwd=elsewhere)  # the run's test split
    assert out.returncode == 0, out.stderr[-3000:]
    absolute = [setting.replace("=corpus/", f"={work / 'corpus'}/") for setting in relative]
    out = cli("nmt-train", *TINY, *absolute, "paths.run_dir=run", "trainer.resume=true", "trainer.max_steps=3",
              cwd=work)  # the same files, spelled otherwise
    assert out.returncode == 0, out.stderr[-3000:]


def test_a_run_dir_that_is_a_file_is_named(corpus, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory\n", encoding="utf-8")
    for run_dir, reason in ((blocker, "File exists"), (blocker / "sub", "Not a directory")):
        out = nmt_train(corpus, run_dir, corpus / "train.de", corpus / "train.en")
        assert_clean_error(out, f"paths.run_dir={run_dir}", reason)


def test_unwritable_translate_outputs_are_named(debug_run, tmp_path):
    source = tmp_path / "in.de"
    source.write_text("Ein Hund.\n", encoding="utf-8")
    blocker = tmp_path / "afile"
    blocker.write_text("x\n", encoding="utf-8")
    for setting in (f"translate.output={tmp_path / 'missing' / 'out.en'}", f"translate.output={tmp_path}",
                    f"translate.attention_dir={blocker / 'attn'}"):
        out = run_cli("nmt-translate", f"run={debug_run}", f"translate.input={source}", setting)
        assert_clean_error(out, setting)


def damaged_copy(debug_run: Path, tmp_path: Path, name: str, content: bytes, append: bool = False) -> Path:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(debug_run, run)
    target = run / name
    target.write_bytes((target.read_bytes() if append else b"") + content)
    return run


@pytest.mark.parametrize("name, content, append, fragments", [
    ("config.yaml", b"model: [unclosed\n", True, ["config.yaml", "not valid YAML", "line"]),
    ("spm.joint.model", b"\x08\x01garbage", False, ["spm.joint.model", "not a SentencePiece model"]),
    ("checkpoints/best.pt", bytes(range(256)) * 20, False, ["best.pt", "truncated or corrupted"]),
])
def test_a_damaged_run_directory_is_named(debug_run, tmp_path, name, content, append, fragments):
    run = damaged_copy(debug_run, tmp_path, name, content, append)
    for command in ("nmt-evaluate", "nmt-translate"):
        out = subprocess.run([script_path(command), f"run={run}"], input="Ein Hund.\n", capture_output=True, text=True,
                             timeout=300)
        assert_clean_error(out, *fragments)
        assert "objects other than tensors" not in out.stderr  # random bytes are damage, not an unsafe pickle


def test_a_checkpoint_of_another_model_names_the_keys_that_differ(debug_run, tmp_path):
    import shutil

    import torch

    run = tmp_path / "run"
    shutil.copytree(debug_run, run)
    state = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    dropped = sorted(state["model"])[0]
    del state["model"][dropped]
    torch.save(state, run / "checkpoints" / "best.pt")
    out = run_cli("nmt-evaluate", f"run={run}")
    assert_clean_error(out, "best.pt does not fit the model", "Missing key(s)", dropped)
