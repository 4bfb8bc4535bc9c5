"""The encoded-corpus cache: the memory map equals the in-memory encoding, a second run reuses it without
encoding, a changed input makes a new entry, and worker processes encode exactly as one process does."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import debug_files_overrides, run_cli
from nmt.config import DataConfig, SplitFiles, VocabConfig
from nmt.data import cache, pipeline
from nmt.data.batching import EncodedCorpus
from nmt.data.corpus import FilterReport, drop_empty, length_filter, read_parallel, training_source
from nmt.data.encode import encode_chunks
from nmt.data.pipeline import prepare_training_data
from nmt.data.vocab import model_files
from nmt.errors import NMTError


def files_config(paths: dict, **extra) -> DataConfig:
    return DataConfig(dataset="files", src_lang="de", tgt_lang="en",
                      train=SplitFiles(src=str(paths["train_src"]), tgt=str(paths["train_tgt"])),
                      val=SplitFiles(src=str(paths["val_src"]), tgt=str(paths["val_tgt"])),
                      vocab=VocabConfig(size=60), **extra)


@pytest.fixture
def corpus_files(tiny_corpus) -> dict:
    """tiny_corpus's training files with an empty pair and an over-long pair added, so filters have work."""
    paths = tiny_corpus["paths"]
    with open(paths["train_src"], "a", encoding="utf-8") as src, open(paths["train_tgt"], "a", encoding="utf-8") as tgt:
        src.write("\nEin Satz.\n" + "sehr " * 120 + "lang.\n")
        tgt.write("A sentence without a source.\n\n" + "very " * 120 + "long.\n")
    return tiny_corpus


def arrays(corpus: EncodedCorpus) -> dict[str, list]:
    return {name: np.asarray(getattr(corpus, name)).tolist()
            for name in ("src_flat", "src_offsets", "tgt_flat", "tgt_offsets")}


def entry_files(cache_dir: Path, prefix: str) -> list[Path]:
    return sorted(p for entry in cache_dir.glob(f"{prefix}-*") for p in entry.iterdir())


def test_the_memory_mapped_corpus_equals_the_in_memory_encoding(corpus_files, tmp_path, caplog):
    cfg = files_config(corpus_files["paths"], max_len=50)
    with caplog.at_level(logging.INFO, logger="nmt"):
        data = prepare_training_data(cfg, tmp_path, tmp_path / "run", seed=1, cache_dir=tmp_path / "cache")
    assert isinstance(data.train.src_flat, np.memmap) and isinstance(data.train.tgt_offsets, np.memmap)
    assert data.train.src_flat.dtype == np.uint16  # 60 pieces fit in 16 bits
    # the same steps, in memory: read, drop empty pairs, encode, filter by length
    report = FilterReport()
    text = drop_empty(read_parallel(corpus_files["paths"]["train_src"], corpus_files["paths"]["train_tgt"]), report)
    src_ids, tgt_ids = data.vocab.encode(text.src, "src"), data.vocab.encode(text.tgt, "tgt")
    keep = length_filter(src_ids, tgt_ids, cfg, report)
    expected = EncodedCorpus.from_lists([src_ids[i] for i in keep], [tgt_ids[i] for i in keep])
    assert arrays(data.train) == arrays(expected)
    assert len(data.train) == 36 and report.dropped == {"empty": 2, "too_long": 1}
    assert "kept 36 of 39 pairs; dropped by rule: empty: 2, too_long: 1" in caplog.text
    assert data.token_counts("src").sum() == len(expected.src_flat)


def test_a_second_run_reuses_the_cache_and_does_not_encode(corpus_files, tmp_path, caplog, monkeypatch):
    cfg, cache_dir = files_config(corpus_files["paths"]), tmp_path / "cache"
    first = prepare_training_data(cfg, tmp_path, tmp_path / "run1", seed=1, cache_dir=cache_dir)
    written = {path: path.stat().st_mtime_ns for path in entry_files(cache_dir, "train") + entry_files(cache_dir, "vocab")}
    assert len(written) == 5 + 3  # ids, offsets and meta; the model, its .vocab and meta

    def must_not_run(*args, **kwargs):
        raise AssertionError("the training text was read again")

    monkeypatch.setattr(pipeline, "encode_chunks", must_not_run)
    monkeypatch.setattr(pipeline, "sample_sentences", must_not_run)
    with caplog.at_level(logging.INFO, logger="nmt"):
        second = prepare_training_data(cfg, tmp_path, tmp_path / "run2", seed=1, cache_dir=cache_dir)
    assert "reusing cache" in caplog.text and "reusing SentencePiece model(s) from cache" in caplog.text
    assert "encoded" not in caplog.text
    assert arrays(second.train) == arrays(first.train)
    assert {path: path.stat().st_mtime_ns for path in written} == written  # nothing rewritten
    run1, run2 = (model_files(tmp_path / run, True)["src"] for run in ("run1", "run2"))
    assert run2.read_bytes() == run1.read_bytes()  # the run directory gets its own copy of the model


def test_a_changed_file_or_filter_makes_a_new_entry(corpus_files, tmp_path, caplog):
    paths, cache_dir = corpus_files["paths"], tmp_path / "cache"
    prepare_training_data(files_config(paths), tmp_path, tmp_path / "run1", seed=1, cache_dir=cache_dir)
    prepare_training_data(files_config(paths, max_len=40), tmp_path, tmp_path / "run2", seed=1, cache_dir=cache_dir)
    assert len(list(cache_dir.glob("train-*"))) == 2  # same vocabulary, other filter: a second entry
    assert len(list(cache_dir.glob("vocab-*"))) == 1
    with open(paths["train_src"], "a", encoding="utf-8") as src, open(paths["train_tgt"], "a", encoding="utf-8") as tgt:
        src.write("Noch ein Satz.\n")
        tgt.write("One more sentence.\n")
    with caplog.at_level(logging.INFO, logger="nmt"):
        data = prepare_training_data(files_config(paths), tmp_path, tmp_path / "run3", seed=1, cache_dir=cache_dir)
    assert "encoded 37 training pairs" in caplog.text and len(data.train) == 37
    assert len(list(cache_dir.glob("train-*"))) == 3 and len(list(cache_dir.glob("vocab-*"))) == 2


def test_a_resumed_run_keeps_its_own_vocabulary(corpus_files, tmp_path, caplog):
    cfg = files_config(corpus_files["paths"])
    prepare_training_data(cfg, tmp_path, tmp_path / "run", seed=1, cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="nmt"):
        prepare_training_data(cfg, tmp_path, tmp_path / "run", seed=1, cache_dir=tmp_path / "other-cache")
    assert f"reusing SentencePiece model(s) in {tmp_path / 'run'}" in caplog.text
    assert "encoded 36 training pairs" in caplog.text  # the new cache is filled with the run's own model


def test_a_damaged_entry_is_encoded_again(corpus_files, tmp_path, caplog):
    cfg, cache_dir = files_config(corpus_files["paths"]), tmp_path / "cache"
    first = prepare_training_data(cfg, tmp_path, tmp_path / "run1", seed=1, cache_dir=cache_dir)
    expected = arrays(first.train)
    del first
    ids = next(cache_dir.glob("train-*")) / "src.ids.bin"
    ids.write_bytes(ids.read_bytes()[:-2])
    with caplog.at_level(logging.WARNING, logger="nmt"):
        second = prepare_training_data(cfg, tmp_path, tmp_path / "run2", seed=1, cache_dir=cache_dir)
    assert "is damaged" in caplog.text
    assert arrays(second.train) == expected


def test_worker_processes_encode_exactly_as_one_process(corpus_files, tmp_path):
    cfg = files_config(corpus_files["paths"], max_len=26)
    data = prepare_training_data(cfg, tmp_path, tmp_path / "run", seed=1, cache_dir=tmp_path / "cache")
    source, files = training_source(cfg, tmp_path), model_files(tmp_path / "run", True)

    def encode(workers: int):
        chunks = list(encode_chunks(source.pairs(), files, cfg, np.uint16, workers=workers, chunk_pairs=4))
        joined = {side: np.concatenate([c.ids[side] for c in chunks]).tolist() for side in ("src", "tgt")}
        lens = {side: np.concatenate([c.lens[side] for c in chunks]).tolist() for side in ("src", "tgt")}
        dropped = sum((c.dropped for c in chunks), start=type(chunks[0].dropped)())
        return joined, lens, dropped, sum(c.read for c in chunks)

    single, several = encode(1), encode(2)
    assert several == single
    assert single[3] == 39 and sum(single[2].values()) > 1  # all pairs read; the filters dropped some
    assert single[0]["src"] == np.asarray(data.train.src_flat).tolist()


def test_the_cache_goes_to_nmt_cache_dir_and_never_to_the_data_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("NMT_CACHE_DIR", str(tmp_path / "env-cache"))
    assert cache.cache_root(None, tmp_path / "run") == tmp_path / "env-cache"
    assert cache.cache_root(str(tmp_path / "mine"), tmp_path / "run") == tmp_path / "mine"
    monkeypatch.delenv("NMT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root(None, tmp_path / "run") == tmp_path / "xdg" / "nmt"


def test_an_unwritable_cache_directory_falls_back_to_the_run_directory(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("NMT_CACHE_DIR", str(blocker / "cache"))
    with caplog.at_level(logging.WARNING, logger="nmt"):
        assert cache.cache_root(None, tmp_path / "run") == tmp_path / "run" / "cache"
    assert "not writable" in caplog.text
    with pytest.raises(NMTError, match="paths.cache_dir=.* is not a writable directory"):
        cache.cache_root(str(blocker / "cache"), tmp_path / "run")


def test_parallel_files_of_different_lengths_are_still_an_error_when_streamed(tiny_corpus, tmp_path):
    paths = tiny_corpus["paths"]
    with open(paths["train_tgt"], "a", encoding="utf-8") as tgt:
        tgt.write("An extra line.\n")
    with pytest.raises(NMTError, match="has 36 lines but .* has 37"):
        prepare_training_data(files_config(paths), tmp_path, tmp_path / "run", seed=1, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("train-*"))  # nothing half-written is left as an entry


def test_nmt_train_twice_encodes_once(debug_data, tmp_path):
    """The console script end to end: the second run logs that it reuses the cache and encodes nothing."""
    env_cache = tmp_path / "cache"
    common = [*debug_files_overrides(debug_data), "trainer.max_steps=1", f"paths.cache_dir={env_cache}"]
    first = run_cli("nmt-train", *common, f"paths.run_dir={tmp_path / 'run1'}")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "encoded 500 training pairs" in first.stderr
    second = run_cli("nmt-train", *common, f"paths.run_dir={tmp_path / 'run2'}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing cache" in second.stderr and "encoded" not in second.stderr
    assert os.path.getsize(tmp_path / "run2" / "spm.joint.model") > 0


def test_a_fresh_start_replaces_a_vocabulary_left_in_its_run_directory(corpus_files, tmp_path):
    """A start that failed after its SentencePiece training (say, on an empty dev file) leaves the model in
    the run directory; the next fresh start, with other settings, must not take it for its own."""
    paths, run, cache_dir = corpus_files["paths"], tmp_path / "run", tmp_path / "cache"
    prepare_training_data(files_config(paths), tmp_path, run, seed=1, cache_dir=cache_dir)
    other = files_config(paths)
    other.vocab = VocabConfig(size=50)
    resumed = prepare_training_data(other, tmp_path, run, seed=1, cache_dir=cache_dir)  # a resume keeps its own
    assert resumed.vocab.size("src") == 60
    fresh = prepare_training_data(other, tmp_path, run, seed=1, cache_dir=cache_dir, reuse_run_vocab=False)
    assert fresh.vocab.size("src") == 50
    assert fresh.vocab.size("src") == prepare_training_data(other, tmp_path, run, seed=1, cache_dir=cache_dir).vocab.size("src")
