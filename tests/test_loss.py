"""The output layer fused with its label-smoothed cross-entropy equals F.linear + F.cross_entropy, in value
and gradient, whatever the blocking; under autocast; without grad; with a frozen weight; inside the model."""

import pytest
import torch
import torch.nn.functional as F

import nmt.loss
import nmt.precision
from nmt.config import ModelConfig
from nmt.loss import linear_cross_entropy_sum
from nmt.model.seq2seq import build_model


def reference(hidden, weight, bias, targets, eps):
    return F.cross_entropy(F.linear(hidden, weight, bias), targets, label_smoothing=eps, reduction="sum")


def leaves(N=23, E=6, V=17, bias=True, dtype=torch.double, seed=0):
    generator = torch.Generator().manual_seed(seed)
    make = lambda *shape: (torch.randn(*shape, generator=generator, dtype=dtype) * 2).requires_grad_()  # noqa: E731
    return make(N, E), make(V, E), make(V) if bias else None, torch.randint(0, V, (N,), generator=generator)


def grads(loss, tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("block_rows", [1, 5, 23, 100])  # one row a block, a ragged last block, one block
def test_equals_linear_then_cross_entropy(monkeypatch, eps, bias, block_rows):
    hidden, weight, bias_, targets = leaves(bias=bias)
    monkeypatch.setitem(nmt.loss.BLOCK_ENTRIES, "cpu", block_rows * weight.size(0))
    ours = linear_cross_entropy_sum(hidden, weight, bias_, targets, eps) * 0.5
    theirs = reference(hidden, weight, bias_, targets, eps) * 0.5
    assert torch.allclose(ours, theirs, rtol=1e-12)
    for a, b in zip(grads(ours, (hidden, weight, bias_)), grads(theirs, (hidden, weight, bias_))):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_blocks_are_small(monkeypatch):
    """No block holds more logits than BLOCK_ENTRIES allows (16 rows at least): the point of the blocking."""
    hidden, weight, bias, targets = leaves(N=200, V=17)
    monkeypatch.setitem(nmt.loss.BLOCK_ENTRIES, "cpu", 17 * 40)
    rows, addmm = [], torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda b, x, w: rows.append(x.size(0)) or addmm(b, x, w))
    linear_cross_entropy_sum(hidden, weight, bias, targets, 0.1).backward()
    assert rows == [40] * 5


def test_without_grad_gives_the_loss_alone():
    hidden, weight, bias, targets = leaves()
    with torch.no_grad():
        loss = linear_cross_entropy_sum(hidden, weight, bias, targets, 0.1)
    assert not loss.requires_grad
    assert torch.allclose(loss, reference(hidden, weight, bias, targets, 0.1).detach(), rtol=1e-12)


def test_frozen_weight_gets_no_gradient():
    hidden, weight, bias, targets = leaves()
    frozen = weight.detach()
    linear_cross_entropy_sum(hidden, frozen, bias, targets, 0.1).backward()
    expected = grads(reference(hidden, frozen, bias, targets, 0.1), (hidden, bias))
    assert frozen.grad is None
    assert torch.allclose(hidden.grad, expected[0]) and torch.allclose(bias.grad, expected[1])


def test_bf16_autocast_products_and_float32_loss():
    hidden, weight, bias, targets = leaves(N=64, E=32, V=50, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy_sum(hidden, weight, bias, targets, 0.1)
        theirs = F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, label_smoothing=0.1, reduction="sum")
    assert ours.dtype == torch.float32
    ours_grads, theirs_grads = grads(ours, (hidden, weight, bias)), grads(theirs, (hidden, weight, bias))
    assert all(g.dtype == torch.float32 for g in ours_grads)  # the float32 leaves' gradients, through the casts
    assert torch.allclose(ours, theirs, rtol=2e-3)
    for a, b in zip(ours_grads, theirs_grads):
        assert (a - b).abs().max() <= 0.02 * b.abs().max()  # bf16 products round differently, not wrongly


@pytest.mark.parametrize("tied", [False, True])
def test_model_loss_equals_cross_entropy_of_its_logits(tied):
    """Seq2Seq(..., targets) is the summed loss of Seq2Seq(...)'s logits, gradients of every weight included,
    with the output weight shared with both embeddings or not."""
    cfg = ModelConfig(embedding_dim=8, hidden_size=10, attention_size=6, dropout=0.0,
                      tie_embeddings=tied, tie_src_tgt=tied)
    torch.manual_seed(0)
    model = build_model(cfg, 30, 30).double()
    src = torch.randint(4, 30, (3, 7))
    src_lens = torch.tensor([7, 5, 2])
    src[1, 5:], src[2, 2:] = 0, 0
    tgt_in, tgt_out = torch.randint(4, 30, (3, 6)), torch.randint(4, 30, (3, 6))
    tgt_out[0, 4:] = 0
    mask = tgt_out != 0
    ours = model(src, src_lens, tgt_in, mask, tgt_out[mask], 0.1)
    theirs = F.cross_entropy(model(src, src_lens, tgt_in, mask), tgt_out[mask], label_smoothing=0.1, reduction="sum")
    assert torch.allclose(ours, theirs, rtol=1e-12)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(theirs, params)):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_target_whose_probability_underflows_still_gets_its_exact_loss(dtype):
    """The log-sum-exp of a row is l_y - log p_y, which fails when p_y underflows to 0: such a row (here the
    target's logit is 200 below the others, exp(-200) < 1e-86) takes the long way, and the loss stays exact."""
    hidden = torch.zeros(4, 2, dtype=dtype)
    hidden[:, 0] = 1.0
    weight = torch.zeros(5, 2, dtype=dtype)
    weight[:, 0] = torch.tensor([100.0, 100.0, -100.0, 0.0, 3.0])
    bias = torch.zeros(5, dtype=dtype)
    targets = torch.tensor([2, 0, 2, 4])  # rows 0 and 2: p_y = exp(-200) / 2
    ours = linear_cross_entropy_sum(hidden, weight, bias, targets, 0.1)
    theirs = reference(hidden.double(), weight.double(), bias.double(), targets, 0.1)
    assert torch.isfinite(ours)
    assert torch.allclose(ours.double(), theirs, rtol=1e-6)


def test_bf16_on_a_cpu_pads_rows_to_shapes_seen_before(monkeypatch):
    """Under bf16 on a CPU every block's products have a row count that is a multiple of ONEDNN_TOKEN_ROWS (oneDNN makes a
    kernel per new shape), and the zero rows added for that change neither the loss nor any gradient."""
    hidden, weight, bias, targets = leaves(N=70, E=8, V=17, dtype=torch.float32)
    monkeypatch.setitem(nmt.loss.BLOCK_ENTRIES, "cpu", 17 * 40)

    def run(quantum):
        monkeypatch.setattr(nmt.precision, "ONEDNN_TOKEN_ROWS", quantum)
        rows, addmm = [], torch.addmm
        monkeypatch.setattr(torch, "addmm", lambda b, x, w: rows.append(x.size(0)) or addmm(b, x, w))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_cross_entropy_sum(hidden, weight, bias, targets, 0.1)
        monkeypatch.setattr(torch, "addmm", addmm)
        return rows, loss, grads(loss, (hidden, weight, bias))

    rows, loss, loss_grads = run(32)
    plain_rows, plain_loss, plain_grads = run(1)
    assert rows == [64, 32] and plain_rows == [40, 30]
    assert torch.allclose(loss, plain_loss, rtol=1e-3)
    for a, b in zip(loss_grads, plain_grads):
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 0.01 * b.abs().max()
