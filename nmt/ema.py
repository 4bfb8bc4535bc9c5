"""An exponential moving average of the weights while training (`trainer.ema_decay`).

After every update, each average moves a share of the way towards the weight it follows:
ema <- decay * ema + (1 - decay) * weight, with the decay of update t held at (1 + t) / (10 + t)
while that is smaller, so that the first updates do not leave the average near the initial weights,
as Marian's `--exponential-smoothing` (which takes 1 - decay) and TensorFlow's ExponentialMovingAverage
do; fairseq's `--ema-decay` keeps its decay fixed. Past that warm-up (8,990 updates for 0.999), a decay
of 0.999 averages over about the last 1,000 updates; before it, over about the last t / 9.

The updates are those of a run without the average, but validation scores the average, so what is
decided on the dev score (the plateau scheduler's cuts, early stopping) follows it. best.pt, the
val-STEP.pt files and the "model" of last.pt hold the average, so nmt-evaluate, nmt-translate and
checkpoint averaging read it; last.pt also keeps the training weights under "training_model", which a
resume continues from.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class WeightAverage:
    """The moving average of every parameter of `model` (a tied matrix counts once); decay 0 = none."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        named = list(model.named_parameters()) if decay else []  # named_parameters() lists a shared tensor once
        self.names = [name for name, _ in named]
        self.params = [param for _, param in named]
        self.averages = [param.detach().clone() for param in self.params]

    @property
    def enabled(self) -> bool:
        return self.decay > 0

    def rate(self, step: int) -> float:
        """The decay applied after update number `step` (1 for the first)."""
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the weights as they are after update number `step`."""
        if self.enabled:
            torch._foreach_lerp_(self.averages, [param.detach() for param in self.params], 1.0 - self.rate(step))

    @torch.no_grad()
    def restart(self) -> None:
        """Start the average afresh from the present weights (a resume from a checkpoint without one)."""
        torch._foreach_copy_(self.averages, self.params)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside, the model holds the averages; on leaving, its own weights come back to the bit. What the
        model did to the weights inside (model.embeddings.max_norm rescales the rows it looks up) stays
        with the averages, so the checkpoints written inside and those written by `state_dict` agree."""
        if not self.enabled:
            yield
            return
        own = [param.detach().clone() for param in self.params]
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.averages)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(self.averages, self.params)
                torch._foreach_copy_(self.params, own)

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """`model.state_dict()` with the averages in place of the parameters (tied keys share one tensor)."""
        if not self.enabled:
            return model.state_dict()
        state = model.state_dict(keep_vars=True)  # the Parameter objects themselves, to match them by identity
        averages = {id(param): average for param, average in zip(self.params, self.averages)}
        for key, tensor in state.items():
            state[key] = averages.get(id(tensor), tensor.detach())
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take the averages from a model state dict, as `state_dict` wrote it."""
        for name, average in zip(self.names, self.averages):
            average.copy_(state[name])
