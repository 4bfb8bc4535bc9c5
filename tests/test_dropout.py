"""uniform_dropout / Dropout: torch's dropout, with the CPU mask drawn from uniform floats."""

from __future__ import annotations

import pytest
import torch

from nmt.model.dropout import Dropout, uniform_dropout


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_drops_a_share_p_and_scales_the_rest(p, dtype):
    torch.manual_seed(0)
    x = (torch.rand(400, 1000) + 0.5).to(dtype)  # no zeros of its own
    state = torch.get_rng_state()
    y = uniform_dropout(x, p, training=True)
    assert y.dtype == dtype and y.shape == x.shape
    dropped = y == 0
    torch.set_rng_state(state)
    assert torch.equal(dropped, torch.rand(x.shape) < p)  # drawn in float32, also for bfloat16 (a coarser draw)
    # 400,000 draws: the share's standard deviation is below 0.001, whatever the dtype of x
    assert abs(dropped.float().mean().item() - p) < 0.005
    expected = (x[~dropped].float() * torch.tensor(1 / (1 - p), dtype=dtype).float()).to(dtype)
    assert torch.equal(y[~dropped], expected)


def test_the_gradient_is_the_mask_of_the_forward():
    torch.manual_seed(1)
    x = (torch.rand(50, 70) + 0.5).requires_grad_()
    grad = torch.randn(50, 70)
    y = uniform_dropout(x, 0.4, training=True)
    y.backward(grad)
    kept = y != 0
    assert torch.allclose(x.grad, grad * kept / 0.6)
    assert kept.float().mean().item() == pytest.approx(0.6, abs=0.03)


def test_a_seed_gives_the_same_mask_and_draws_advance():
    x = torch.ones(30, 40)
    torch.manual_seed(7)
    first, second = uniform_dropout(x, 0.5, True), uniform_dropout(x, 0.5, True)
    torch.manual_seed(7)
    assert torch.equal(uniform_dropout(x, 0.5, True), first)
    assert not torch.equal(first, second)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_edges_and_evaluation_are_torchs(p):
    x = torch.rand(20, 30) + 0.5
    assert torch.equal(uniform_dropout(x, p, training=True), torch.nn.functional.dropout(x, p, True))
    assert torch.equal(uniform_dropout(x, 0.5, training=False), x)


def test_the_module_is_nn_dropout():
    drop = Dropout(0.25)
    assert isinstance(drop, torch.nn.Dropout) and repr(drop) == repr(torch.nn.Dropout(0.25))
    assert drop.state_dict() == {}
    x = torch.rand(100, 100) + 0.5
    assert torch.equal(drop.eval()(x), x)
    torch.manual_seed(3)
    y = drop.train()(x)
    assert abs((y == 0).float().mean().item() - 0.25) < 0.02
