"""The teacher-forced decoder recurrence (Bahdanau attention + one GRU layer) as one autograd Function.

Autograd through a Python loop of small ops spends much of a training step on bookkeeping that does
no arithmetic: every step's use of a weight matrix produces a weight gradient that is added into the
running total (an extra pass over the whole matrix per step), and slicing a weight inside the loop
materialises a zero-filled gradient of the full weight per step. Here the forward loop saves only
what backward needs (small (T, B, H) and (T, B, 3H) buffers, written in place), the backward loop
computes the per-step input and state gradients by hand, and each weight gradient is then ONE large
matmul over all T * B rows.

The arithmetic is exactly that of `Decoder._advance` with one layer (tests check values and
gradients against it), in torch's GRU gate order (r, z, n):
    q = W_q s,  e_j = v . tanh(q + k_j),  a = softmax(e),  c = sum_j a_j h_j
    [r, z, n] from x = emb_gates + W_c c and W_hh s + b_hh,  s' = n + z * (s - n)
"""

from __future__ import annotations

import torch

from nmt.model.activation import tanh
from nmt.precision import extended_rows, round_up, row_quantum


def apply_unrolled(function: type[torch.autograd.Function], *args):
    """`function.apply(*args)`. Under autocast every floating-point tensor argument takes the autocast dtype
    first, and the Function's own ops then run as they are (autocast would not see inside it anyway)."""
    device = next(arg for arg in args if isinstance(arg, torch.Tensor)).device.type
    if not torch.is_autocast_enabled(device):
        return function.apply(*args)
    dtype = torch.get_autocast_dtype(device)
    cast = [arg.to(dtype) if isinstance(arg, torch.Tensor) and arg.is_floating_point() else arg for arg in args]
    with torch.autocast(device, enabled=False):
        return function.apply(*cast)


class AttentionGRUUnroll(torch.autograd.Function):
    """emb_gates (B, T, 3H), h0 (B, H), states (B, S, 2H), keys (B, S, A), mask (B, S) bool,
    w_hq (3H + A, H) = [W_hh; W_q], b_hh (3H,), w_ctx (3H, 2H), v (A,)
    -> tops (B, T, H), contexts (B, T, 2H), attention (B, T, S) (not differentiable)."""

    @staticmethod
    def forward(ctx, emb_gates, h0, states, keys, mask, w_hq, b_hh, w_ctx, v):
        B, T, _ = emb_gates.shape
        H, S = h0.size(1), states.size(1)
        pad = ~mask  # (B, S)
        new = emb_gates.new_empty
        # > 1 (bf16 on a CPU): each step's products run over B rounded up to a multiple of `quantum`, read from the
        # flat buffers (precision.extended_rows), and keep their first B rows; the weight gradients' products run
        # over T * B rounded up to a multiple of `token_quantum`, the buffers' zero tails
        quantum, token_quantum = row_quantum(emb_gates), row_quantum(emb_gates, tokens=True)
        padded = round_up(T * B, token_quantum)
        flat_hs, flat_contexts = new(max((T + 1) * B, padded), H), new(padded, states.size(2))
        flat_hs[(T + 1) * B:], flat_contexts[T * B:] = 0, 0
        hs, contexts = flat_hs[:(T + 1) * B].view(T + 1, B, H), flat_contexts[:T * B].view(T, B, -1)
        hs[0] = h0
        resets, updates, candidates = new(T, B, H), new(T, B, H), new(T, B, H)
        hidden_gates_all = new(T, B, 3 * H)  # W_hh s + b_hh of every step: backward reads its n part
        weights = new(T, B, S)
        # tanh(y) = 2 sigmoid(2y) - 1, and torch's CPU sigmoid takes about a third of its tanh's time; the
        # softmax does not see the constant, so the scores are 2 v . sigmoid(2 (q + k)) and only sigmoids are kept
        activations = new(T, B, S, keys.size(2))  # sigmoid(2 (q + k)) of every step, kept for backward
        doubled_keys = 2 * keys
        w_hq_t, w_ctx_t = w_hq.t(), w_ctx.t()
        emb_gates = emb_gates.transpose(0, 1).contiguous()  # (T, B, 3H): each step reads one block
        for t in range(T):
            h = hs[t]
            if quantum == 1:
                projected = torch.mm(h, w_hq_t)  # (B, 3H + A)
            else:
                projected = torch.mm(extended_rows(flat_hs, t * B, B, quantum), w_hq_t)[:B]
            hidden_gates = torch.add(projected[:, :3 * H], b_hh, out=hidden_gates_all[t])  # (B, 3H)
            query = projected[:, 3 * H:]  # (B, A)
            activation = torch.sigmoid_(torch.add(doubled_keys, query.unsqueeze(1), alpha=2, out=activations[t]))
            scores = 2 * torch.matmul(activation, v)  # (B, S)
            scores.masked_fill_(pad, float("-inf"))
            attention = torch.softmax(scores, dim=-1)  # (B, S); padded positions get exactly 0
            weights[t] = attention
            context = torch.bmm(attention.unsqueeze(1), states, out=contexts[t].unsqueeze(1)).squeeze(1)  # (B, 2H)
            if quantum == 1:
                input_gates = torch.addmm(emb_gates[t], context, w_ctx_t)  # (B, 3H)
            else:
                input_gates = torch.mm(extended_rows(flat_contexts, t * B, B, quantum), w_ctx_t)[:B].add_(emb_gates[t])
            i_r, i_z, i_n = input_gates.chunk(3, dim=-1)
            h_r, h_z, h_n = hidden_gates.chunk(3, dim=-1)
            reset = torch.sigmoid(i_r + h_r, out=resets[t])
            update = torch.sigmoid(i_z + h_z, out=updates[t])
            candidate = tanh(torch.addcmul(i_n, reset, h_n), out=candidates[t])
            torch.addcmul(candidate, update, h - candidate, out=hs[t + 1])  # (1 - z) * n + z * h
        ctx.save_for_backward(flat_hs, resets, updates, candidates, hidden_gates_all, flat_contexts, weights, activations,
                              states, keys, w_hq, w_ctx, v)
        ctx.mark_non_differentiable(weights)
        return hs[1:].transpose(0, 1), contexts.transpose(0, 1), weights.transpose(0, 1)

    @staticmethod
    def backward(ctx, grad_tops, grad_contexts, _grad_weights):
        flat_hs, resets, updates, candidates, hidden_gates_all, flat_contexts, weights, activations, states, keys, w_hq, \
            w_ctx, v = ctx.saved_tensors
        T, B, H = resets.shape
        padded = flat_contexts.size(0)  # T * B, or more under bf16 on a CPU (see forward)
        hs, contexts = flat_hs[:(T + 1) * B].view(T + 1, B, H), flat_contexts[:T * B].view(T, B, -1)
        grad_tops = torch.zeros_like(hs[1:]) if grad_tops is None else grad_tops.transpose(0, 1)  # (T, B, H)
        grad_contexts = torch.zeros_like(contexts) if grad_contexts is None else grad_contexts.transpose(0, 1)
        new = hs.new_empty
        flat_input_grads, flat_hq_grads = new(padded, 3 * H), new(padded, w_hq.size(0))
        flat_input_grads[T * B:], flat_hq_grads[T * B:] = 0, 0
        input_grads = flat_input_grads[:T * B].view(T, B, -1)  # d loss / d input gates, per step: also emb_gates'
        hq_grads = flat_hq_grads[:T * B].view(T, B, -1)  # d loss / d [W_hh s + b_hh; W_q s], per step
        context_grads = new(T, B, contexts.size(2))
        # d e_j / d y_j = v * (1 - tanh(y_j)^2) = 4 v * s_j (1 - s_j), with s = sigmoid(2y): the factor 4 v is the
        # same for every step and position, so the steps sum g_j s_j (1 - s_j) and it multiplies once at the end
        key_sum = torch.zeros_like(keys)  # sum over steps of grad_scores * s (1 - s): (B, S, A)
        slope = torch.empty_like(keys)  # s (1 - s) of the step: (B, S, A)
        grad_v = torch.zeros_like(v)
        four_v = 4 * v
        states_t = states.transpose(1, 2)  # (B, 2H, S)
        grad_h = torch.zeros_like(hs[0])
        quantum = row_quantum(hs)  # as in forward; the rows after step t's in the flat buffers are step t + 1's
        for t in range(T - 1, -1, -1):
            h, reset, update, candidate = hs[t], resets[t], updates[t], candidates[t]
            grad_h = grad_h + grad_tops[t]
            gates = input_grads[t]  # the pre-activation gradients, each written into its place (as the encoder's)
            grad_reset, grad_update, grad_candidate = gates.chunk(3, dim=-1)
            torch.mul(grad_h * (1 - update), 1 - candidate * candidate, out=grad_candidate)  # through tanh
            torch.mul(grad_h * (h - candidate) * update, 1 - update, out=grad_update)  # through sigmoid
            torch.mul(grad_candidate * hidden_gates_all[t, :, 2 * H:] * reset, 1 - reset, out=grad_reset)
            hq = hq_grads[t]
            hq[:, :2 * H] = gates[:, :2 * H]
            torch.mul(grad_candidate, reset, out=hq[:, 2 * H:3 * H])
            if quantum == 1:
                grad_context = torch.addmm(grad_contexts[t], gates, w_ctx, out=context_grads[t])  # (B, 2H)
            else:
                grad_context = torch.mm(extended_rows(flat_input_grads, t * B, B, quantum), w_ctx)[:B]
                grad_context = torch.add(grad_context, grad_contexts[t], out=context_grads[t])
            # attention: c = a @ states, a = softmax(e), e = tanh(q + k) . v
            attention = weights[t]
            grad_attention = torch.bmm(grad_context.unsqueeze(1), states_t).squeeze(1)  # (B, S)
            grad_scores = attention * (grad_attention - (attention * grad_attention).sum(-1, keepdim=True))
            activation = activations[t]  # (B, S, A): sigmoid(2y), with tanh(y) = 2 sigmoid(2y) - 1
            row_scores = grad_scores.unsqueeze(1)  # (B, 1, S)
            grad_v += 2 * torch.bmm(row_scores, activation).sum((0, 1)) - grad_scores.sum()
            torch.addcmul(activation, activation, activation, value=-1, out=slope)  # s (1 - s), in one pass
            key_sum.addcmul_(row_scores.transpose(1, 2), slope)  # (B, S, A)
            torch.mul(torch.bmm(row_scores, slope).squeeze(1), four_v, out=hq[:, 3 * H:])  # the query's gradient
            if quantum == 1:
                grad_h = torch.addmm(grad_h * update, hq, w_hq)  # (B, H): direct path + through W_hh and W_q
            else:
                grad_h = torch.mm(extended_rows(flat_hq_grads, t * B, B, quantum), w_hq)[:B].addcmul_(grad_h, update)
        # over `padded` rows: those after T * B are zero in the gradients, so whatever hs holds there adds nothing
        grad_w_hq = torch.mm(flat_hq_grads.t(), flat_hs[:padded])
        grad_b_hh = hq_grads[..., :3 * H].sum((0, 1))
        grad_w_ctx = torch.mm(flat_input_grads.t(), flat_contexts)
        grad_states = torch.bmm(weights.permute(1, 2, 0), context_grads.transpose(0, 1))  # (B, S, 2H)
        grad_keys = key_sum.mul_(four_v)
        return (input_grads.transpose(0, 1), grad_h, grad_states, grad_keys, None, grad_w_hq, grad_b_hh,
                grad_w_ctx, grad_v)
