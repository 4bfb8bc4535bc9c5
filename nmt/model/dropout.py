"""Dropout whose CPU mask comes from uniform floats rather than torch's CPU bernoulli."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def uniform_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout(x, p, training): each element zeroed with probability p, the others scaled by 1 / (1 - p).

    On a CPU the mask is U[0, 1) >= p, drawn in float32 whatever x's dtype (as torch's CUDA dropout
    draws it): torch's CPU dropout draws it with bernoulli_, which took 40 ms on a (135, 30, 1024)
    tensor of the reference model's encoder states, where this took 16 ms (docs/speed.md). Elsewhere,
    and for p of 0 or 1, it is F.dropout.
    """
    if not training or x.device.type != "cpu" or not 0.0 < p < 1.0:
        return F.dropout(x, p, training)
    mask = torch.rand(x.shape, dtype=torch.float32, device=x.device).ge_(p).mul_(1.0 / (1.0 - p))
    return x * mask.to(x.dtype)  # autograd keeps the mask alone for the gradient


class Dropout(nn.Dropout):
    """nn.Dropout through `uniform_dropout`: the same module (no parameters, the same repr), a cheaper CPU mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) if self.inplace else uniform_dropout(x, self.p, self.training)
