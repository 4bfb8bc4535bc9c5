"""trainer.ema_decay: the moving average's arithmetic, and what a run with one validates, saves and resumes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nmt.checkpoint import load_checkpoint
from nmt.ema import WeightAverage
from nmt.run import load_trained
from test_train import assert_same_weights, crash_after_saving, train, uninterrupted, val_records, weights  # noqa: F401


class Tied(nn.Module):
    """An embedding whose matrix is also the output layer's, as with model.tie_embeddings."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.hidden = nn.Linear(4, 4)
        self.out = nn.Linear(4, 7)
        self.out.weight = self.embed.weight


def nudge(model: nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator))


def test_the_average_follows_each_update_at_the_warmed_up_decay():
    model = Tied()
    ema = WeightAverage(model, 0.2)
    assert len(ema.averages) == 4  # the tied matrix once, the hidden weight, two biases
    expected = {name: param.detach().clone() for name, param in model.named_parameters()}
    for step in (1, 2, 3):
        nudge(model, step)
        ema.update(step)
        decay = min(0.2, (1 + step) / (10 + step))  # 2/11 after the first update, then the configured 0.2
        for name, param in model.named_parameters():
            expected[name] = decay * expected[name] + (1 - decay) * param.detach()
    for name, average in zip(ema.names, ema.averages):
        torch.testing.assert_close(average, expected[name])
    state = ema.state_dict(model)
    assert state["embed.weight"] is state["out.weight"]  # tied keys stay one tensor in a checkpoint
    torch.testing.assert_close(state["out.weight"], expected["embed.weight"])
    torch.testing.assert_close(state["hidden.bias"], expected["hidden.bias"])


def test_applied_swaps_the_average_in_and_the_training_weights_back_to_the_bit():
    model = Tied()
    ema = WeightAverage(model, 0.9)
    nudge(model, 1)
    ema.update(50)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError):
        with ema.applied():
            assert_same_weights(model.state_dict(), ema.state_dict(model))
            assert not torch.equal(model.hidden.weight, own["hidden.weight"])
            raise RuntimeError("a failed validation")
    assert_same_weights(model.state_dict(), own)
    assert model.out.weight is model.embed.weight  # the tie survives the swaps


def test_a_decay_of_zero_keeps_nothing_and_changes_nothing():
    model = Tied()
    ema = WeightAverage(model, 0.0)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    nudge(model, 1)
    ema.update(1)
    with ema.applied():
        assert not torch.equal(model.hidden.weight, own["hidden.weight"])
    assert not ema.enabled and ema.averages == []
    assert_same_weights(ema.state_dict(model), model.state_dict())


# --- a run with a moving average --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def averaged_run(shared_data_dir, tmp_path_factory):
    """Two epochs of experiment=debug with trainer.ema_decay, as `uninterrupted` in test_train has without."""
    run_dir = tmp_path_factory.mktemp("ema") / "run"
    train(shared_data_dir, run_dir, "trainer.max_epochs=2", "trainer.ema_decay=0.9", "trainer.keep_checkpoints=2")
    return run_dir


def test_the_average_leaves_training_alone_and_is_what_the_run_validates_and_keeps(averaged_run, uninterrupted):
    last = load_checkpoint(averaged_run / "checkpoints" / "last.pt")
    # the weights that train are those of the same run without an average, to the bit
    assert_same_weights(last["training_model"], weights(uninterrupted, "last"))
    assert "training_model" not in load_checkpoint(uninterrupted / "checkpoints" / "last.pt")
    moved = [k for k in last["model"] if not torch.equal(last["model"][k], last["training_model"][k])]
    assert moved, "the average should lag behind the training weights"
    # the last validation's weights are the average, as is what nmt-evaluate and nmt-translate load
    assert_same_weights(weights(averaged_run, "val-00000020"), last["model"])
    best_step = max(val_records(averaged_run), key=lambda r: r["bleu"])["step"]  # the first, on a tie
    assert_same_weights(weights(averaged_run, "best"), weights(averaged_run, f"val-{best_step:08d}"))
    run = load_trained(averaged_run, "last", torch.device("cpu"))
    assert_same_weights(run.model.state_dict(), last["model"])
    # ... and the average is what was validated: another dev loss from the same training
    mine, plain = val_records(averaged_run), val_records(uninterrupted)
    assert [r["step"] for r in mine] == [r["step"] for r in plain] == [10, 20]
    assert all(a["loss"] != b["loss"] for a, b in zip(mine, plain))
    assert "trainer.ema_decay=0.9" in (averaged_run / "train.log").read_text(encoding="utf-8")


def test_resume_after_a_crash_equals_an_uninterrupted_run_with_an_average(shared_data_dir, tmp_path):
    extra = ["trainer.validate_every=4", "trainer.ema_decay=0.8"]  # one epoch of 10 updates; checkpoints at 4 and 8
    reference = tmp_path / "reference"
    train(shared_data_dir, reference, *extra)
    run_dir = tmp_path / "run"
    crash_after_saving(shared_data_dir, run_dir, 8, *extra)
    train(shared_data_dir, run_dir, *extra, "trainer.resume=true")
    for name in ("last", "best"):
        assert_same_weights(weights(run_dir, name), weights(reference, name))
    last, expected = (load_checkpoint(path / "checkpoints" / "last.pt") for path in (run_dir, reference))
    assert_same_weights(last["training_model"], expected["training_model"])
    assert val_records(run_dir) == val_records(reference)


def test_an_average_switched_on_at_a_resume_starts_from_the_resumed_weights(shared_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(shared_data_dir, run_dir, "trainer.max_steps=4")
    out = train(shared_data_dir, run_dir, "trainer.max_steps=5", "trainer.ema_decay=0.9", "trainer.resume=true")
    assert "holds no moving average, so it starts from the resumed weights" in out.stderr + out.stdout
    before = load_checkpoint(run_dir / "checkpoints" / "last.prev.pt")  # step 4, no average
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert before["train_state"]["step"] == 4 and "training_model" not in before
    assert last["train_state"]["step"] == 5
    rate = min(0.9, 6 / 15)  # the decay after update 5
    for key, average in last["model"].items():
        expected = rate * before["model"][key] + (1 - rate) * last["training_model"][key]
        torch.testing.assert_close(average, expected, msg=key)
