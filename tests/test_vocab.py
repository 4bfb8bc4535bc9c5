"""SentencePiece vocabularies trained for real on a tiny corpus: special ids, round trips, reuse."""

from __future__ import annotations

from collections import Counter

import pytest

from nmt.config import VocabConfig
from nmt.data.vocab import BOS_ID, EOS_ID, PAD_ID, UNK_ID, SentenceSample, Vocab, model_files
from nmt.errors import NMTError


@pytest.fixture(params=[("unigram", True), ("unigram", False), ("bpe", True), ("bpe", False)],
                ids=["unigram-joint", "unigram-separate", "bpe-joint", "bpe-separate"])
def built(request, tiny_corpus, tmp_path):
    kind, joint = request.param
    cfg = VocabConfig(type=kind, size=60, joint=joint)
    run_dir = tmp_path / "run"
    vocab = Vocab.build(run_dir, tiny_corpus["src"], tiny_corpus["tgt"], cfg, seed=1)
    return vocab, cfg, run_dir, tiny_corpus


def test_model_files_are_written(built):
    vocab, cfg, run_dir, _ = built
    names = sorted(p.name for p in run_dir.glob("*.model"))
    assert names == (["spm.joint.model"] if cfg.joint else ["spm.src.model", "spm.tgt.model"])
    assert vocab.joint == cfg.joint


@pytest.mark.parametrize("side", ["src", "tgt"])
def test_special_ids(built, side):
    vocab, *_ = built
    processor = vocab.side(side)
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    assert (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id()) == (0, 1, 2, 3)
    assert vocab.id_to_piece([0, 1, 2, 3], side) == ["<pad>", "<unk>", "<s>", "</s>"]
    assert 16 <= vocab.size(side) <= 60


@pytest.mark.parametrize("side, key", [("src", "src"), ("tgt", "tgt")])
def test_encode_decode_roundtrip(built, side, key):
    vocab, _, _, corpus = built
    sentences = corpus[key][:12]
    ids = vocab.encode(sentences, side)
    assert all(ids_row and not set(ids_row) & {PAD_ID, BOS_ID, EOS_ID, UNK_ID} for ids_row in ids)
    assert [vocab.decode(row, side) for row in ids] == sentences


def test_decode_stops_at_eos_and_skips_pad_and_bos(built):
    vocab, _, _, corpus = built
    ids = vocab.encode([corpus["tgt"][0]], "tgt")[0]
    assert vocab.decode([BOS_ID, *ids, EOS_ID, *ids, PAD_ID], "tgt") == corpus["tgt"][0]
    assert vocab.decode([EOS_ID, *ids], "tgt") == ""


def test_unknown_characters_map_to_unk(built):
    vocab, *_ = built
    ids = vocab.encode(["Ein 字 Mann"], "src")[0]
    assert UNK_ID in ids
    assert ids.count(UNK_ID) == 1


def test_separate_vocabularies_are_trained_on_their_own_side(tiny_corpus, tmp_path):
    vocab = Vocab.build(tmp_path, tiny_corpus["src"], tiny_corpus["tgt"], VocabConfig(size=60, joint=False), seed=1)
    # "ä" occurs only in the German sentences, "y" only in the English ones
    assert UNK_ID in vocab.encode(["ä"], "tgt")[0]
    assert UNK_ID not in vocab.encode(["ä"], "src")[0]
    assert UNK_ID in vocab.encode(["y"], "src")[0]
    assert UNK_ID not in vocab.encode(["y"], "tgt")[0]


def test_existing_models_are_reused(tiny_corpus, tmp_path):
    cfg = VocabConfig(size=60, joint=True)
    first = Vocab.build(tmp_path, tiny_corpus["src"], tiny_corpus["tgt"], cfg, seed=1)
    path = model_files(tmp_path, True)["src"]
    before = (path.stat().st_mtime_ns, path.read_bytes())
    # Different text would give a different model; reuse must not retrain.
    second = Vocab.build(tmp_path, ["völlig anderer Text"] * 5, ["entirely different text"] * 5, cfg, seed=1)
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before
    sentence = tiny_corpus["src"][3]
    assert second.encode([sentence], "src") == first.encode([sentence], "src")


def test_training_is_reproducible(tiny_corpus, tmp_path):
    cfg = VocabConfig(size=60, joint=True)
    a = Vocab.build(tmp_path / "a", tiny_corpus["src"], tiny_corpus["tgt"], cfg, seed=1)
    b = Vocab.build(tmp_path / "b", tiny_corpus["src"], tiny_corpus["tgt"], cfg, seed=1)
    # the .model file records its own path, so compare the pieces and scores (the .vocab file)
    assert (tmp_path / "a" / "spm.joint.vocab").read_text() == (tmp_path / "b" / "spm.joint.vocab").read_text()
    assert a.encode(tiny_corpus["src"], "src") == b.encode(tiny_corpus["src"], "src")


def test_load_without_models_is_a_clear_error(tmp_path):
    with pytest.raises(NMTError, match="spm.joint.model is missing"):
        Vocab.load(tmp_path, joint=True)


def test_no_text_is_a_clear_error(tmp_path):
    with pytest.raises(NMTError, match="No training text"):
        Vocab.build(tmp_path, ["", ""], ["", ""], VocabConfig(size=60), seed=1)


def test_sentence_sample_keeps_everything_in_order_until_full_then_samples_uniformly():
    sample = SentenceSample(capacity=5, seed=3)
    for i in range(5):
        sample.add(f"s{i}")
    assert sample.sentences == [f"s{i}" for i in range(5)]  # under the cap: exactly the input
    hits = Counter()
    for seed in range(400):
        sample = SentenceSample(capacity=5, seed=seed)
        for i in range(50):
            sample.add(f"s{i}")
        assert len(sample.sentences) == 5 and len(set(sample.sentences)) == 5 and sample.seen == 50
        hits.update(sample.sentences)
    # each of the 50 sentences is kept with probability 1/10: about 40 times in 400 samples
    assert len(hits) == 50 and min(hits.values()) > 15 and max(hits.values()) < 70
    again = SentenceSample(capacity=5, seed=7)
    first = SentenceSample(capacity=5, seed=7)
    for i in range(50):
        again.add(f"s{i}")
        first.add(f"s{i}")
    assert again.sentences == first.sentences  # seeded
