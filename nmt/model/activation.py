"""tanh through torch's own sigmoid on a CPU, so that its results do not depend on MKL's threads."""

from __future__ import annotations

import torch


def tanh(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """torch.tanh(x), written into `out` if given (no autograd then); in float32 on a CPU as 2 sigmoid(2x) - 1.

    torch hands a float32 tanh on a CPU to MKL's vector math library, which splits a large tensor between
    threads itself. On the 2-vCPU Intel host (AVX-512, AMX) with two threads, one thread's half of the result
    sometimes changed from call to call on the same input, by up to 871 ulps. Two runs of one training config
    then ended with different weights: one fixed training step of the debug model gave a different gradient
    in 2 to 13% of fresh processes. With this sigmoid, torch's own kernel, it gave the same bits in 40
    processes of 40, and a training step of the reference model took as long (README, "Nothing lost:
    checkpoints and resuming"). The absolute error near 0 is about 1e-7, that of float32 at 0.5.

    Other dtypes keep torch.tanh: in bfloat16, 2 sigmoid(2x) - 1 would round tanh's small values to steps of
    about 0.004. So do other devices.
    """
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return torch.tanh(x, out=out)
    if out is None:
        return torch.sigmoid(2 * x) * 2 - 1
    return torch.sigmoid(2 * x, out=out).mul_(2).sub_(1)
