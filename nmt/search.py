"""Greedy decoding and batched beam search over `Seq2Seq.encode` and `Seq2Seq.step`.

All sentences of a batch decode together; there is no Python loop over the batch per step. A
sentence that is done leaves the working tensors, so it stops consuming compute. At its last allowed
step a sentence may only emit eos, which bounds every output by `max_len_ratio` times its source
length plus a small constant. At the first step eos is not allowed, so no output is empty (fairseq's
`min_len` and Joey NMT's `min_output_length` default to the same rule).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from nmt.data.vocab import BOS_ID, EOS_ID
from nmt.model.seq2seq import EncoderOutput, Seq2Seq

EXTRA_LEN = 5  # room for very short sources
TOPK_BLOCK = 64  # candidates per block in `top_candidates`
TOPK_MIN_BLOCKS = 4  # `top_candidates` cuts rows into blocks when they hold this many blocks per wanted value


@dataclass
class Hypothesis:
    tokens: list[int]  # without bos and eos
    score: float  # log_prob divided by the length penalty (equal to log_prob when alpha = 0)
    log_prob: float  # the model's log-probability of tokens + eos
    attention: torch.Tensor | None  # (T + 1, S): a row per output token and the eos, real source positions


def length_penalty(length: int | torch.Tensor, alpha: float) -> float | torch.Tensor:
    """GNMT's ((5 + |Y|) / 6) ** alpha (Wu et al. 2016, section 7); |Y| counts the eos."""
    return ((5.0 + length) / 6.0) ** alpha


def max_lengths(src_lens: torch.Tensor, ratio: float) -> torch.Tensor:
    """Output length bounds, eos included: src_lens (B,) -> (B,)."""
    return (src_lens.float() * ratio).floor().long() + EXTRA_LEN


def _allowed(log_probs: torch.Tensor, at_limit: torch.Tensor, t: int) -> torch.Tensor:
    """At step 0 no row may choose eos; rows at their length bound (never at step 0) may only choose eos:
    log_probs (R, V), at_limit (R,) -> (R, V)."""
    if t == 0:
        return log_probs.index_fill(1, torch.tensor([EOS_ID], device=log_probs.device), float("-inf"))
    if not at_limit.any():
        return log_probs
    forced = torch.full_like(log_probs, float("-inf"))
    forced[:, EOS_ID] = log_probs[:, EOS_ID]
    return torch.where(at_limit.unsqueeze(1), forced, log_probs)


def _hypothesis(tokens: list[int], log_prob: float, attention: torch.Tensor | None, src_len: int,
                alpha: float) -> Hypothesis:
    """tokens (t of them) ending in eos, attention (t, S) or None -> Hypothesis."""
    return Hypothesis(tokens[:-1], log_prob / length_penalty(len(tokens), alpha), log_prob,
                      None if attention is None else attention[:, :src_len].cpu())


def _ended(mask: torch.Tensor, seq: torch.Tensor, log_probs: torch.Tensor, attn: torch.Tensor,
           keep_attention: bool) -> list[tuple[list[int], float, torch.Tensor | None]]:
    """The tokens, log-probability and attention (or None) of each hypothesis that mask marks as ended, in
    row-major order: mask (N,) or (N, C) over seq (..., t), log_probs and attn (..., t, S). A few bulk copies
    to Python, not several small tensor operations per hypothesis."""
    tokens = seq[mask].tolist()
    return list(zip(tokens, log_probs[mask].tolist(), attn[mask] if keep_attention else [None] * len(tokens)))


@torch.no_grad()
def greedy(model: Seq2Seq, src_ids: torch.Tensor, src_lens: torch.Tensor, max_len_ratio: float = 1.5,
           alpha: float = 0.0, keep_attention: bool = True) -> list[Hypothesis]:
    """src_ids (B, S), src_lens (B,) -> the most likely next token at each step, one hypothesis per sentence."""
    device = src_ids.device
    encoded, hidden = model.encode(src_ids, src_lens, for_search=True)
    limits = max_lengths(src_lens, max_len_ratio).to(device)  # (B,)
    lengths = src_lens.tolist()
    active = torch.arange(src_ids.size(0), device=device)  # (N,) sentences still decoding
    prev = torch.full_like(active, BOS_ID)  # (N,)
    seq = torch.empty(active.numel(), 0, dtype=torch.long, device=device)  # (N, t)
    attn = torch.empty(active.numel(), 0, src_ids.size(1), device=device)  # (N, t, S)
    log_prob = torch.zeros(active.numel(), device=device)  # (N,)
    results: list[Hypothesis | None] = [None] * src_ids.size(0)
    for t in range(int(limits.max())):
        log_probs, hidden, weights = model.step(prev, hidden, encoded)  # (N, V), (L, N, H), (N, S)
        log_probs = _allowed(log_probs, limits[active] == t + 1, t)
        best_lp, prev = log_probs.max(dim=-1)  # (N,)
        log_prob = log_prob + best_lp
        seq = torch.cat([seq, prev.unsqueeze(1)], dim=1)  # (N, t + 1)
        if keep_attention:
            attn = torch.cat([attn, weights.unsqueeze(1).float()], dim=1)  # (N, t + 1, S)
        ended = prev == EOS_ID  # (N,)
        if ended.any():
            for sentence, (tokens, score, attention) in zip(active[ended].tolist(),
                                                             _ended(ended, seq, log_prob, attn, keep_attention)):
                results[sentence] = _hypothesis(tokens, score, attention, lengths[sentence], alpha)
        if ended.all():
            break
        if ended.any():
            keep = (~ended).nonzero().flatten()
            active, prev, seq, attn, log_prob = active[keep], prev[keep], seq[keep], attn[keep], log_prob[keep]
            hidden, encoded = hidden[:, keep], encoded.select(keep)
    return results


@dataclass
class _Beams:
    """The alive beams of the N sentences still decoding, K per sentence (one, before the first step)."""

    active: torch.Tensor  # (N,) sentence index in the batch
    scores: torch.Tensor  # (N, K) log-probabilities
    seq: torch.Tensor  # (N, K, t)
    attn: torch.Tensor  # (N, K, t, S), or (N, K, 0, S) when attention is not kept
    prev: torch.Tensor  # (N * K,) last tokens
    hidden: torch.Tensor  # (L, N * K, H)
    encoded: EncoderOutput  # the N sentences, each feeding its K rows

    def keep(self, sentences: torch.Tensor) -> "_Beams":
        """Drop the sentences not listed: sentences (M,) indices into N."""
        k = self.scores.size(1)
        rows = (sentences.unsqueeze(1) * k + torch.arange(k, device=sentences.device)).flatten()  # (M * K,)
        return _Beams(self.active[sentences], self.scores[sentences], self.seq[sentences], self.attn[sentences],
                      self.prev[rows], self.hidden[:, rows], self.encoded.select(sentences))


def _start(src_ids, src_lens, model) -> _Beams:
    """Encode once; each sentence's encoding serves all its beams. Each sentence starts with one beam: K
    copies of it would be K identical rows, and the first step would pay for all of them."""
    batch, device = src_ids.size(0), src_ids.device
    encoded, hidden = model.encode(src_ids, src_lens, for_search=True)
    return _Beams(
        active=torch.arange(batch, device=device), scores=torch.zeros(batch, 1, device=device),
        seq=torch.empty(batch, 1, 0, dtype=torch.long, device=device),
        attn=torch.empty(batch, 1, 0, src_ids.size(1), device=device),
        prev=torch.full((batch,), BOS_ID, dtype=torch.long, device=device), hidden=hidden, encoded=encoded)


def top_candidates(values: torch.Tensor, offsets: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """values (N, R, L), offsets (N, R) -> for each n the k largest of its R x L sums offsets[n, r] + values[n, r, l],
    largest first, and their indices into R x L (N, k): torch.topk's over the sums, indices up to the order of
    equal values. In beam search a sentence's sums are its candidates: R beam scores, each plus its row's V
    log-probabilities.

    The (N, R x L) sums are never made in full. On a CPU torch.topk sorts (value, index) pairs, which over beam
    search's K x V candidates took 2.3 ms for 64 sentences at K = 5, V = 8,000, where a plain maximum over the
    same rows took 0.2 ms. So each row of values is cut into blocks of TOPK_BLOCK; a block's best sum is its
    maximum plus its row's offset; the k blocks with the best sums are kept, and topk runs over their sums
    alone. No candidate is lost: one in another block has k block maxima, each a different candidate, at
    least as large as itself.
    """
    N, R, L = values.shape
    blocks = L // TOPK_BLOCK
    # GPUs have a fast topk, and a few blocks gain nothing
    if values.device.type != "cpu" or R * blocks < TOPK_MIN_BLOCKS * k:
        return (offsets.unsqueeze(-1) + values).view(N, R * L).topk(k, dim=-1)
    whole = blocks * TOPK_BLOCK
    best = offsets.unsqueeze(-1) + values[..., :whole].view(N, R, blocks, TOPK_BLOCK).amax(-1)  # (N, R, blocks)
    kept = best.view(N, R * blocks).topk(k, dim=-1).indices  # (N, k)
    starts = kept // blocks * L + kept % blocks * TOPK_BLOCK  # (N, k) each kept block's first index into R x L
    arange = functools.partial(torch.arange, device=values.device)
    index = (starts.unsqueeze(-1) + arange(TOPK_BLOCK)).view(N, -1)  # (N, k * TOPK_BLOCK)
    if whole < L:  # each row's last, shorter block takes part whole
        tails = (arange(R).unsqueeze(-1) * L + arange(whole, L)).view(-1)  # (R * (L - whole),)
        index = torch.cat([index, tails.expand(N, -1)], dim=1)
    sums = values.view(N, R * L).gather(1, index) + offsets.gather(1, index // L)
    top, picked = sums.topk(k, dim=-1)
    return top, index.gather(1, picked)


def _gather_rows(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """tensor (N, K, ...) and rows (N, C) indexing into K -> (N, C, ...)."""
    index = rows.view(*rows.shape, *([1] * (tensor.dim() - 2))).expand(*rows.shape, *tensor.shape[2:])
    return tensor.gather(1, index)


@torch.no_grad()
def beam_search(model: Seq2Seq, src_ids: torch.Tensor, src_lens: torch.Tensor, beam_size: int = 5,
                alpha: float = 1.0, max_len_ratio: float = 1.5, n_best: int = 1,
                keep_attention: bool = True, stop_early: bool = True) -> list[list[Hypothesis]]:
    """src_ids (B, S), src_lens (B,) -> for each sentence its n_best hypotheses, best first.

    Each step scores the K x V continuations of every sentence and takes the top 2K: an eos among
    the first K finishes a hypothesis (normalised by the length penalty), the best K others go on.
    A sentence is done once it holds K finished hypotheses, or earlier, once no alive beam can still
    beat its n_best-th finished one. That stop changes no result: an alive beam's log-probability
    only falls as it grows, and its length penalty can at most reach that of the sentence's length
    bound, so log-probability / penalty(bound) bounds the score of everything it can still become.
    """
    K = beam_size
    beams = _start(src_ids, src_lens, model)
    device = src_ids.device
    limits = max_lengths(src_lens, max_len_ratio).to(device)  # (B,)
    largest_penalty = length_penalty(limits.float(), alpha)  # (B,) the penalty at the length bound
    lengths = src_lens.tolist()
    finished: list[list[Hypothesis]] = [[] for _ in range(src_ids.size(0))]
    num_finished = torch.zeros(src_ids.size(0), dtype=torch.long, device=device)  # (B,)
    nth_best = torch.full((src_ids.size(0),), float("-inf"), device=device)  # (B,) the n_best-th finished score
    for t in range(int(limits.max())):
        beams, ended = _beam_step(model, beams, limits, t, K, keep_attention)
        if ended:  # Python's own bookkeeping, then one update of each tensor
            active = beams.active.tolist()
            for n, tokens, log_prob, attention in ended:
                sentence = active[n]
                finished[sentence].append(_hypothesis(tokens, log_prob, attention, lengths[sentence], alpha))
            sentences = sorted({active[n] for n, *_ in ended})
            index = torch.tensor(sentences, device=device)
            num_finished[index] = torch.tensor([len(finished[b]) for b in sentences], device=device)
            nth_best[index] = torch.tensor([sorted((h.score for h in finished[b]), reverse=True)[n_best - 1]
                                            if len(finished[b]) >= n_best else float("-inf") for b in sentences],
                                           dtype=nth_best.dtype, device=device)
        done = num_finished[beams.active] >= K  # (N,)
        if stop_early:  # (a test compares with stop_early=False)
            reachable = beams.scores.max(dim=1).values / largest_penalty[beams.active]  # (N,) best possible score
            done |= nth_best[beams.active] >= reachable
        if done.all():
            break
        if done.any():
            beams = beams.keep((~done).nonzero().flatten())
    return [sorted(hyps, key=lambda h: -h.score)[:n_best] for hyps in finished]


def _beam_step(model: Seq2Seq, beams: _Beams, limits: torch.Tensor, t: int, K: int, keep_attention: bool):
    """Advance all beams one token (R per sentence: 1 at the first step, K after); returns the new K beams
    per sentence and the hypotheses that ended in eos."""
    N, R = beams.scores.shape
    log_probs, hidden, weights = model.step(beams.prev, beams.hidden, beams.encoded)  # (N*R, V), ..., (N*R, S)
    at_limit = (limits[beams.active] == t + 1).repeat_interleave(R)  # (N * R,)
    log_probs = _allowed(log_probs, at_limit, t)
    V = log_probs.size(-1)
    top_scores, top_ids = top_candidates(log_probs.view(N, R, V), beams.scores, min(2 * K, R * V))  # (N, 2K)
    origin, token = top_ids // V, top_ids % V  # (N, 2K) beam of origin, new token
    seq = torch.cat([_gather_rows(beams.seq, origin), token.unsqueeze(-1)], dim=2)  # (N, 2K, t + 1)
    attn = beams.attn
    if keep_attention:
        step_weights = _gather_rows(weights.view(N, R, 1, -1).float(), origin)  # (N, 2K, 1, S)
        attn = torch.cat([_gather_rows(beams.attn, origin), step_weights], dim=2)  # (N, 2K, t + 1, S)
    is_eos = (token == EOS_ID) & torch.isfinite(top_scores)  # (N, 2K)
    ended_mask = is_eos.clone()
    ended_mask[:, K:] = False  # only an eos that ranks within the top K finishes a hypothesis
    # (sentence row, tokens, log-prob, attention or None) of each
    ended = [(n, *hypothesis) for n, hypothesis in zip(ended_mask.nonzero()[:, 0].tolist(),
                                                       _ended(ended_mask, seq, top_scores, attn, keep_attention))]
    # (N, K) from the 2K; fewer only when the first step's V candidates are fewer than K
    scores, pick = top_scores.masked_fill(is_eos, float("-inf")).topk(min(K, top_scores.size(1)), dim=-1)
    rows = (_gather_rows(origin.unsqueeze(-1), pick).squeeze(-1)
            + torch.arange(N, device=origin.device).unsqueeze(1) * R).flatten()  # (N * K,) parent rows
    new = _Beams(beams.active, scores, _gather_rows(seq, pick),
                 _gather_rows(attn, pick) if keep_attention else beams.attn,
                 _gather_rows(token.unsqueeze(-1), pick).flatten(), hidden[:, rows],
                 beams.encoded.with_beam(pick.size(1)))
    return new, ended


def decode(model: Seq2Seq, src_ids: torch.Tensor, src_lens: torch.Tensor, beam_size: int = 1, alpha: float = 1.0,
           max_len_ratio: float = 1.5, n_best: int = 1, keep_attention: bool = True) -> list[list[Hypothesis]]:
    """Greedy when beam_size is 1 (and one hypothesis is asked for), beam search otherwise."""
    if beam_size == 1 and n_best == 1:
        return [[h] for h in greedy(model, src_ids, src_lens, max_len_ratio, alpha, keep_attention)]
    return beam_search(model, src_ids, src_lens, beam_size, alpha, max_len_ratio, n_best, keep_attention)
