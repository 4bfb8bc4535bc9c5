"""Token-budget batching: budget, coverage, determinism per (seed, epoch), collation and padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nmt.data.batching import (EncodedCorpus, collate, decode_batches, epoch_batches, pad_rows, padding_share,
                               token_batches)
from nmt.data.vocab import BOS_ID, EOS_ID, PAD_ID


def lists(batches) -> list[list[int]]:
    return [batch.tolist() for batch in batches]


def random_corpus(n: int = 600, max_len: int = 40, seed: int = 0) -> EncodedCorpus:
    rng = np.random.default_rng(seed)
    src = [rng.integers(4, 100, size=rng.integers(1, max_len + 1)).tolist() for _ in range(n)]
    tgt = [rng.integers(4, 100, size=rng.integers(1, max_len + 1)).tolist() for _ in range(n)]
    return EncodedCorpus.from_lists(src, tgt)


def test_encoded_corpus_roundtrip():
    src, tgt = [[4, 5, 6], [7], [8, 9]], [[10], [11, 12], [13, 14, 15, 16]]
    corpus = EncodedCorpus.from_lists(src, tgt)
    assert len(corpus) == 3
    assert [corpus.src(i).tolist() for i in range(3)] == src
    assert [corpus.tgt(i).tolist() for i in range(3)] == tgt
    assert corpus.src_lens.tolist() == [3, 1, 2] and corpus.tgt_lens.tolist() == [1, 2, 4]


@pytest.mark.parametrize("budget", [64, 300, 1000])
def test_token_budget_is_respected_including_bos_and_eos(budget):
    corpus = random_corpus()
    batches = epoch_batches(corpus, budget, sort_pool=5, seed=3, epoch=0)
    for indices in batches:
        batch = collate(corpus, indices)
        size, width = batch.src_ids.size(0), max(batch.src_ids.size(1), batch.tgt_in.size(1))
        if size > 1:
            assert size * width <= budget
        # a single example may exceed the budget only when it alone is wider than the budget
        if size * width > budget:
            assert size == 1


def test_an_example_wider_than_the_budget_gets_its_own_batch():
    corpus = EncodedCorpus.from_lists([[5] * 50, [5] * 3, [5] * 4], [[6] * 2, [6] * 3, [6] * 2])
    batches = lists(epoch_batches(corpus, 20, sort_pool=10, seed=0, epoch=0))
    assert [0] in batches
    assert sorted(i for b in batches for i in b) == [0, 1, 2]


@pytest.mark.parametrize("epoch", [0, 1, 7])
def test_every_example_appears_exactly_once_per_epoch(epoch):
    corpus = random_corpus()
    batches = epoch_batches(corpus, 400, sort_pool=3, seed=11, epoch=epoch)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(corpus)))
    assert all(len(batch) for batch in batches)
    assert all(batch.dtype == np.int32 for batch in batches)  # 4 bytes per example, not a Python int


def test_same_seed_and_epoch_give_the_same_batches_and_other_epochs_differ():
    corpus = random_corpus()
    first = lists(epoch_batches(corpus, 400, sort_pool=3, seed=11, epoch=2))
    assert lists(epoch_batches(corpus, 400, sort_pool=3, seed=11, epoch=2)) == first
    assert lists(epoch_batches(corpus, 400, sort_pool=3, seed=11, epoch=3)) != first
    assert lists(epoch_batches(corpus, 400, sort_pool=3, seed=12, epoch=2)) != first


def test_sorting_keeps_padding_low():
    corpus = random_corpus(n=2000)
    sorted_batches = epoch_batches(corpus, 500, sort_pool=50, seed=0, epoch=0)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(corpus)).tolist()
    size = int(np.mean([len(b) for b in sorted_batches]))
    shuffled_batches = [order[i:i + size] for i in range(0, len(order), size)]
    sorted_share, shuffled_share = padding_share(corpus, sorted_batches), padding_share(corpus, shuffled_batches)
    assert sorted_share < 0.1
    assert shuffled_share > 0.3
    # padding_share measures exactly the padded target positions of the collated batches
    padded = real = 0
    for indices in sorted_batches:
        tgt_out = collate(corpus, indices).tgt_out
        padded += tgt_out.numel()
        real += int((tgt_out != PAD_ID).sum())
    assert sorted_share == pytest.approx(1 - real / padded)


def test_collate_shapes_bos_eos_and_padding():
    corpus = EncodedCorpus.from_lists([[4, 5, 6], [7], [8, 9]], [[10], [11, 12], [13, 14, 15]])
    batch = collate(corpus, [0, 1, 2])
    assert batch.src_ids.tolist() == [[4, 5, 6, EOS_ID], [7, EOS_ID, PAD_ID, PAD_ID], [8, 9, EOS_ID, PAD_ID]]
    assert batch.src_lens.tolist() == [4, 2, 3]
    assert batch.tgt_in.tolist() == [[BOS_ID, 10, PAD_ID, PAD_ID], [BOS_ID, 11, 12, PAD_ID], [BOS_ID, 13, 14, 15]]
    assert batch.tgt_out.tolist() == [[10, EOS_ID, PAD_ID, PAD_ID], [11, 12, EOS_ID, PAD_ID], [13, 14, 15, EOS_ID]]
    assert batch.src_ids.dtype == torch.long and batch.tgt_in.shape == batch.tgt_out.shape
    assert batch.src_mask.tolist() == [[True] * 4, [True, True, False, False], [True, True, True, False]]
    assert batch.src_mask.sum(1).tolist() == batch.src_lens.tolist()
    assert batch.num_tgt_tokens == 2 + 3 + 4
    assert batch.indices == [0, 1, 2]
    # tgt_in is tgt_out shifted right by one, starting with bos
    real = batch.tgt_out != PAD_ID
    assert torch.equal(batch.tgt_in[:, 1:][real[:, 1:]], batch.tgt_out[:, :-1][real[:, 1:]])


def test_collate_without_target():
    corpus = EncodedCorpus.from_lists([[4, 5], [6]], [[], []])
    batch = collate(corpus, [1, 0], with_target=False)
    assert batch.tgt_in is None and batch.tgt_out is None and batch.num_tgt_tokens == 0
    assert batch.src_ids.tolist() == [[6, EOS_ID, PAD_ID], [4, 5, EOS_ID]]
    moved = batch.to(torch.device("cpu"))
    assert torch.equal(moved.src_ids, batch.src_ids) and moved.indices == [1, 0]


def test_pad_rows_prefix_and_suffix():
    rows = [np.array([5, 6]), np.array([7])]
    assert pad_rows(rows).tolist() == [[5, 6], [7, 0]]
    assert pad_rows(rows, prefix=BOS_ID, suffix=EOS_ID).tolist() == [[2, 5, 6, 3], [2, 7, 3, 0]]


def test_sorted_batches_without_rng_follow_length():
    src_lens = np.array([5, 1, 9, 3, 7])
    batches = token_batches(src_lens, src_lens, batch_tokens=1000, sort_pool=1, rng=None)
    assert lists(batches) == [[1, 3, 0, 4, 2]]


def test_decode_batches_longest_first_and_bounded():
    src_lens = np.array([3, 10, 1, 7, 7, 2, 9])
    batches = decode_batches(src_lens, max_sentences=3)
    assert [len(b) for b in batches] == [3, 3, 1]
    assert sorted(i for b in batches for i in b) == list(range(7))
    flat_lens = [int(src_lens[i]) for b in batches for i in b]
    assert flat_lens == sorted(flat_lens, reverse=True)
