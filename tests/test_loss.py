"""The fused label-smoothed cross-entropy equals torch's, in value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from nmt.loss import cross_entropy_sum


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_fused_cross_entropy_equals_torch(eps):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 11, generator=generator, dtype=torch.double) * 3
    targets = torch.randint(0, 11, (7,), generator=generator)
    ours_in, theirs_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = cross_entropy_sum(ours_in, targets, eps) * 0.5
    theirs = F.cross_entropy(theirs_in.float(), targets, label_smoothing=eps, reduction="sum").double() * 0.5
    assert torch.allclose(ours.double(), theirs, atol=1e-5)
    ours.backward()
    theirs.backward()
    assert torch.allclose(ours_in.grad, theirs_in.grad, atol=1e-6)
    assert torch.allclose(ours_in.grad.sum(-1), torch.zeros(7, dtype=torch.double), atol=1e-6)  # rows sum to 0


def test_fused_cross_entropy_handles_bf16_logits():
    logits = torch.randn(5, 9).to(torch.bfloat16).requires_grad_()
    loss = cross_entropy_sum(logits, torch.tensor([0, 1, 2, 3, 8]), 0.1)
    loss.backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
