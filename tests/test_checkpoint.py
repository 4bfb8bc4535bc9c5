"""Checkpoints: round trip, atomic writes, and loading never runs code from the file."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

from nmt.checkpoint import load_checkpoint, load_latest, previous_path, save_checkpoint
from nmt.config import ModelConfig
from nmt.errors import NMTError
from nmt.run import RunFiles, checkpoint_path
from nmt.model.seq2seq import build_model


def tiny_state() -> dict:
    model = build_model(ModelConfig(embedding_dim=4, hidden_size=6, attention_size=5), 11, 13)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.tensor([[5, 3]]), torch.tensor([2]), torch.tensor([[2, 7]])).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": {"torch": torch.get_rng_state()},
            "train_state": {"step": 7, "epoch": 1, "best_metric": None, "stop_reason": ""},
            "config": {"model": {"hidden_size": 6}, "optim": {"betas": [0.9, 0.999]}}}


def test_save_load_roundtrip(tmp_path):
    state = tiny_state()
    path = tmp_path / "checkpoints" / "last.pt"  # the folder is created on demand
    save_checkpoint(state, path)
    loaded = load_checkpoint(path)
    assert loaded.keys() == state.keys()
    assert loaded["model"].keys() == state["model"].keys()
    assert all(torch.equal(loaded["model"][k], v) for k, v in state["model"].items())
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    assert loaded["train_state"] == state["train_state"] and loaded["config"] == state["config"]
    model = build_model(ModelConfig(embedding_dim=4, hidden_size=6, attention_size=5), 11, 13)
    model.load_state_dict(loaded["model"])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    optimizer.load_state_dict(loaded["optimizer"])
    assert optimizer.state_dict()["state"][0]["step"] == state["optimizer"]["state"][0]["step"]


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint({"model": {"w": torch.zeros(3)}}, path)
    save_checkpoint({"model": {"w": torch.ones(3)}}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.zeros(3)}}, path)

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(NMTError, match="No space left on device"):
        save_checkpoint({"model": {"w": torch.ones(3)}}, path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(3))


class _Payload:
    """Unpickling this object creates a file: what a malicious checkpoint would do."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


class _ShellPayload:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("payload", [_Payload, _ShellPayload])
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": payload(marker)}, path)
    assert not marker.exists()
    with pytest.raises(NMTError) as error:
        load_checkpoint(path)
    assert "Refused to load" in str(error.value) and "evil.pt" in str(error.value)
    assert "GLOBAL" in str(error.value) and "PyTorch 2.6" not in str(error.value)  # the reason, not torch's advice
    assert not marker.exists()
    # the same file does run code under a plain unpickler: the test's payload is real
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")  # torch says so as it loads; expected here
def test_a_pickle_form_the_safe_loader_cannot_read_is_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil4.pt"  # protocol 4 frames the pickle; torch's weights-only loader stops at the frame
    torch.save({"model": {"w": torch.zeros(2)}, "extra": _ShellPayload(marker)}, path, pickle_protocol=4)
    with pytest.raises(NMTError) as error:
        load_checkpoint(path)
    assert "evil4.pt cannot be read safely" in str(error.value) and "not written by nmt" in str(error.value)
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0.5, 0.01, 0.0], ids=["half", "first-1%", "empty"])
def test_truncated_checkpoint_is_a_clear_error(tmp_path, keep):
    path = tmp_path / "last.pt"
    save_checkpoint(tiny_state(), path)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])  # e.g. a disk that filled up while copying
    with pytest.raises(NMTError, match="truncated or corrupted"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"this is not a checkpoint at all\n" * 10, bytes(range(256)) * 4],
                         ids=["text", "binary"])
def test_a_file_that_is_not_a_checkpoint_is_a_clear_error(tmp_path, content):
    garbage = tmp_path / "garbage.pt"  # e.g. eval.checkpoint pointing at the wrong file
    garbage.write_bytes(content)
    with pytest.raises(NMTError, match="garbage.pt") as error:
        load_checkpoint(garbage)
    assert "truncated or corrupted" in str(error.value)  # damage, not a refused unsafe pickle
    assert "Refused" not in str(error.value) and "PyTorch 2.6" not in str(error.value)


def test_foreign_and_missing_files_are_clear_errors(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(NMTError, match="not an nmt checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(NMTError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_keep_previous_moves_the_replaced_checkpoint_aside(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.zeros(3)}}, path, keep_previous=True)
    assert not previous_path(path).exists()  # nothing to keep yet
    save_checkpoint({"model": {"w": torch.ones(3)}}, path, keep_previous=True)
    assert previous_path(path) == tmp_path / "last.prev.pt"
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert torch.equal(load_checkpoint(previous_path(path))["model"]["w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.prev.pt", "last.pt"]


def test_load_latest_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.zeros(3)}}, path, keep_previous=True)
    save_checkpoint({"model": {"w": torch.ones(3)}}, path, keep_previous=True)
    state, used = load_latest(path)
    assert used == path and torch.equal(state["model"]["w"], torch.ones(3))
    path.write_bytes(path.read_bytes()[:200])  # damaged after it was written
    state, used = load_latest(path)
    assert used == previous_path(path) and torch.equal(state["model"]["w"], torch.zeros(3))
    assert "Falling back" in caplog.text
    previous_path(path).unlink()
    with pytest.raises(NMTError, match="truncated or corrupted"):
        load_latest(path)


def test_load_latest_says_what_to_do_when_both_checkpoints_are_damaged(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"model": {"w": torch.zeros(3)}}, path, keep_previous=True)
    save_checkpoint({"model": {"w": torch.ones(3)}}, path, keep_previous=True)
    for damaged in (path, previous_path(path)):
        damaged.write_bytes(damaged.read_bytes()[:200])
    with pytest.raises(NMTError) as error:
        load_latest(path)
    message = str(error.value)
    assert "last.pt" in message and "last.prev.pt" in message
    assert "Neither can be resumed" in message and "paths.run_dir" in message


def test_a_checkpoint_is_found_by_name_by_its_file_name_in_the_run_or_by_path(tmp_path, monkeypatch):
    run = RunFiles(tmp_path / "run")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    for name in ("last", "val-00000007"):
        run.checkpoint(name).write_bytes(b"")
    other = tmp_path / "elsewhere.pt"
    other.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert checkpoint_path(run, "last") == checkpoint_path(run, "last.pt") == run.checkpoint("last")
    assert checkpoint_path(run, "val-00000007") == checkpoint_path(run, "val-00000007.pt") == run.checkpoint("val-00000007")
    assert checkpoint_path(run, str(other)) == other
    assert checkpoint_path(run, "elsewhere.pt") == pathlib.Path("elsewhere.pt")  # relative to where the command runs
    assert checkpoint_path(run, "best") == run.checkpoint("best")  # not saved yet: the loader names it
    assert checkpoint_path(run, "gone.pt") == pathlib.Path("gone.pt")
