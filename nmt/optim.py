"""Optimisation pieces that embeddings need: Adam with sparse embedding gradients, clipping that
handles them, unfreezing embeddings partway through training, and keeping the embedding tables (or
the biases) out of weight decay (`optim.no_decay`).

Frozen embeddings (`requires_grad=False`) are left out of the optimizer entirely: no gradient, no
Adam state, no weight decay. `unfreeze_embeddings` later turns them on and adds them as a new
parameter group at the current learning rate; the scheduler is told about the group, so warmup and
plateau decay apply to it from then on. Adam's moments for the new group start from zero, as they
would for a fresh parameter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nmt.model.seq2seq import Seq2Seq


class SparseDenseAdam(torch.optim.Adam):
    """Adam for parameter groups with dense gradients; SparseAdam's lazy update for groups marked
    `sparse=True` (embedding tables built with `nn.Embedding(sparse=True)`), in one optimizer.

    The lazy update changes only the rows present in the gradient, their moments included, as
    torch.optim.SparseAdam does; rows absent from a batch keep their moments until they appear.
    One optimizer (rather than two) keeps the schedulers, checkpoints and the trainer unchanged.
    """

    def __init__(self, dense: list[nn.Parameter], sparse: list[nn.Parameter], lr: float,
                 betas: tuple[float, float], weight_decay: float = 0.0):
        groups = [{"params": dense, "sparse": False}] if dense else []
        groups += [{"params": sparse, "sparse": True, "weight_decay": 0.0}] if sparse else []
        super().__init__(groups, lr=lr, betas=betas, weight_decay=weight_decay)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_groups
        try:  # Adam's own step for the dense groups
            self.param_groups = [g for g in groups if not g.get("sparse")]
            super().step()
        finally:
            self.param_groups = groups
        for group in groups:
            if group.get("sparse"):
                for param in group["params"]:
                    if param.grad is not None:
                        self._sparse_update(param, group)
        return loss

    def _sparse_update(self, param: nn.Parameter, group: dict) -> None:
        grad = param.grad
        if not grad.is_sparse:
            raise RuntimeError("a parameter group marked sparse got a dense gradient")
        grad = grad.coalesce()
        rows, values = grad.indices()[0], grad.values()  # (R,), (R, E): each row once
        state = self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        step = float(state["step"])
        exp_avg = state["exp_avg"][rows].mul_(beta1).add_(values, alpha=1 - beta1)  # (R, E)
        exp_avg_sq = state["exp_avg_sq"][rows].mul_(beta2).addcmul_(values, values, value=1 - beta2)  # (R, E)
        state["exp_avg"][rows] = exp_avg
        state["exp_avg_sq"][rows] = exp_avg_sq
        step_size = group["lr"] * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
        param[rows] = param[rows] - step_size * exp_avg / (exp_avg_sq.sqrt() + group["eps"])


def exempt_from_decay(model: nn.Module, params: list[nn.Parameter], no_decay: tuple[str, ...]) -> set[int]:
    """The ids of those `params` that `no_decay` keeps out of weight decay: "bias" names every bias vector,
    "embedding" the embedding tables (with tied embeddings that matrix is the output projection too)."""
    exempt = set()
    if "embedding" in no_decay:
        exempt |= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    if "bias" in no_decay:  # bias, bias_ih, bias_hh_l0_reverse, ...; not the attention's 1-row v
        exempt |= {id(p) for name, p in model.named_parameters() if name.rsplit(".", 1)[-1].startswith("bias")}
    return {id(p) for p in params} & exempt


def build_adam(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
               sparse: bool, decoupled: bool = False, no_decay: tuple[str, ...] = ()) -> torch.optim.Optimizer:
    """Adam over the trainable parameters (AdamW's decoupled weight decay with `decoupled`); with
    `sparse`, embedding tables get the lazy sparse update (the config allows no weight decay then).
    With weight decay, the parameters that `no_decay` names form a second group without it."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not sparse:
        exempt = exempt_from_decay(model, params, no_decay) if weight_decay else set()
        groups = [{"params": [p for p in params if id(p) not in exempt]}]
        if exempt:
            groups.append({"params": [p for p in params if id(p) in exempt], "weight_decay": 0.0})
        # The fused kernel updates all parameters in one pass (CPU and CUDA alike), where the default
        # implementation makes several passes per tensor.
        adam = torch.optim.AdamW if decoupled else torch.optim.Adam
        return adam(groups, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse}
    return SparseDenseAdam([p for p in params if id(p) not in tables], [p for p in params if id(p) in tables],
                           lr=lr, betas=betas, weight_decay=weight_decay)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_, also for sparse gradients (which it does not handle).

    Without sparse gradients this is torch's function itself, so dense training is unchanged.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not any(g.is_sparse for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    squares = []
    for index, grad in enumerate(grads):
        if grad.is_sparse:
            grad = grads[index] = grad.coalesce()  # repeated rows summed, so the norm is the true one
            squares.append(grad.values().float().pow(2).sum())
        else:
            squares.append(grad.float().pow(2).sum())
    total = torch.stack([s.to(squares[0].device) for s in squares]).sum().sqrt()
    coefficient = max_norm / (total + 1e-6)
    if coefficient < 1:
        for param, grad in zip([p for p in params if p.grad is not None], grads):
            param.grad = grad.mul_(coefficient.to(grad.device))
    return total


def frozen_embeddings(model: Seq2Seq) -> list[nn.Parameter]:
    """The embedding tables that do not train now (each once, when tables are tied)."""
    tables = []
    for weight in (model.src_embed.weight, model.tgt_embed.weight):
        if not weight.requires_grad and all(weight is not t for t in tables):
            tables.append(weight)
    return tables


def unfreeze_embeddings(model: Seq2Seq, optimizer: torch.optim.Optimizer, scheduler,
                        no_decay: tuple[str, ...] = ()) -> int:
    """Make the frozen embedding tables trainable and add them to the optimizer as a new group.

    The group starts at the current learning rate of the first group, without weight decay when
    `no_decay` names "embedding"; a LambdaLR (warmup) scheduler and ReduceLROnPlateau are extended to
    it. Returns how many tables were unfrozen (0: none were frozen).
    """
    tables = frozen_embeddings(model)
    if not tables:
        return 0
    for table in tables:
        table.requires_grad_(True)
    first = optimizer.param_groups[0]
    group = {"params": tables, "lr": first["lr"]}
    if "embedding" in no_decay:
        group["weight_decay"] = 0.0
    if isinstance(optimizer, SparseDenseAdam) and model.src_embed.embedding.sparse:
        group.update(sparse=True, weight_decay=0.0)
    elif isinstance(optimizer, SparseDenseAdam):
        group.update(sparse=False)
    if "initial_lr" in first:  # set by LR schedulers; they read it on a resume
        group["initial_lr"] = first["initial_lr"]
    optimizer.add_param_group(group)
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        scheduler.base_lrs.append(scheduler.base_lrs[0])
        scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
    elif isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.min_lrs.append(scheduler.min_lrs[0])
    return len(tables)
