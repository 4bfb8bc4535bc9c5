"""Model invariants on tiny dimensions (B=3, S=5, T=4, E=4, H=6, A=5, V=11)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

import nmt.model.birecurrence
import nmt.model.encoder
import nmt.model.recurrence
import nmt.precision
from nmt.config import INIT_SCHEMES, EmbeddingConfig, ModelConfig
from nmt.data.vocab import BOS_ID, EOS_ID, PAD_ID
from nmt.model.activation import tanh
from nmt.model.attention import BahdanauAttention
from nmt.model.birecurrence import BiGRUUnroll, reverse_within_lengths
from nmt.model.decoder import Decoder, gru_update
from nmt.model.embedding import Embeddings, init_embedding_
from nmt.model.encoder import Encoder
from nmt.model.recurrence import AttentionGRUUnroll
from nmt.model.seq2seq import build_model

B, S, T, E, H, A, V = 3, 5, 4, 4, 6, 5, 11
SRC_LENS = torch.tensor([5, 3, 1])


def make_src(lens: torch.Tensor = SRC_LENS, width: int = S) -> torch.Tensor:
    """(B, width) ids ending in eos at each sentence's length, padded with 0."""
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(4, V, (len(lens), width), generator=generator)
    positions = torch.arange(width).unsqueeze(0)
    ids[positions == (lens - 1).unsqueeze(1)] = EOS_ID
    ids[positions >= lens.unsqueeze(1)] = PAD_ID
    return ids


def make_tgt_in() -> torch.Tensor:
    generator = torch.Generator().manual_seed(6)
    tgt = torch.randint(4, V, (B, T), generator=generator)
    tgt[:, 0] = BOS_ID
    tgt[2, 2:] = PAD_ID
    return tgt


def tiny_model(**overrides):
    cfg = ModelConfig(**{"embedding_dim": E, "hidden_size": H, "attention_size": A, "dropout": 0.3, **overrides})
    return build_model(cfg, V, V)


# --- embeddings --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [False, True])
def test_embedding_lookup_equals_one_hot_times_weight(scale):
    embeddings = Embeddings(V, E, PAD_ID, EmbeddingConfig(scale=scale))
    ids = make_src()
    expected = F.one_hot(ids, V).float() @ embeddings.weight  # (B, S, E)
    if scale:
        expected = expected * math.sqrt(E)
    assert torch.allclose(embeddings(ids), expected, atol=1e-6)


def test_pad_row_is_zero_and_gets_no_gradient():
    embeddings = Embeddings(V, E, PAD_ID, EmbeddingConfig(init="uniform", init_scale=0.5))
    assert torch.equal(embeddings.weight[PAD_ID], torch.zeros(E))
    ids = make_src()
    (embeddings(ids) ** 2).sum().backward()
    grad = embeddings.weight.grad
    assert torch.equal(grad[PAD_ID], torch.zeros(E))
    # only the rows of pieces in the batch receive gradient
    used = set(ids.flatten().tolist()) - {PAD_ID}
    for row in range(V):
        assert bool(grad[row].abs().sum() > 0) == (row in used)


@pytest.mark.parametrize("scheme", INIT_SCHEMES)
def test_every_init_scheme_runs_and_zeroes_the_pad_row(scheme):
    weight = torch.full((200, 8), float("nan"))
    init_embedding_(weight, scheme, 0.05, PAD_ID)
    assert torch.isfinite(weight).all()
    assert torch.equal(weight[PAD_ID], torch.zeros(8))
    assert (weight[1:].abs().sum(1) > 0).all()
    if scheme == "uniform":
        assert weight.abs().max() <= 0.05
    if scheme == "normal":
        assert weight[1:].std().item() == pytest.approx(0.05, rel=0.15)


def test_unknown_init_scheme_is_rejected():
    with pytest.raises(ValueError):
        init_embedding_(torch.zeros(3, 2), "orthogonal", 0.1, PAD_ID)


# --- attention ---------------------------------------------------------------------------------------------

def test_attention_weights_sum_to_one_and_padding_gets_exactly_zero():
    attention = BahdanauAttention(H, 2 * H, A)
    states = torch.randn(B, S, 2 * H)
    mask = make_src() != PAD_ID
    context, weights = attention(torch.randn(B, H), attention.project_keys(states), states, mask)
    assert weights.shape == (B, S) and context.shape == (B, 2 * H)
    assert torch.allclose(weights.sum(-1), torch.ones(B), atol=1e-6)
    assert torch.equal(weights[~mask], torch.zeros(int((~mask).sum())))
    assert (weights[mask] > 0).all()
    assert torch.allclose(context, torch.einsum("bs,bsd->bd", weights, states), atol=1e-6)


def test_attention_ignores_values_at_padded_positions():
    attention = BahdanauAttention(H, 2 * H, A)
    states = torch.randn(B, S, 2 * H)
    mask = make_src() != PAD_ID
    query = torch.randn(B, H)
    context, _ = attention(query, attention.project_keys(states), states, mask)
    noisy = states.masked_fill(~mask.unsqueeze(-1), 1e3)
    noisy_context, _ = attention(query, attention.project_keys(noisy), noisy, mask)
    assert torch.allclose(context, noisy_context, atol=1e-6)


# --- encoder -----------------------------------------------------------------------------------------------

def test_encoder_states_are_zero_at_padding_and_final_matches_the_ends():
    encoder = Encoder(E, H, num_layers=1, rnn_dropout=0.0, dropout=0.5).eval()
    embedded = torch.randn(B, S, E)
    states, final = encoder(embedded, SRC_LENS)
    assert states.shape == (B, S, 2 * H) and final.shape == (B, 2 * H)
    padded = make_src() == PAD_ID
    assert torch.equal(states[padded], torch.zeros(int(padded.sum()), 2 * H))
    assert (states[~padded].abs().sum(-1) > 0).all()
    for b, length in enumerate(SRC_LENS.tolist()):
        # forward direction ends at the last real token, backward direction at the first
        assert torch.allclose(final[b, :H], states[b, length - 1, :H])
        assert torch.allclose(final[b, H:], states[b, 0, H:])


@pytest.mark.parametrize("layers", [1, 2])
def test_packing_makes_the_encoder_independent_of_extra_padding(layers):
    encoder = Encoder(E, H, num_layers=layers, rnn_dropout=0.0, dropout=0.0).eval()
    embedded = torch.randn(B, S, E)
    wider = torch.cat([embedded, torch.randn(B, 4, E)], dim=1)  # garbage beyond every length
    states, final = encoder(embedded, SRC_LENS)
    wide_states, wide_final = encoder(wider, SRC_LENS)
    assert wide_states.shape == (B, S + 4, 2 * H)
    assert torch.allclose(states, wide_states[:, :S], atol=1e-6)
    assert torch.equal(wide_states[:, S:], torch.zeros(B, 4, 2 * H))
    assert torch.allclose(final, wide_final, atol=1e-6)
    # and of the other sentences in the batch
    alone, alone_final = encoder(embedded[1:2, :3], SRC_LENS[1:2])
    assert torch.allclose(alone, states[1:2, :3], atol=1e-6)
    assert torch.allclose(alone_final, final[1:2], atol=1e-6)


# quantum 3: products run over row counts rounded up to a multiple of 3, as bf16 on a CPU does with 32
# (nmt.precision.row_quantum): the 14 packed tokens' input projection over 15 rows, and the steps of 4, 3, 3, 2, 2
# sentences over 6, 3, 3, 3, 3
@pytest.mark.parametrize("quantum", [1, 3])
@pytest.mark.parametrize("layers", [1, 2])
def test_fused_encoder_equals_nn_gru_over_a_packed_batch(monkeypatch, layers, quantum):
    """The CPU path (one Function per layer) against torch's GRU: states, final state and every gradient."""
    for module in (nmt.model.birecurrence, nmt.model.encoder):
        monkeypatch.setattr(module, "row_quantum", lambda tensor, tokens=False: quantum)
    torch.manual_seed(4)
    encoder = Encoder(E, H, num_layers=layers, rnn_dropout=0.0, dropout=0.0).double()
    lens = torch.tensor([5, 3, 1, 5])
    embedded = torch.randn(4, S + 1, E, dtype=torch.double, requires_grad=True)  # a padded column beyond every length
    weight, final_weight = torch.randn(4, S + 1, 2 * H, dtype=torch.double), torch.randn(4, 2 * H, dtype=torch.double)
    results = []
    for run in (encoder._packed, encoder._fused):
        states, final = run(embedded, lens)
        loss = (states * weight).sum() + (final * final_weight).sum()
        results.append((states, final, torch.autograd.grad(loss, [embedded, *encoder.parameters()])))
    (packed, packed_final, packed_grads), (fused, fused_final, fused_grads) = results
    assert torch.allclose(fused, packed, atol=1e-12) and torch.allclose(fused_final, packed_final, atol=1e-12)
    assert torch.equal(fused[:, S:], torch.zeros(4, 1, 2 * H, dtype=torch.double))
    assert len(fused_grads) == 1 + 4 * 2 * layers
    for ours, torch_grad in zip(fused_grads, packed_grads):
        assert torch.allclose(ours, torch_grad, atol=1e-12)


@pytest.mark.parametrize("quantum", [1, 3])
def test_fused_encoder_gradients_pass_gradcheck(monkeypatch, quantum):
    """The hand-written backward of BiGRUUnroll against finite differences, on a packed batch of
    lengths 5, 3, 1 (steps of 3, 2, 2, 1, 1 sentences), with each step's products over its own rows or over
    rows rounded up to a multiple of 3."""
    monkeypatch.setattr(nmt.model.birecurrence, "row_quantum", lambda tensor, tokens=False: quantum)
    generator = torch.Generator().manual_seed(3)
    make = lambda *shape: torch.randn(*shape, dtype=torch.double, generator=generator).requires_grad_()  # noqa: E731
    batch_sizes = [3, 2, 2, 1, 1]
    inputs = (make(2, sum(batch_sizes), 3 * H), make(2, 3 * H, H), make(2, 3 * H))
    unroll = lambda gates, w_hh, b_hh: BiGRUUnroll.apply(gates, batch_sizes, w_hh, b_hh)  # noqa: E731
    assert torch.autograd.gradcheck(unroll, inputs)


def test_reverse_within_lengths_reverses_real_positions_and_is_its_own_inverse():
    index = reverse_within_lengths(SRC_LENS, S)
    assert index.tolist() == [[4, 3, 2, 1, 0], [2, 1, 0, 3, 4], [0, 1, 2, 3, 4]]
    assert torch.equal(index.gather(1, index), torch.arange(S).expand(B, S))


# --- decoder -----------------------------------------------------------------------------------------------

def test_gru_update_equals_torch_gru_cell():
    cell = torch.nn.GRUCell(E, H)
    x, h = torch.randn(B, E), torch.randn(B, H)
    ours = gru_update(F.linear(x, cell.weight_ih, cell.bias_ih), F.linear(h, cell.weight_hh, cell.bias_hh), h)
    assert torch.allclose(ours, cell(x, h), atol=1e-6)


def reference_decoder(decoder: Decoder, embedded, hidden, states, mask):
    """The decoder written out from its equations with torch's own GRUCell, sharing no code with `Decoder`:
    e_j = v . tanh(W s_top + U h_j), a = softmax(e) over the real positions, c = sum_j a_j h_j; layer 0
    reads [y; c], each layer above reads the new state of the one below; the output is tanh(W_o [s_top; c; y])."""
    attention = decoder.attention
    keys = states @ attention.key_proj.weight.T + attention.key_proj.bias  # (B, S, A)
    layers = list(hidden)
    outputs, weights = [], []
    for t in range(embedded.size(1)):
        scores = torch.tanh((layers[-1] @ attention.query_proj.weight.T).unsqueeze(1) + keys) @ attention.v.weight[0]
        a = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)  # (B, S)
        context = torch.einsum("bs,bsd->bd", a, states)
        layers[0] = decoder.cell(torch.cat([embedded[:, t], context], dim=-1), layers[0])
        for layer, cell in enumerate(decoder.upper_cells, start=1):
            layers[layer] = cell(layers[layer - 1], layers[layer])
        outputs.append(torch.tanh(decoder.pre_output(torch.cat([layers[-1], context, embedded[:, t]], dim=-1))))
        weights.append(a)
    return torch.stack(outputs, 1), torch.stack(weights, 1), torch.stack(layers)


@pytest.mark.parametrize("layers", [1, 2])
def test_decoder_forward_and_step_follow_the_equations(layers):
    decoder = Decoder(E, H, 2 * H, A, num_layers=layers, dropout=0.3, rnn_dropout=0.3).eval()
    states = torch.randn(B, S, 2 * H)
    keys = decoder.attention.project_keys(states)
    mask = make_src() != PAD_ID
    hidden = decoder.init_hidden(torch.randn(B, 2 * H))
    assert hidden.shape == (layers, B, H)
    embedded = torch.randn(B, T, E)
    expected_output, expected_attention, expected_hidden = reference_decoder(decoder, embedded, hidden, states, mask)
    pre_output, attention = decoder(embedded, hidden, states, keys, mask)
    assert pre_output.shape == (B, T, E) and attention.shape == (B, T, S)
    assert torch.allclose(pre_output, expected_output, atol=1e-6, rtol=1e-5)
    assert torch.allclose(attention, expected_attention, atol=1e-6, rtol=1e-5)
    for t in range(T):
        step_out, hidden, weights = decoder.step(embedded[:, t], hidden, states, keys, mask)
        assert torch.allclose(step_out, pre_output[:, t], atol=1e-6, rtol=1e-5)
        assert torch.allclose(weights, attention[:, t], atol=1e-6, rtol=1e-5)
    assert torch.allclose(hidden, expected_hidden, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("quantum", [1, 2, 5])
def test_fused_recurrence_gradients_pass_gradcheck(monkeypatch, quantum):
    """The hand-written backward of AttentionGRUUnroll against finite differences, padding included, with each
    step's products over its B rows or over B rounded up to a multiple of 2 or 5 (as bf16 on a CPU does)."""
    monkeypatch.setattr(nmt.model.recurrence, "row_quantum", lambda tensor, tokens=False: quantum)
    generator = torch.Generator().manual_seed(3)
    make = lambda *shape: torch.randn(*shape, dtype=torch.double, generator=generator).requires_grad_()  # noqa: E731
    mask = make_src() != PAD_ID
    inputs = (make(B, T, 3 * H), make(B, H), make(B, S, 2 * H), make(B, S, A), make(3 * H + A, H), make(3 * H),
              make(3 * H, 2 * H), make(A))
    unroll = lambda *a: AttentionGRUUnroll.apply(*a[:4], mask, *a[4:])[:2]  # noqa: E731
    assert torch.autograd.gradcheck(unroll, inputs)


@pytest.mark.parametrize("quantum", [1, 2])
def test_fused_decoder_forward_and_gradients_equal_the_step_by_step_unroll(monkeypatch, quantum):
    """Quantum 2: products over rows rounded up to a multiple of 2, as bf16 on a CPU does with 32 and 128 (the
    recurrence's steps, and the key, embedding and deep-output projections through precision.with_padded_rows)."""
    for module in (nmt.model.recurrence, nmt.precision):
        monkeypatch.setattr(module, "row_quantum", lambda tensor, tokens=False: quantum)
    decoder = Decoder(E, H, 2 * H, A, num_layers=1, dropout=0.0, rnn_dropout=0.0)
    states = torch.randn(B, S, 2 * H, requires_grad=True)
    embedded = torch.randn(B, T, E, requires_grad=True)
    mask = make_src() != PAD_ID
    final = torch.randn(B, 2 * H)
    target = torch.randn(B, T, E)

    def loss_and_grads(unroll_by_steps: bool):
        decoder.zero_grad()
        states.grad = embedded.grad = None
        keys = decoder.attention.project_keys(states)
        hidden = decoder.init_hidden(final)
        if unroll_by_steps:  # the autograd reference: the same loop that decoding uses
            outputs = []
            for t in range(T):
                out, hidden, _ = decoder.step(embedded[:, t], hidden, states, keys, mask)
                outputs.append(out)
            pre_output = torch.stack(outputs, 1)
        else:
            pre_output, _ = decoder(embedded, hidden, states, keys, mask)
        loss = ((pre_output - target) ** 2).sum()
        loss.backward()
        grads = {name: p.grad.clone() for name, p in decoder.named_parameters()}
        return loss.detach(), grads, states.grad.clone(), embedded.grad.clone()

    fused, reference = loss_and_grads(False), loss_and_grads(True)
    assert torch.allclose(fused[0], reference[0], rtol=1e-5)
    for name in reference[1]:
        assert torch.allclose(fused[1][name], reference[1][name], atol=1e-5, rtol=1e-4), name
    assert torch.allclose(fused[2], reference[2], atol=1e-5, rtol=1e-4)
    assert torch.allclose(fused[3], reference[3], atol=1e-5, rtol=1e-4)


def test_fused_decoder_runs_under_bf16_autocast():
    decoder = Decoder(E, H, 2 * H, A, num_layers=1, dropout=0.0, rnn_dropout=0.0)
    states = torch.randn(B, S, 2 * H)
    mask = make_src() != PAD_ID
    with torch.autocast("cpu", dtype=torch.bfloat16):
        keys = decoder.attention.project_keys(states)
        pre_output, attention = decoder(torch.randn(B, T, E), decoder.init_hidden(torch.randn(B, 2 * H)),
                                        states, keys, mask)
        pre_output.float().sum().backward()
    assert pre_output.dtype == torch.bfloat16 and torch.isfinite(pre_output).all()
    assert torch.allclose(attention.float().sum(-1), torch.ones(B, T), atol=1e-2)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in decoder.parameters())


@pytest.mark.parametrize("overrides", [dict(decoder_layers=2, encoder_layers=2), dict(output_size=E + 5)])
def test_seq2seq_step_unrolled_equals_forward_log_probs(overrides):
    model = tiny_model(**overrides).eval()
    assert model.output.in_features == overrides.get("output_size", E)
    src, tgt_in = make_src(), make_tgt_in()
    logits = model(src, SRC_LENS, tgt_in)
    assert logits.shape == (B, T, V)
    encoded, hidden = model.encode(src, SRC_LENS)
    assert encoded.states.shape == (B, S, 2 * H) and encoded.keys.shape == (B, S, A)
    assert torch.equal(encoded.mask, src != PAD_ID)
    for t in range(T):
        log_probs, hidden, weights = model.step(tgt_in[:, t], hidden, encoded)
        assert log_probs.shape == (B, V) and weights.shape == (B, S)
        assert torch.allclose(log_probs, torch.log_softmax(logits[:, t], -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [{}, dict(decoder_layers=2, encoder_layers=2), dict(output_size=E + 5)])
@pytest.mark.parametrize("table", [False, True])
def test_search_step_on_a_beam_of_rows_per_sentence_equals_the_plain_step_on_repeated_sentences(overrides, table):
    """The search's step (projected states, K rows reading one copy of their sentence, the previous tokens'
    terms computed or looked up in the token table) computes the same log-probabilities, states and
    attention as the plain step on each sentence repeated K times."""
    model, K = tiny_model(**overrides).eval(), 3
    with model.token_table() if table else contextlib.nullcontext():
        assert (model._token_table is not None) == table
        check_search_step(model, K)


def check_search_step(model, K):
    src = make_src()
    encoded, hidden = model.encode(src, SRC_LENS, for_search=True)
    assert encoded.projected.shape == (B, S, 3 * H + model.output.in_features) and encoded.beam == 1
    plain, _ = model.encode(src.repeat_interleave(K, 0), SRC_LENS.repeat_interleave(K))
    searched = encoded.with_beam(K)
    generator = torch.Generator().manual_seed(7)
    fast = slow = hidden.repeat_interleave(K, 1) + 0.1 * torch.randn(hidden.size(0), B * K, H, generator=generator)
    with torch.no_grad():
        for t in range(T):
            prev = torch.randint(4, V, (B * K,), generator=generator)  # each row its own token and state
            fast_lp, fast, fast_w = model.step(prev, fast, searched)
            slow_lp, slow, slow_w = model.step(prev, slow, plain)
            assert fast_lp.shape == (B * K, V) and fast_w.shape == (B * K, S)
            assert torch.allclose(fast_lp, slow_lp, atol=1e-5, rtol=1e-5)
            assert torch.allclose(fast, slow, atol=1e-6, rtol=1e-5)
            assert torch.allclose(fast_w, slow_w, atol=1e-6, rtol=1e-5)
            assert not fast_w[2 * K:, 1:].any()  # the third sentence's padding gets no weight in all its rows
    kept = searched.select(torch.tensor([2, 0]))
    assert kept.beam == K and torch.equal(kept.projected, encoded.projected[[2, 0]])
    with pytest.raises(ValueError, match="for_search"):
        model.step(prev, slow, plain.with_beam(K))


def test_search_token_table_holds_the_per_step_terms_while_it_is_open():
    """Within `token_table` the search looks each previous token's terms up in a table of the vocabulary, made
    from the weights when the block opens; outside it, and in training mode, the terms are computed."""
    model = tiny_model(embeddings=EmbeddingConfig(scale=True)).eval()
    prev = torch.tensor([5, 1, 5, 10, 3])
    with torch.no_grad():
        computed = model.token_terms(prev)
        assert model._token_table is None and computed.shape == (5, 3 * H + E)
        assert torch.allclose(computed, model.decoder.project_tokens(model.tgt_embed(prev)))
        with model.token_table():
            assert model._token_table.shape == (V, 3 * H + E)
            assert torch.allclose(model.token_terms(prev), computed, atol=1e-6)
            model.train()  # training mode inside the block: computed, with dropout, not looked up
            assert not torch.equal(model.token_terms(prev), model.token_terms(prev))
            model.eval()
        assert model._token_table is None  # closed: no table, so changed weights cannot meet a stale one
        with torch.autocast("cpu", dtype=torch.bfloat16), model.token_table():
            assert model.token_terms(prev).dtype == torch.bfloat16  # made under the caller's autocast
    with model.train().token_table():
        assert model._token_table is None  # training mode: dropout may act, no table
    renormed = tiny_model(embeddings=EmbeddingConfig(max_norm=1.0)).eval()
    with renormed.token_table():
        assert renormed._token_table is None  # a max_norm lookup changes the weight as it reads it


def test_cpu_float32_tanh_is_torchs_sigmoid_and_agrees_with_tanh():
    """The model's tanh: in float32 on a CPU, 2 sigmoid(2x) - 1 bit for bit (torch's own kernel, whose results do not
    depend on MKL's threads), within 2e-7 of tanh in value and gradient; torch.tanh itself in bfloat16. The reference
    is Python's math.tanh: torch.tanh is the MKL function that varies."""
    x = torch.cat([torch.linspace(-12, 12, 20_001), torch.tensor([0.0, 1e-8, -1e-30, 40.0, -40.0])]).requires_grad_()
    y = tanh(x)
    assert torch.equal(y, torch.sigmoid(2 * x) * 2 - 1)
    expected = torch.tensor([math.tanh(v) for v in x.tolist()], dtype=torch.float64)
    assert torch.allclose(y.double(), expected, rtol=0, atol=2e-7) and y[-2] == 1 and y[-1] == -1
    (grad,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(grad.double(), 1 - expected ** 2, rtol=0, atol=5e-7)
    buffer = torch.full((3, 8), float("nan"))
    out = tanh(x.detach()[:16].view(2, 8), out=buffer[1:])  # a view, written in place, as the recurrences do
    assert out.data_ptr() == buffer[1:].data_ptr() and torch.equal(buffer[1:], y.detach()[:16].view(2, 8))
    assert buffer[0].isnan().all()
    half = x.detach().to(torch.bfloat16)
    assert torch.equal(tanh(half), torch.tanh(half))


def test_dropout_acts_only_in_training_mode():
    model = tiny_model()
    src, tgt_in = make_src(), make_tgt_in()
    model.eval()
    assert torch.equal(model(src, SRC_LENS, tgt_in), model(src, SRC_LENS, tgt_in))
    model.train()
    assert not torch.equal(model(src, SRC_LENS, tgt_in), model(src, SRC_LENS, tgt_in))


def test_word_dropout_drops_whole_tokens_in_training_only():
    torch.manual_seed(0)
    drop = tiny_model(word_dropout=0.25).word_dropout.train()
    x = torch.rand(64, 50, 7) + 0.5  # no zero features of its own
    y = drop(x)
    dropped = (y == 0).all(-1)  # (B, L)
    assert torch.equal(dropped, (y == 0).any(-1))  # a token goes whole or not at all
    assert abs(dropped.float().mean().item() - 0.25) < 0.02
    assert torch.allclose(y[~dropped], x[~dropped] / 0.75)
    assert torch.equal(drop.eval()(x), x)
    # in the model, training differs from eval even with no other dropout, and eval is deterministic
    model = tiny_model(dropout=0.0, word_dropout=0.3)
    src, tgt_in = make_src(), make_tgt_in()
    assert not torch.equal(model.train()(src, SRC_LENS, tgt_in), model(src, SRC_LENS, tgt_in))
    plain = tiny_model(dropout=0.0)
    plain.load_state_dict(model.state_dict())
    assert torch.equal(model.eval()(src, SRC_LENS, tgt_in), plain.eval()(src, SRC_LENS, tgt_in))


def test_tied_embeddings_share_one_tensor():
    model = tiny_model(tie_embeddings=True)
    assert model.output.weight is model.tgt_embed.weight
    assert model.output.weight.data_ptr() == model.tgt_embed.embedding.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tiny_model().parameters()) - V * E
    # a state_dict round trip keeps the tie
    clone = tiny_model(tie_embeddings=True)
    clone.load_state_dict(model.state_dict())
    assert clone.output.weight is clone.tgt_embed.weight
    assert torch.equal(clone.output.weight, model.tgt_embed.weight)


def test_three_way_tying_shares_one_parameter():
    model = tiny_model(tie_embeddings=True, tie_src_tgt=True)
    assert model.src_embed.weight is model.tgt_embed.weight is model.output.weight
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tiny_model().parameters()) - 2 * V * E
    logits = model(make_src(), SRC_LENS, make_tgt_in())
    logits.logsumexp(-1).sum().backward()
    grad = model.output.weight.grad  # one gradient, summed over the three uses
    assert grad is not None and grad.abs().sum() > 0
    clone = tiny_model(tie_embeddings=True, tie_src_tgt=True)
    clone.load_state_dict(model.state_dict())
    assert clone.src_embed.weight is clone.tgt_embed.weight is clone.output.weight
    assert torch.equal(clone.src_embed.weight, model.src_embed.weight)
    source_only = tiny_model(tie_src_tgt=True)  # source and target shared, output layer separate
    assert source_only.src_embed.weight is source_only.tgt_embed.weight
    assert source_only.output.weight is not source_only.tgt_embed.weight
    with pytest.raises(ValueError, match="one vocabulary"):
        build_model(ModelConfig(embedding_dim=E, hidden_size=H, tie_src_tgt=True), V, V + 1)


def test_sparse_embeddings_give_row_sparse_gradients():
    dense = Embeddings(V, E, PAD_ID, EmbeddingConfig())
    sparse = Embeddings(V, E, PAD_ID, EmbeddingConfig(sparse=True))
    sparse.load_state_dict(dense.state_dict())
    ids = make_src()
    for module in (dense, sparse):
        (module(ids) ** 2).sum().backward()
    assert sparse.weight.grad.is_sparse and not dense.weight.grad.is_sparse
    assert torch.equal(sparse.weight.grad.to_dense(), dense.weight.grad)
    rows = set(sparse.weight.grad.coalesce().indices()[0].tolist())
    assert rows == set(ids.flatten().tolist()) - {PAD_ID}  # just the rows read, pad excluded


def test_untied_embeddings_are_separate():
    model = tiny_model()
    assert model.output.weight.data_ptr() != model.tgt_embed.weight.data_ptr()


def test_loss_gradient_reaches_every_parameter():
    model = tiny_model(decoder_layers=2, encoder_layers=2, rnn_dropout=0.1).train()
    logits = model(make_src(), SRC_LENS, make_tgt_in())
    logits.logsumexp(-1).sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_masked_forward_gives_the_logits_of_the_real_positions_only():
    model = tiny_model().eval()
    src, tgt_in = make_src(), make_tgt_in()
    tgt_mask = tgt_in != PAD_ID
    full = model(src, SRC_LENS, tgt_in)  # (B, T, V)
    real = model(src, SRC_LENS, tgt_in, tgt_mask)  # (N, V)
    assert real.shape == (int(tgt_mask.sum()), V)
    assert torch.allclose(real, full[tgt_mask], atol=1e-6)
