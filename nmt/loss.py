"""Label-smoothed cross-entropy of the output layer, fused with the output layer itself.

An output layer followed by a loss function makes (N, V) tensors: the logits, the log-probabilities
that backward needs, which live from the forward pass to the backward pass, and their gradient; each
is about 100 MB for a batch of 3,000 target tokens and a vocabulary of 8,000 in fp32. Here the logits
are made one block of rows at a time and turned into gradients at once, so no (N, V) tensor outlives
its block. On the reference model (2 CPU threads) that lowers the peak RSS of training by about 120 MB;
the speed is the same within the noise of the measurement (docs/speed.md).
"""

from __future__ import annotations

import torch

from nmt.model.recurrence import apply_unrolled
from nmt.precision import pad_rows, round_up, row_quantum

# Entries of the (N, V) logits that one block of LinearCrossEntropy holds: 8M (32 MB in fp32) on a CPU
# (2M measured no faster); on a GPU a few large blocks, to launch few kernels.
BLOCK_ENTRIES = {"cpu": 2**23}
GPU_BLOCK_ENTRIES = 2**26


class LinearCrossEntropy(torch.autograd.Function):
    """hidden (N, E), weight (V, E), bias (V,) or None, targets (N,), eps, wanted grads -> the summed
    label-smoothed cross-entropy of the logits hidden @ weight.T + bias (scalar, float32).

    The (N, V) logits never exist whole. Each block of rows is projected, turned into its softmax, and
    multiplied straight back into the gradients of hidden, weight and bias before the next block is made;
    backward only scales those by the loss's gradient. The gradient of a row's loss with respect to its
    logits is softmax - eps / V - (1 - eps) * one_hot(y); its constant and one-hot parts are
    applied once, to the small results: g @ W = p @ W - eps / V * colsum(W) - (1 - eps) * W[y], and the
    same for the weight's and the bias's gradients. A row's loss is lse - (1 - eps) * l_y - eps / V *
    sum(l), where lse = l_y - log p_y, read off the softmax already made. Besides the products, each block
    costs one softmax and two gathers: no pass for the row maxima, no sums over the logits, and under bf16
    autocast no float32 copy of them. For 3,400 rows of the reference model (E 256, V 8,000) on a 2-vCPU
    AMX host, the loss with its gradients took 194.9 ms against 217.8 for the previous version (a maximum,
    a sum and a float32 softmax per block) in fp32, and 74.0 against 113.7 in bf16.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, eps: float, wanted: tuple[bool, bool, bool]):
        N, V = hidden.size(0), weight.size(0)
        want_hidden, want_weight, want_bias = wanted
        exact = torch.promote_types(hidden.dtype, torch.float32)  # the loss's and the small sums' dtype
        # bf16 has float32's range, so its softmax stays bf16 (torch computes it in float32 and rounds once, as a
        # cast of a float32 softmax would): no (n, V) casts. fp16 underflows at 6e-5, so its softmax is float32.
        probs_dtype = hidden.dtype if hidden.dtype in (torch.bfloat16, torch.float32, torch.float64) else exact
        tiny = torch.finfo(probs_dtype).tiny
        grad_weight = torch.zeros(weight.shape, dtype=exact, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(V, dtype=exact, device=weight.device) if want_bias else None
        ones = hidden.new_ones(0)
        hidden_sum, weight_sum = hidden.sum(dim=0, dtype=exact), weight.sum(dim=0, dtype=exact)
        # the smoothing term's sum of every logit of every row is (sum of the rows of hidden) . (sum of the rows of
        # weight) + N sum(bias): a product of two E-vectors, not a pass over the (N, V) logits
        logit_sum = hidden_sum @ weight_sum + (0 if bias is None else N * bias.sum(dtype=exact))
        loss = -(eps / V) * logit_sum
        # bf16 on a CPU: rows padded with zeros to a multiple of the quantum, and blocks of a multiple of it, so that the
        # last block's products have a shape seen before (precision.row_quantum); the padding rows' probabilities are
        # zeroed before they reach a gradient, and their losses are not counted
        quantum = row_quantum(hidden, tokens=True)
        padded = round_up(N, quantum)
        rows_in, targets_in = pad_rows(hidden, padded), pad_rows(targets, padded)
        grad_hidden = hidden.new_empty(rows_in.shape) if want_hidden else None
        entries = BLOCK_ENTRIES.get(hidden.device.type, GPU_BLOCK_ENTRIES)
        rows = round_up(max(16, entries // max(1, V)), quantum)
        weight_t = weight.t()
        for start in range(0, padded, rows):
            block, block_targets = rows_in[start:start + rows], targets_in[start:start + rows].unsqueeze(1)
            real = min(N - start, block.size(0))  # the rows that are not padding
            logits = torch.mm(block, weight_t) if bias is None else torch.addmm(bias, block, weight_t)
            target_logits = logits.gather(1, block_targets).to(exact)
            probs = torch.softmax(logits, dim=1, dtype=probs_dtype)  # (n, V)
            target_probs = probs.gather(1, block_targets).to(exact)
            # log-sum-exp of the row: l_y - log p_y, with no pass for the row's maximum; a row whose p_y underflowed
            # (a token the model all but rules out) gets it the long way
            lse = target_logits - target_probs.log()
            lost = target_probs < tiny
            if lost.any():
                lost = lost.squeeze(1).nonzero().squeeze(1)
                lse[lost] = torch.logsumexp(logits[lost].to(exact), dim=1, keepdim=True)
            loss += (lse - (1.0 - eps) * target_logits)[:real].sum()
            if not (want_hidden or want_weight or want_bias):
                continue
            probs = probs.to(hidden.dtype)
            probs[real:] = 0
            if want_bias and probs.dtype == exact:
                grad_bias += probs.sum(dim=0)
            elif want_bias:  # bf16: a matrix-vector product, as torch's column sum of bf16 is slow on a CPU
                if ones.numel() != probs.size(0):
                    ones = hidden.new_ones(probs.size(0))
                grad_bias += torch.mv(probs.t(), ones)
            if want_hidden:
                torch.mm(probs, weight, out=grad_hidden[start:start + rows])
            if want_weight:
                if grad_weight.dtype == probs.dtype:
                    grad_weight.addmm_(probs.t(), block)
                else:
                    grad_weight += torch.mm(probs.t(), block)
        one_hot = -(1.0 - eps)
        if want_hidden:
            grad_hidden = grad_hidden[:N]
            grad_hidden -= (eps / V) * weight_sum.to(hidden.dtype)
            grad_hidden.add_(weight.index_select(0, targets), alpha=one_hot)
        if want_weight:
            grad_weight -= (eps / V) * hidden_sum
            grad_weight.index_add_(0, targets, hidden.to(exact), alpha=one_hot)
        if want_bias:
            grad_bias -= eps / V * N
            grad_bias.index_add_(0, targets, grad_bias.new_full((N,), one_hot))
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grads = [None if grad is None else (grad * grad_loss).to(dtype)
                 for grad, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None, None)


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Summed label-smoothed cross-entropy of the logits hidden @ weight.T + bias, without making them:
    the same value and gradients as F.cross_entropy(F.linear(hidden, weight, bias), targets,
    label_smoothing=label_smoothing, reduction="sum").
    hidden (N, E), weight (V, E), bias (V,) or None, targets (N,). Under autocast the product runs in the
    autocast dtype, as F.linear's would; the softmax and the loss are float32."""
    grad = torch.is_grad_enabled()
    wanted = tuple(bool(grad and t is not None and t.requires_grad) for t in (hidden, weight, bias))
    return apply_unrolled(LinearCrossEntropy, hidden, weight, bias, targets, float(label_smoothing), wanted)
