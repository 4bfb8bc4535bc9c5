"""Label-smoothed cross-entropy as one autograd Function.

F.cross_entropy with label smoothing makes about eight passes over the (N, V) logits in forward and
backward (log-softmax, the target term, the smoothing sum, a zero-filled gradient, a scatter, the
sum's expanded gradient, their sum, the log-softmax backward). With V = 8,000 those passes cost more
than a tenth of a training step on a CPU. Here forward keeps the log-probabilities, and backward
turns them into the gradient in place: softmax - ((1 - eps) * one_hot(y) + eps / V).
"""

from __future__ import annotations

import torch


class SmoothedCrossEntropy(torch.autograd.Function):
    """logits (N, V), targets (N,) long, eps -> summed loss (scalar, float32)."""

    @staticmethod
    def forward(ctx, logits, targets, eps: float):
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
        target_term = log_probs.gather(1, targets.unsqueeze(1)).sum()
        loss = -(1.0 - eps) * target_term
        if eps:
            loss = loss - eps / log_probs.size(1) * log_probs.sum()
        ctx.save_for_backward(log_probs, targets)
        ctx.eps, ctx.logits_dtype = eps, logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        log_probs, targets = ctx.saved_tensors
        grad = log_probs.exp_()  # softmax, in place: the log-probabilities are not needed again
        if ctx.eps:
            grad.sub_(ctx.eps / grad.size(1))
        grad.scatter_add_(1, targets.unsqueeze(1), grad.new_full((grad.size(0), 1), -(1.0 - ctx.eps)))
        return grad.mul_(grad_loss).to(ctx.logits_dtype), None, None


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed label-smoothed cross-entropy, the same value and gradient as
    F.cross_entropy(logits, targets, label_smoothing=..., reduction="sum"): logits (N, V), targets (N,)."""
    return SmoothedCrossEntropy.apply(logits, targets, float(label_smoothing))
