"""One bidirectional GRU layer over a packed batch as one autograd Function, for the CPU.

torch's CPU GRU over a packed batch runs each direction step by step through autograd: every step
projects its slice of the input again, and in backward each step's slice of the packed input gets a
zero-filled gradient of the whole packed input, and each weight a gradient that is added into the
running total. Here the input projections of both directions are one matmul over all real tokens
(done by the caller, with autograd), the two directions advance together (one batched product per
step), and backward computes each weight gradient once, over all steps.

The layout is torch's packed one: time-major, sentences longest first, step t holding the first
`batch_sizes[t]` sentences, so no arithmetic is spent on padding. The backward direction reads each
sentence reversed within its length (`reverse_within_lengths`), so both directions share the packing.
The arithmetic is torch's GRU (gate order r, z, n); tests hold the encoder to nn.GRU, values and
gradients.
"""

from __future__ import annotations

import torch

from nmt.model.activation import tanh
from nmt.precision import extended_rows, round_up, row_quantum


def reverse_within_lengths(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """lengths (B,) -> index (B, S): position t of row b reads L_b - 1 - t while t < L_b, else itself.

    Its own inverse, so the same gather turns the reversed direction's outputs back into source order."""
    positions = torch.arange(steps, device=lengths.device).unsqueeze(0)  # (1, S)
    lengths = lengths.unsqueeze(1)  # (B, 1)
    return torch.where(positions < lengths, lengths - 1 - positions, positions)  # (B, S)


class BiGRUUnroll(torch.autograd.Function):
    """input_gates (2, N, 3H): x W_ih + b_ih of both directions over a packed batch of N tokens;
    batch_sizes: its per-step sizes (a list of ints, non-increasing); w_hh (2, 3H, H), b_hh (2, 3H)
    -> states (2, N, H), packed alike. Every sentence starts from a zero state. input_gates may have rows
    after the N that batch_sizes count (the encoder pads them to a row count seen before: precision.row_quantum);
    their states are zero and their gradients too."""

    @staticmethod
    def forward(ctx, input_gates, batch_sizes, w_hh, b_hh):
        D, rows, H = input_gates.size(0), input_gates.size(1), w_hh.size(2)
        new = input_gates.new_empty
        states, resets, updates, candidates = (new(D, rows, H) for _ in range(4))
        hidden_gates = new(D, rows, 3 * H)  # h W_hh + b_hh of every step; backward reads its n part
        states[:, sum(batch_sizes):] = 0
        w_hh_t, b_hh = w_hh.transpose(1, 2), b_hh.unsqueeze(1)  # (2, H, 3H), (2, 1, 3H)
        quantum = row_quantum(input_gates)  # > 1: each step's product runs over a row count seen before
        h = input_gates.new_zeros(D, batch_sizes[0], H)
        start = previous_start = 0
        for t, size in enumerate(batch_sizes):
            h, rows = h[:, :size], slice(start, start + size)
            # each step writes straight into the buffers that backward reads; the first starts from zero states
            if t == 0:
                hidden_gates[:, rows] = b_hh
            elif quantum == 1:
                torch.baddbmm(b_hh, h, w_hh_t, out=hidden_gates[:, rows])  # (2, n, 3H)
            else:
                product = torch.bmm(extended_rows(states, previous_start, size, quantum), w_hh_t)
                torch.add(product[:, :size], b_hh, out=hidden_gates[:, rows])
            i_r, i_z, i_n = input_gates[:, rows].chunk(3, dim=-1)
            h_r, h_z, h_n = hidden_gates[:, rows].chunk(3, dim=-1)
            reset = torch.sigmoid(i_r + h_r, out=resets[:, rows])
            update = torch.sigmoid(i_z + h_z, out=updates[:, rows])
            candidate = tanh(torch.addcmul(i_n, reset, h_n), out=candidates[:, rows])
            h = torch.addcmul(candidate, update, h - candidate, out=states[:, rows])  # (1 - z) * n + z * h
            previous_start = start
            start += size
        ctx.batch_sizes = batch_sizes
        ctx.save_for_backward(states, resets, updates, candidates, hidden_gates, w_hh)
        return states

    @staticmethod
    def backward(ctx, grad_states):
        states, resets, updates, candidates, hidden_gates, w_hh = ctx.saved_tensors
        batch_sizes = ctx.batch_sizes
        D, rows, H = states.shape
        N, quantum = sum(batch_sizes), row_quantum(states)
        padded = round_up(rows, quantum)  # rows of the buffers in the weight gradient's product; any beyond N are zero
        gate_grads = states.new_empty(D, rows, 3 * H)  # d loss / d input gates: the input_gates gradient
        hidden_grads = states.new_empty(D, padded, 3 * H)  # d loss / d (h W_hh + b_hh)
        previous = states.new_empty(D, padded, H)  # the state each packed row started from
        gate_grads[:, N:], hidden_grads[:, N:], previous[:, N:] = 0, 0, 0
        starts = [0]
        for size in batch_sizes[:-1]:
            starts.append(starts[-1] + size)
        carried = None  # d loss / d (the state of the step after), for its rows
        for t in range(len(batch_sizes) - 1, -1, -1):
            size, start = batch_sizes[t], starts[t]
            rows = slice(start, start + size)
            if t > 0:
                h = states[:, starts[t - 1]:starts[t - 1] + size]
                previous[:, rows] = h
            else:
                h = states.new_zeros(D, size, H)
                previous[:, rows] = 0
            grad_h = grad_states[:, rows].clone()
            if carried is not None:
                grad_h[:, :carried.size(1)] += carried
            reset, update, candidate = resets[:, rows], updates[:, rows], candidates[:, rows]
            gates, hidden = gate_grads[:, rows], hidden_grads[:, rows]
            grad_reset, grad_update, grad_candidate = gates.chunk(3, dim=-1)
            torch.mul(grad_h * (1 - update), 1 - candidate * candidate, out=grad_candidate)  # through tanh
            torch.mul(grad_h * (h - candidate), update * (1 - update), out=grad_update)  # through sigmoid
            torch.mul(grad_candidate * hidden_gates[:, rows, 2 * H:], reset * (1 - reset), out=grad_reset)
            hidden[..., :2 * H] = gates[..., :2 * H]
            torch.mul(grad_candidate, reset, out=hidden[..., 2 * H:])
            if t == 0:  # the zero initial states need no gradient
                break
            if quantum == 1:
                carried = torch.baddbmm(grad_h * update, hidden, w_hh)  # (2, n, H): direct + through W_hh
            else:
                carried = torch.bmm(extended_rows(hidden_grads, start, size, quantum), w_hh)[:, :size]
                carried.addcmul_(grad_h, update)
        grad_w_hh = torch.bmm(hidden_grads.transpose(1, 2), previous)  # (2, 3H, H)
        return gate_grads, None, grad_w_hh, hidden_grads.sum(1)
