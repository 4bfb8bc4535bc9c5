"""Subword regularization on a real SentencePiece model: each epoch new pieces, the same text; saved and read back."""

from __future__ import annotations

import numpy as np
import pytest

from nmt.config import DataConfig, VocabConfig
from nmt.data.batching import EncodedCorpus
from nmt.data import sampling
from nmt.data.sampling import SegmentationSampler, load_segmentation, save_segmentation
from nmt.data.vocab import UNK_ID, Vocab
from nmt.errors import NMTError


@pytest.fixture(params=["unigram", "bpe"])
def setup(request, tiny_corpus, tmp_path):
    vocab = Vocab.build(tmp_path / "run", tiny_corpus["src"], tiny_corpus["tgt"],
                        VocabConfig(type=request.param, size=60), seed=1)
    corpus = EncodedCorpus.from_lists(vocab.encode(tiny_corpus["src"], "src"), vocab.encode(tiny_corpus["tgt"], "tgt"))
    return vocab, corpus


def rows(corpus: EncodedCorpus, side: str) -> list[list[int]]:
    return [getattr(corpus, side)(i).tolist() for i in range(len(corpus))]


def test_a_sampled_epoch_changes_the_pieces_and_keeps_the_text(setup):
    vocab, best = setup
    sampled = SegmentationSampler(best, vocab, DataConfig(subword_alpha=0.2)).epoch(seed=1, epoch=0)
    assert len(sampled) == len(best)
    for side in ("src", "tgt"):
        assert vocab.side(side).decode(rows(sampled, side)) == vocab.side(side).decode(rows(best, side))
        changed = sum(a != b for a, b in zip(rows(sampled, side), rows(best, side)))
        assert changed >= len(best) // 4, f"{side}: only {changed} of {len(best)} sentences segmented differently"


def test_within_a_process_the_sample_is_a_function_of_seed_and_epoch(setup):
    vocab, best = setup
    sampler = SegmentationSampler(best, vocab, DataConfig(subword_alpha=0.2))
    first = sampler.epoch(seed=1, epoch=0)
    second = sampler.epoch(seed=1, epoch=1)
    again = SegmentationSampler(best, vocab, DataConfig(subword_alpha=0.2)).epoch(seed=1, epoch=0)
    other_seed = sampler.epoch(seed=2, epoch=0)
    assert np.array_equal(again.src_flat, first.src_flat) and np.array_equal(again.tgt_flat, first.tgt_flat)
    assert np.array_equal(again.tgt_offsets, first.tgt_offsets)
    assert rows(second, "tgt") != rows(first, "tgt")
    assert rows(other_seed, "tgt") != rows(first, "tgt")


def test_a_pair_that_the_length_filter_would_drop_keeps_its_best_segmentation(setup):
    vocab, best = setup
    max_len = int(max(best.src_lens.max(), best.tgt_lens.max()))
    unlimited, limited = (SegmentationSampler(best, vocab, DataConfig(subword_alpha=0.05, max_len=limit))
                          for limit in (100, max_len))
    for epoch in range(20):  # draws differ between processes: find an epoch in which some pair grew past max_len
        grown = unlimited.epoch(seed=1, epoch=epoch)
        longer = [i for i in range(len(best)) if max(grown.src_lens[i], grown.tgt_lens[i]) > max_len]
        if longer:
            break
    assert longer, "no sampled pair grew past the longest best segmentation in 20 epochs; sample harder"
    limited = limited.epoch(seed=1, epoch=epoch)
    assert max(limited.src_lens.max(), limited.tgt_lens.max()) <= max_len
    for i in longer:
        assert limited.src(i).tolist() == best.src(i).tolist() and limited.tgt(i).tolist() == best.tgt(i).tolist()


def test_a_pair_with_an_unknown_piece_keeps_its_best_segmentation(setup):
    vocab, _ = setup
    src = ["Ein Mann liest ein Buch im Schnee.", "Zwei Ω Hunde spielen im Park."]  # Ω is not in the vocabulary
    tgt = ["A man reads a book in the snow.", "Two dogs play in the park."]
    best = EncodedCorpus.from_lists(vocab.encode(src, "src"), vocab.encode(tgt, "tgt"))
    assert UNK_ID in best.src(1).tolist()
    sampler = SegmentationSampler(best, vocab, DataConfig(subword_alpha=0.05))
    for epoch in range(5):
        sampled = sampler.epoch(seed=1, epoch=epoch)
        assert sampled.src(1).tolist() == best.src(1).tolist() and sampled.tgt(1).tolist() == best.tgt(1).tolist()


def test_a_saved_segmentation_loads_back_the_same_pieces_and_a_damaged_one_is_a_clean_error(setup, tmp_path):
    vocab, best = setup
    sampled = SegmentationSampler(best, vocab, DataConfig(subword_alpha=0.2)).epoch(seed=1, epoch=0)
    path = tmp_path / "run" / "segmentation" / "epoch-0001.npz"
    save_segmentation(sampled, path)
    loaded = load_segmentation(path)
    for side in ("src", "tgt"):
        assert rows(loaded, side) == rows(sampled, side)
    assert [p.name for p in path.parent.iterdir()] == ["epoch-0001.npz"]  # no temporary file left
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(NMTError, match="epoch-0001.npz cannot be read.*Delete it and resume"):
        load_segmentation(path)


def test_segmenting_in_chunks_keeps_every_pair_in_its_place(setup, monkeypatch):
    vocab, best = setup
    src = [vocab.side("src").decode(best.src(i).tolist()) for i in range(len(best))]
    src[7] = "Zwei Ω Hunde spielen im Park."  # an unknown piece in the second chunk
    best = EncodedCorpus.from_lists(vocab.encode(src, "src"), [best.tgt(i).tolist() for i in range(len(best))])
    monkeypatch.setattr(sampling, "CHUNK_PAIRS", 5)
    sampler = SegmentationSampler(best, vocab, DataConfig(subword_alpha=0.2))
    # SentencePiece's draws differ between processes, and one epoch of this tiny corpus can come out
    # as the best segmentation on a side; over four epochs every side must have been sampled.
    sampled_sides = set()
    for epoch in range(4):
        chunked = sampler.epoch(seed=1, epoch=epoch)
        assert len(chunked) == len(best)
        for side in ("src", "tgt"):
            assert vocab.side(side).decode(rows(chunked, side)) == vocab.side(side).decode(rows(best, side))
            if rows(chunked, side) != rows(best, side):
                sampled_sides.add(side)
        assert chunked.src(7).tolist() == best.src(7).tolist() and chunked.tgt(7).tolist() == best.tgt(7).tolist()
    assert sampled_sides == {"src", "tgt"}
