"""Greedy and beam search: agreement, optimality on a trained model, batching, bounds, n-best, attention."""

from __future__ import annotations

import copy

import pytest
import torch

from nmt.config import ModelConfig
from nmt.data.batching import EncodedCorpus, collate
from nmt.data.vocab import EOS_ID, PAD_ID
from nmt.model.ensemble import Ensemble
from nmt.model.seq2seq import build_model
import nmt.search
from nmt.search import beam_search, decode, greedy, length_penalty, max_lengths, top_candidates

V = 16


def copy_corpus(n: int, seed: int) -> EncodedCorpus:
    """Random sequences of ids 4..V-1 (lengths 2..6) whose target is the source reversed."""
    generator = torch.Generator().manual_seed(seed)
    src = []
    for _ in range(n):
        length = int(torch.randint(2, 7, (1,), generator=generator))
        src.append(torch.randint(4, V, (length,), generator=generator).tolist())
    return EncodedCorpus.from_lists(src, [row[::-1] for row in src])


def train_reverser(seed: int):
    """A tiny model trained for a few hundred steps to reverse sequences: peaked, not degenerate."""
    torch.manual_seed(seed)
    model = build_model(ModelConfig(embedding_dim=16, hidden_size=24, dropout=0.0), V, V)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    corpus = copy_corpus(64, seed=1)
    model.train()
    for step in range(150):
        batch = collate(corpus, list(range((step % 4) * 16, (step % 4) * 16 + 16)))
        logits = model(batch.src_ids, batch.src_lens, batch.tgt_in)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.tgt_out.flatten(), ignore_index=PAD_ID)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def trained_model():
    return train_reverser(seed=0)


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(1)
    return build_model(ModelConfig(embedding_dim=8, hidden_size=6, attention_size=5, dropout=0.2), V, V).eval()


@pytest.fixture(scope="module")
def sources():
    """Eight unseen sentences of varied length, as one padded batch."""
    batch = collate(copy_corpus(8, seed=99), list(range(8)), with_target=False)
    return batch.src_ids, batch.src_lens


def teacher_forced_step_log_probs(model, src_ids, src_lens, tokens):
    """The model's log-probability of each of tokens + eos for one sentence: (T + 1,)."""
    target = torch.tensor([tokens + [EOS_ID]])
    tgt_in = torch.cat([torch.tensor([[2]]), target[:, :-1]], dim=1)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(src_ids, src_lens, tgt_in), -1)  # (1, T + 1, V)
    return log_probs.gather(-1, target.unsqueeze(-1)).flatten()


def teacher_forced_log_prob(model, src_ids, src_lens, tokens):
    """The model's log-probability of tokens + eos for one sentence, by a plain forward pass."""
    return float(teacher_forced_step_log_probs(model, src_ids, src_lens, tokens).sum())


@pytest.mark.parametrize("which", ["trained", "random"])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_greedy_equals_beam_one(which, alpha, trained_model, random_model, sources):
    model = trained_model if which == "trained" else random_model
    src_ids, src_lens = sources
    greedy_hyps = greedy(model, src_ids, src_lens, max_len_ratio=1.5, alpha=alpha)
    beam_hyps = beam_search(model, src_ids, src_lens, beam_size=1, alpha=alpha, max_len_ratio=1.5)
    for g, (b,) in zip(greedy_hyps, beam_hyps):
        assert g.tokens == b.tokens
        assert g.score == b.score and g.log_prob == b.log_prob
        assert torch.equal(g.attention, b.attention)


def test_trained_model_learned_the_task(trained_model, sources):
    src_ids, src_lens = sources
    hyps = greedy(trained_model, src_ids, src_lens)
    correct = sum(h.tokens == src_ids[i, :src_lens[i] - 1].flip(0).tolist() for i, h in enumerate(hyps))
    assert correct >= 5  # not degenerate: most unseen sentences come out reversed


def test_beam_finds_at_least_the_greedy_log_prob(trained_model, sources):
    src_ids, src_lens = sources
    greedy_hyps = greedy(trained_model, src_ids, src_lens, alpha=0.0)
    beam_hyps = beam_search(trained_model, src_ids, src_lens, beam_size=5, alpha=0.0)
    for g, (b,) in zip(greedy_hyps, beam_hyps):
        assert b.log_prob >= g.log_prob - 1e-5
        assert b.score == b.log_prob  # alpha = 0: no length penalty


@pytest.mark.parametrize("which", ["trained", "random"])
def test_scores_are_the_models_log_probabilities(which, trained_model, random_model, sources):
    model = trained_model if which == "trained" else random_model
    src_ids, src_lens = sources
    for i, nbest in enumerate(beam_search(model, src_ids, src_lens, beam_size=3, alpha=1.0, n_best=3)):
        one_src, one_len = src_ids[i:i + 1, :src_lens[i]], src_lens[i:i + 1]
        for hyp in nbest:
            assert hyp.log_prob == pytest.approx(teacher_forced_log_prob(model, one_src, one_len, hyp.tokens), abs=1e-4)
            assert hyp.score == pytest.approx(hyp.log_prob / length_penalty(len(hyp.tokens) + 1, 1.0))


@pytest.mark.parametrize("which", ["trained", "random"])
@pytest.mark.parametrize("beam_size", [1, 4])
def test_batched_search_equals_decoding_each_sentence_alone(which, beam_size, trained_model, random_model, sources):
    model = trained_model if which == "trained" else random_model
    src_ids, src_lens = sources
    batched = beam_search(model, src_ids, src_lens, beam_size=beam_size, alpha=1.0, n_best=beam_size)
    for i in range(src_ids.size(0)):
        alone = beam_search(model, src_ids[i:i + 1, :src_lens[i]], src_lens[i:i + 1], beam_size=beam_size,
                            alpha=1.0, n_best=beam_size)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batched[i]]
        assert [h.score for h in alone] == pytest.approx([h.score for h in batched[i]], abs=1e-5)
        assert torch.allclose(alone[0].attention, batched[i][0].attention, atol=1e-5)
    greedy_batched = greedy(model, src_ids, src_lens)
    for i in range(src_ids.size(0)):
        alone = greedy(model, src_ids[i:i + 1, :src_lens[i]], src_lens[i:i + 1])[0]
        assert alone.tokens == greedy_batched[i].tokens
        assert alone.score == pytest.approx(greedy_batched[i].score, abs=1e-5)


@pytest.mark.parametrize("beam_size", [1, 3])
@pytest.mark.parametrize("ratio", [0.5, 1.5])
def test_outputs_stop_at_the_length_bound(beam_size, ratio, random_model, sources):
    src_ids, src_lens = sources
    model = copy.deepcopy(random_model)
    with torch.no_grad():
        model.output.bias[EOS_ID] = -1e4  # eos is never chosen freely: every output runs to the bound
    limits = max_lengths(src_lens, ratio)
    assert limits.tolist() == [int(n * ratio) + 5 for n in src_lens.tolist()]
    hyps = decode(model, src_ids, src_lens, beam_size=beam_size, max_len_ratio=ratio, n_best=beam_size)
    for limit, nbest in zip(limits.tolist(), hyps):
        assert len(nbest) == beam_size
        for hyp in nbest:
            assert len(hyp.tokens) + 1 == limit  # tokens plus the forced eos
            assert EOS_ID not in hyp.tokens


@pytest.mark.parametrize("beam_size", [1, 5])
def test_no_output_is_empty_even_when_the_model_prefers_eos_at_once(beam_size, random_model, sources):
    src_ids, src_lens = sources
    model = copy.deepcopy(random_model)
    with torch.no_grad():
        model.output.bias[EOS_ID] = 1e4  # eos is by far the likeliest token at every step
    for nbest in decode(model, src_ids, src_lens, beam_size=beam_size, n_best=beam_size):
        assert len(nbest) == beam_size
        for hyp in nbest:
            assert len(hyp.tokens) == 1 and EOS_ID not in hyp.tokens  # one token, then the preferred eos


def test_outputs_never_exceed_the_bound(trained_model, random_model, sources):
    src_ids, src_lens = sources
    for model in (trained_model, random_model):
        limits = max_lengths(src_lens, 1.0).tolist()
        for limit, nbest in zip(limits, beam_search(model, src_ids, src_lens, beam_size=5, n_best=5,
                                                    max_len_ratio=1.0)):
            assert all(len(h.tokens) + 1 <= limit for h in nbest)


def test_n_best_is_sorted_and_distinct(trained_model, sources):
    src_ids, src_lens = sources
    for nbest in beam_search(trained_model, src_ids, src_lens, beam_size=5, alpha=0.6, n_best=4):
        assert len(nbest) == 4
        scores = [h.score for h in nbest]
        assert scores == sorted(scores, reverse=True)
        assert len({tuple(h.tokens) for h in nbest}) == 4
    one = beam_search(trained_model, src_ids, src_lens, beam_size=5, alpha=0.6, n_best=1)
    four = beam_search(trained_model, src_ids, src_lens, beam_size=5, alpha=0.6, n_best=4)
    assert [n[0].tokens for n in one] == [n[0].tokens for n in four]


@pytest.mark.parametrize("beam_size", [1, 3])
def test_attention_rows_sum_to_one_over_the_real_source(beam_size, trained_model, sources):
    src_ids, src_lens = sources
    hyps = decode(trained_model, src_ids, src_lens, beam_size=beam_size, n_best=beam_size)
    for src_len, nbest in zip(src_lens.tolist(), hyps):
        for hyp in nbest:
            assert hyp.attention.shape == (len(hyp.tokens) + 1, src_len)
            assert torch.allclose(hyp.attention.sum(-1), torch.ones(len(hyp.tokens) + 1), atol=1e-5)
            assert (hyp.attention >= 0).all()


def test_without_attention(trained_model, sources):
    src_ids, src_lens = sources
    plain = decode(trained_model, src_ids, src_lens, beam_size=3, keep_attention=False)
    with_attention = decode(trained_model, src_ids, src_lens, beam_size=3)
    assert all(n[0].attention is None for n in plain)
    assert [n[0].tokens for n in plain] == [n[0].tokens for n in with_attention]


def test_search_leaves_the_model_state_alone(trained_model, sources):
    src_ids, src_lens = sources
    before = {k: v.clone() for k, v in trained_model.state_dict().items()}
    beam_search(trained_model, src_ids, src_lens, beam_size=3)
    assert all(torch.equal(before[k], v) for k, v in trained_model.state_dict().items())
    first = decode(trained_model, src_ids, src_lens, beam_size=3)
    assert [n[0].tokens for n in decode(trained_model, src_ids, src_lens, beam_size=3)] == [n[0].tokens for n in first]


@pytest.mark.parametrize("alpha, n_best", [(0.0, 1), (1.0, 1), (1.0, 3), (2.0, 2)])
@pytest.mark.parametrize("which", ["trained", "random"])
def test_stopping_once_no_beam_can_win_changes_no_result(which, alpha, n_best, trained_model, random_model, sources):
    model = trained_model if which == "trained" else random_model
    src_ids, src_lens = sources
    early = beam_search(model, src_ids, src_lens, beam_size=4, alpha=alpha, n_best=n_best)
    full = beam_search(model, src_ids, src_lens, beam_size=4, alpha=alpha, n_best=n_best, stop_early=False)
    assert [[(h.tokens, h.score) for h in nbest] for nbest in early] == \
           [[(h.tokens, h.score) for h in nbest] for nbest in full]


@pytest.fixture(scope="module")
def other_trained_model():
    return train_reverser(seed=5)


def test_an_ensemble_of_one_decodes_as_its_model(trained_model, sources):
    src_ids, src_lens = sources
    alone = beam_search(trained_model, src_ids, src_lens, beam_size=4, n_best=2)
    ensembled = beam_search(Ensemble([trained_model]), src_ids, src_lens, beam_size=4, n_best=2)
    assert [[(h.tokens, h.score) for h in n] for n in ensembled] == [[(h.tokens, h.score) for h in n] for n in alone]


def test_an_ensemble_step_averages_its_members_probabilities(trained_model, other_trained_model, sources):
    src_ids, src_lens = sources
    members = [trained_model, other_trained_model]
    ensemble = Ensemble(members)
    encoded, hidden = ensemble.encode(src_ids, src_lens)
    assert hidden.shape == (2, src_ids.size(0), 24)  # the two members' (1, B, H) states, stacked
    prev = torch.full((src_ids.size(0),), 2)
    with torch.no_grad():
        log_probs, new_hidden, weights = ensemble.step(prev, hidden, encoded)
        steps = []
        for member in members:
            member_encoded, member_hidden = member.encode(src_ids, src_lens)
            steps.append(member.step(prev, member_hidden, member_encoded))
    mean = (steps[0][0].exp() + steps[1][0].exp()) / 2
    assert not torch.allclose(steps[0][0], steps[1][0], atol=1e-3)  # the members disagree
    assert torch.allclose(log_probs.exp(), mean, atol=1e-6)
    assert torch.equal(new_hidden, torch.cat([steps[0][1], steps[1][1]]))
    assert torch.allclose(weights, (steps[0][2] + steps[1][2]) / 2)


def test_ensemble_beam_scores_are_the_log_of_the_mean_probabilities(trained_model, other_trained_model, sources):
    """Beam reordering and finished sentences leaving the batch move every member's state alike: each
    hypothesis's log-probability equals the one teacher forcing gives, step by step, from the members."""
    src_ids, src_lens = sources
    members = [trained_model, other_trained_model]
    hyps = beam_search(Ensemble(members), src_ids, src_lens, beam_size=3, alpha=1.0, n_best=3)
    for i, nbest in enumerate(hyps):
        one_src, one_len = src_ids[i:i + 1, :src_lens[i]], src_lens[i:i + 1]
        for hyp in nbest:
            per_step = torch.stack([teacher_forced_step_log_probs(m, one_src, one_len, hyp.tokens) for m in members])
            expected = float((torch.logsumexp(per_step, dim=0) - torch.log(torch.tensor(2.0))).sum())
            assert hyp.log_prob == pytest.approx(expected, abs=1e-4)


def test_ensemble_members_must_share_vocabulary_and_decoder_size(trained_model, random_model):
    with pytest.raises(ValueError, match="one target vocabulary and decoder size"):
        Ensemble([trained_model, random_model])


@pytest.mark.parametrize("rows, length", [(1, 40_000), (1, 40_003), (1, 600), (5, 8_000), (5, 8_003), (3, 100)])
def test_top_candidates_are_torch_topk_over_the_sums(rows, length):  # blocks of 64; shorter last blocks; too few blocks
    generator = torch.Generator().manual_seed(length)
    values = torch.randn(6, rows, length, generator=generator) * 5
    offsets = torch.randn(6, rows, generator=generator) * 5
    values[1, :, : length // 2] = float("-inf")  # dead beams: whole blocks of -inf
    values[2, :, 3:] = float("-inf")  # fewer finite candidates than k
    values[3, -1, -1] = 100.0  # the best candidate in the last (possibly shorter) block
    offsets[4, 0] = float("-inf")  # a beam out of the race
    top, indices = top_candidates(values, offsets, 10)
    sums = (offsets.unsqueeze(-1) + values).view(6, -1)
    expected = sums.topk(10, dim=-1)
    assert torch.equal(top, expected.values)
    finite = torch.isfinite(top)  # the order of equal values (here the -inf ones) is free
    assert torch.equal(indices[finite], expected.indices[finite])
    assert torch.equal(sums.gather(1, indices), top)


@pytest.mark.parametrize("which", ["trained", "random"])
def test_beam_search_through_blocked_top_candidates_equals_topk_over_all_candidates(which, trained_model, random_model,
                                                                                    sources, monkeypatch):
    model = trained_model if which == "trained" else random_model
    src_ids, src_lens = sources
    searches = []
    for block, min_blocks in [(1, 1), (3, 1), (64, 4)]:  # V = 16: blocks of 1; of 3 and a shorter one; no blocks
        monkeypatch.setattr(nmt.search, "TOPK_BLOCK", block)
        monkeypatch.setattr(nmt.search, "TOPK_MIN_BLOCKS", min_blocks)
        searches.append(beam_search(model, src_ids, src_lens, beam_size=4, alpha=1.0, n_best=4))
    # each sentence's K x V candidates made in full, and torch.topk over them
    monkeypatch.setattr(nmt.search, "top_candidates",
                        lambda values, offsets, k: (offsets.unsqueeze(-1) + values).flatten(1).topk(k, dim=-1))
    expected = beam_search(model, src_ids, src_lens, beam_size=4, alpha=1.0, n_best=4)
    for search in searches:
        assert [[(h.tokens, h.score) for h in nbest] for nbest in search] == \
               [[(h.tokens, h.score) for h in nbest] for nbest in expected]


def test_the_first_beam_step_runs_one_decoder_row_per_sentence(trained_model, sources, monkeypatch):
    src_ids, src_lens = sources
    rows, step = [], trained_model.step

    def counting_step(prev_ids, hidden, encoded):
        rows.append((prev_ids.numel(), hidden.size(1), encoded.keys.size(0)))
        return step(prev_ids, hidden, encoded)

    monkeypatch.setattr(trained_model, "step", counting_step)
    beam_search(trained_model, src_ids, src_lens, beam_size=4, alpha=1.0)
    B = src_ids.size(0)
    assert rows[0] == (B, B, B)  # one row per sentence: its K copies would be identical
    assert len(rows) > 1 and all((p, h) == (4 * n, 4 * n) for p, h, n in rows[1:])  # then K per sentence
