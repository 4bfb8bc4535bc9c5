"""Sparse embedding gradients, clipping them, and unfreezing embeddings into a running optimizer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nmt.config import EmbeddingConfig, ModelConfig, OptimConfig, TrainConfig
from nmt.data.vocab import PAD_ID
from nmt.model.seq2seq import build_model
from nmt.optim import SparseDenseAdam, build_adam, clip_grad_norm, frozen_embeddings, unfreeze_embeddings
from nmt.config import ConfigError
from nmt.train import BudgetSchedule, build_optimizer, build_scheduler

V, E, H = 20, 6, 5


def tiny_model(**embeddings):
    cfg = ModelConfig(embedding_dim=E, hidden_size=H, dropout=0.0, embeddings=EmbeddingConfig(**embeddings))
    return build_model(cfg, V, V)


def loss_of(model, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 12, (3, 5), generator=generator)  # only ids 4..11: most rows are never read
    src[2, 3:] = PAD_ID
    tgt = torch.randint(4, 12, (3, 4), generator=generator)
    lens = (src != PAD_ID).sum(1)
    return model(src, lens, tgt).square().mean()


def test_sparse_adam_matches_torch_sparse_adam_plus_adam():
    dense_model = tiny_model()
    sparse_model = tiny_model(sparse=True)
    sparse_model.load_state_dict(dense_model.state_dict())
    reference = copy.deepcopy(sparse_model)
    ref_tables = [reference.src_embed.weight, reference.tgt_embed.weight]
    ref_dense = [p for p in reference.parameters() if all(p is not t for t in ref_tables)]
    ref_opts = [torch.optim.Adam(ref_dense, lr=0.01), torch.optim.SparseAdam(ref_tables, lr=0.01)]
    ours = build_adam(sparse_model, 0.01, (0.9, 0.999), 0.0, sparse=True)
    assert isinstance(ours, SparseDenseAdam) and [g["sparse"] for g in ours.param_groups] == [False, True]
    before = sparse_model.src_embed.weight.detach().clone()
    for step in range(3):
        for model, optimizers in ((sparse_model, [ours]), (reference, ref_opts)):
            for optimizer in optimizers:
                optimizer.zero_grad()
            loss_of(model, step).backward()
            assert model.src_embed.weight.grad.is_sparse
            for optimizer in optimizers:
                optimizer.step()
    for (name, ours_p), ref_p in zip(sparse_model.named_parameters(), reference.parameters()):
        assert torch.allclose(ours_p, ref_p, atol=1e-6), name
    after = sparse_model.src_embed.weight.detach()
    assert torch.equal(after[12:], before[12:])  # rows never read: not touched (lazy update)
    assert not torch.equal(after[4:12], before[4:12])
    assert torch.equal(after[PAD_ID], torch.zeros(E))


def test_sparse_optimizer_state_survives_a_checkpoint_round_trip():
    model = tiny_model(sparse=True)
    optimizer = build_adam(model, 0.01, (0.9, 0.999), 0.0, sparse=True)
    loss_of(model, 0).backward()
    optimizer.step()
    clone = copy.deepcopy(model)
    restored = build_adam(clone, 0.01, (0.9, 0.999), 0.0, sparse=True)
    restored.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # as from disk: no shared tensors
    for m, opt in ((model, optimizer), (clone, restored)):
        opt.zero_grad()
        loss_of(m, 1).backward()
        opt.step()
    for a, b in zip(model.parameters(), clone.parameters()):
        assert torch.equal(a, b)


def test_clip_grad_norm_with_sparse_gradients_equals_the_dense_computation():
    dense_model = tiny_model()
    sparse_model = tiny_model(sparse=True)
    sparse_model.load_state_dict(dense_model.state_dict())
    for model in (dense_model, sparse_model):
        loss_of(model, 0).backward()
    dense_norm = torch.nn.utils.clip_grad_norm_(list(dense_model.parameters()), 0.01)
    sparse_norm = clip_grad_norm(list(sparse_model.parameters()), 0.01)
    assert sparse_norm == pytest.approx(float(dense_norm), rel=1e-5)
    assert dense_norm > 0.01  # so clipping did something
    for (name, d), s in zip(dense_model.named_parameters(), sparse_model.parameters()):
        grad = s.grad.to_dense() if s.grad.is_sparse else s.grad
        assert torch.allclose(d.grad, grad, atol=1e-7), name


@pytest.mark.parametrize("scheduler", ["inverse_sqrt", "plateau", "linear"])
@pytest.mark.parametrize("sparse", [False, True])
def test_unfreezing_adds_the_tables_to_optimizer_and_scheduler(scheduler, sparse):
    cfg = TrainConfig(model=ModelConfig(embedding_dim=E, hidden_size=H, dropout=0.0,
                                        embeddings=EmbeddingConfig(freeze="both", unfreeze_after=2, sparse=sparse)),
                      optim=OptimConfig(scheduler=scheduler, warmup_steps=4))
    model = build_model(cfg.model, V, V)
    model.src_embed.weight.requires_grad_(False)
    model.tgt_embed.weight.requires_grad_(False)
    optimizer = build_optimizer(model, cfg)
    lr_scheduler = build_scheduler(optimizer, cfg)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(model.src_embed.weight) not in in_optimizer  # frozen: no state, no weight decay
    frozen = model.src_embed.weight.detach().clone()
    loss_of(model, 0).backward()
    assert model.src_embed.weight.grad is None  # no gradient at all
    optimizer.step()
    assert torch.equal(model.src_embed.weight, frozen)
    assert unfreeze_embeddings(model, optimizer, lr_scheduler) == 2
    assert unfreeze_embeddings(model, optimizer, lr_scheduler) == 0  # once only
    assert not frozen_embeddings(model)
    assert len(optimizer.param_groups) == 2 and optimizer.param_groups[1]["lr"] == optimizer.param_groups[0]["lr"]
    lrs = []
    for step in range(4):
        optimizer.zero_grad()
        loss_of(model, step).backward()
        optimizer.step()
        if scheduler == "inverse_sqrt":
            lr_scheduler.step()
        elif scheduler == "linear":
            lr_scheduler.update(step + 1, (step + 1) / 4)
        else:
            lr_scheduler.step(1.0)  # plateau: the first validation sets the best, the others do not improve on it
        lrs.append(optimizer.param_groups[0]["lr"])
        assert optimizer.param_groups[1]["lr"] == lrs[-1]  # the unfrozen tables follow the schedule
    lr = cfg.optim.lr
    if scheduler == "inverse_sqrt":  # warming up over 4 steps
        assert lrs[0] < lrs[1] < lrs[2] <= lr
    elif scheduler == "plateau":  # lowered after optim.patience=2 validations without improvement
        assert lrs[:3] == [lr] * 3 and lrs[3] == pytest.approx(lr * cfg.optim.factor)
    else:  # linear: falling with the share of the time used
        assert max(lrs) < lr and lrs[3] < lrs[0]
    assert not torch.equal(model.src_embed.weight, frozen)
    # the optimizer and scheduler states load into a run that unfroze the same way (a resume)
    clone = build_model(cfg.model, V, V)
    for weight in (clone.src_embed.weight, clone.tgt_embed.weight):
        weight.requires_grad_(False)
    clone_opt = build_optimizer(clone, cfg)
    clone_sched = build_scheduler(clone_opt, cfg)
    unfreeze_embeddings(clone, clone_opt, clone_sched)
    clone_opt.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    clone_sched.load_state_dict(lr_scheduler.state_dict())
    assert [g["lr"] for g in clone_opt.param_groups] == [g["lr"] for g in optimizer.param_groups]


def test_tied_tables_are_unfrozen_once():
    cfg = ModelConfig(embedding_dim=E, hidden_size=H, tie_src_tgt=True, embeddings=EmbeddingConfig(freeze="both"))
    model = build_model(cfg, V, V)
    model.tgt_embed.weight.requires_grad_(False)
    assert frozen_embeddings(model) == [model.src_embed.weight]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    assert unfreeze_embeddings(model, optimizer, None) == 1
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_a_dense_gradient_in_a_sparse_group_is_refused():
    table = nn.Parameter(torch.zeros(3, 2))
    optimizer = SparseDenseAdam([], [table], lr=0.1, betas=(0.9, 0.999))
    table.grad = torch.ones(3, 2)
    with pytest.raises(RuntimeError, match="dense gradient"):
        optimizer.step()


def test_budget_schedules_fall_from_lr_to_min_lr_after_warmup():
    optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(2))], lr=1.0)
    linear = BudgetSchedule(optimizer, "linear", lr=1e-3, min_lr=1e-4, warmup_steps=0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # set at once, for the first update
    assert [linear.rate(0, p) for p in (0.0, 0.5, 1.0, 1.5)] == pytest.approx([1e-3, 5.5e-4, 1e-4, 1e-4])
    cosine = BudgetSchedule(optimizer, "cosine", lr=1e-3, min_lr=0.0, warmup_steps=0)
    assert [cosine.rate(0, p) for p in (0.0, 0.25, 0.5, 1.0)] == pytest.approx([1e-3, 8.5355e-4, 5e-4, 0.0], abs=1e-8)
    warm = BudgetSchedule(optimizer, "linear", lr=1e-3, min_lr=0.0, warmup_steps=10)
    assert warm.rate(0, 0.0) == pytest.approx(1e-4) and warm.rate(9, 0.0) == pytest.approx(1e-3)
    assert warm.rate(4, 0.5) == pytest.approx(0.5 * 5e-4)  # warmup and fall multiply
    warm.update(19, 0.25)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(7.5e-4)


def test_cycles_fall_within_each_epoch_once_their_share_of_the_budget_is_used():
    optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(2))], lr=1.0)
    cyclic = BudgetSchedule(optimizer, "linear", lr=1e-3, min_lr=1e-4, warmup_steps=0, cycle_from=0.5, cycle_floor=0.1)
    # before 0.5 of the budget the position in the epoch changes nothing
    assert [cyclic.rate(0, 0.25, f) for f in (0.0, 0.5, 1.0)] == pytest.approx([7.75e-4] * 3)
    # after it, each epoch falls from the linear fall's rate to a tenth of it at its last batch
    assert [cyclic.rate(0, 0.5, f) for f in (0.0, 0.5, 1.0)] == pytest.approx([5.5e-4, 5.5e-4 * 0.55, 5.5e-5])
    assert cyclic.rate(0, 1.0, 1.0) == pytest.approx(1e-5)
    cyclic.update(7, 0.75, 1.0)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(3.25e-5)


def test_budget_schedule_settings_are_checked():
    with pytest.raises(ConfigError, match="optim.min_lr"):
        OptimConfig(scheduler="linear", lr=1e-4, min_lr=1e-3)
    with pytest.raises(ConfigError, match="optim.warmup_steps"):
        OptimConfig(scheduler="inverse_sqrt", warmup_steps=0)
    assert OptimConfig(scheduler="cosine", warmup_steps=0).warmup_steps == 0
    with pytest.raises(ConfigError, match="optim.cycle_from cycles the fall of optim.scheduler=linear or cosine"):
        OptimConfig(scheduler="plateau", cycle_from=0.5)
    with pytest.raises(ConfigError, match="optim.cycle_from"):
        OptimConfig(scheduler="linear", min_lr=0.0, cycle_from=1.0)
    with pytest.raises(ConfigError, match=r"optim.cycle_floor must lie in \(0, 1\]"):
        OptimConfig(cycle_floor=0.0)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_optim_adamw_decays_the_weights_apart_from_the_gradient(name):
    # with a zero gradient, Adam's weight decay is all of the gradient, which Adam normalises into a step of
    # about lr per weight; AdamW's decay is applied to the weights themselves: w * (1 - lr * weight_decay)
    from nmt.cli import compose_config

    overrides = ["experiment=debug", f"optim={name}", "optim.lr=0.1"]
    if name == "adam":
        overrides.append("optim.weight_decay=0.01")
    cfg, _ = compose_config("train", overrides)
    assert (cfg.optim.name, cfg.optim.weight_decay) == (name, 0.01)  # optim=adamw brings its own decay
    model = tiny_model()
    optimizer = build_optimizer(model, cfg)
    assert type(optimizer) is (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)
    before = [p.detach().clone() for p in model.parameters()]
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    weight, old = next((p, b) for p, b in zip(model.parameters(), before) if b.abs().min() > 0.05)
    if name == "adamw":
        torch.testing.assert_close(weight, old * (1 - 0.1 * 0.01))
    else:
        torch.testing.assert_close(weight, old - 0.1 * torch.sign(old), atol=1e-4, rtol=0)


@pytest.mark.parametrize("no_decay", [["bias"], ["embedding"], ["bias", "embedding"]])
def test_optim_no_decay_keeps_biases_and_embeddings_out_of_weight_decay(no_decay):
    # with a zero gradient, AdamW's step is its decay alone: the decayed weights shrink by (1 - lr * weight_decay),
    # those that optim.no_decay names do not move; the tied table is one parameter, in one group
    from nmt.cli import compose_config

    cfg, _ = compose_config("train", ["experiment=debug", "optim=adamw", "optim.lr=0.1", "optim.weight_decay=0.5",
                                      f"optim.no_decay=[{','.join(no_decay)}]"])
    model = build_model(ModelConfig(embedding_dim=E, hidden_size=H, tie_embeddings=True, tie_src_tgt=True), V, V)
    optimizer = build_optimizer(model, cfg)
    decayed, exempt = optimizer.param_groups
    assert (decayed["weight_decay"], exempt["weight_decay"]) == (0.5, 0.0)
    names = {id(p): name for name, p in model.named_parameters()}
    exempt_names = sorted(names[id(p)] for p in exempt["params"])
    biases = sorted(name for name in names.values() if "bias" in name)
    assert len(biases) == 10  # the encoder's 4, the bridge, the key projection, the GRU cell's 2, pre-output, output
    expected = (biases if "bias" in no_decay else []) + (["src_embed.embedding.weight"] if "embedding" in no_decay else [])
    assert exempt_names == sorted(expected)
    assert "decoder.attention.v.weight" in [names[id(p)] for p in decayed["params"]]  # a weight, though one row
    assert len(decayed["params"]) + len(exempt["params"]) == len(names)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    for name, param in model.named_parameters():
        factor = 1.0 if name in exempt_names else 1 - 0.1 * 0.5
        torch.testing.assert_close(param.detach(), before[name] * factor, msg=name)


def test_optim_no_decay_changes_nothing_without_weight_decay_and_is_checked():
    model = tiny_model()
    for weight_decay in (0.0, 0.1):
        optimizer = build_adam(model, 0.01, (0.9, 0.999), weight_decay, sparse=False, decoupled=True,
                               no_decay=("bias", "embedding"))
        assert len(optimizer.param_groups) == (1 if weight_decay == 0 else 2)
    with pytest.raises(ConfigError, match="optim.no_decay='norm' is not a valid choice; use one of: bias, embedding"):
        OptimConfig(no_decay=["bias", "norm"])


def test_resuming_with_other_parameter_groups_is_a_clear_error():
    from nmt.train import restore

    model = tiny_model()
    saved = build_adam(model, 0.01, (0.9, 0.999), 0.1, sparse=False, decoupled=True)
    resumed = build_adam(model, 0.01, (0.9, 0.999), 0.1, sparse=False, decoupled=True, no_decay=("bias",))
    with pytest.raises(ConfigError, match="optim.no_decay.*config.yaml") as caught:
        restore({"model": model.state_dict(), "optimizer": saved.state_dict()}, model, resumed, None)
    assert caught.value.every_rank


def test_unfrozen_tables_join_without_weight_decay_when_no_decay_names_them():
    cfg = TrainConfig(model=ModelConfig(embedding_dim=E, hidden_size=H, embeddings=EmbeddingConfig(freeze="both")),
                      optim=OptimConfig(name="adamw", weight_decay=0.1, no_decay=["embedding"], scheduler="none"))
    model = build_model(cfg.model, V, V)
    model.src_embed.weight.requires_grad_(False)
    model.tgt_embed.weight.requires_grad_(False)
    optimizer = build_optimizer(model, cfg)
    assert len(optimizer.param_groups) == 1  # the frozen tables are not in it, so nothing is exempt yet
    assert unfreeze_embeddings(model, optimizer, None, tuple(cfg.optim.no_decay)) == 2
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]


def test_optim_name_is_checked():
    with pytest.raises(ConfigError, match="optim.name"):
        OptimConfig(name="sgd")
