"""End to end on real data through the nmt-train console script: artifacts, resume, freezing, vectors."""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import yaml

from conftest import FAST_DEBUG, REPO, run_cli, script_path
from nmt.checkpoint import load_checkpoint, previous_path
from nmt.run import load_trained

EMBEDDING_DIM = 48  # model.embedding_dim in experiment=debug
SRC_EMBED, TGT_EMBED = "src_embed.embedding.weight", "tgt_embed.embedding.weight"


def train(data_dir: Path, run_dir: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    out = run_cli("nmt-train", *FAST_DEBUG, f"paths.data_dir={data_dir}", f"paths.run_dir={run_dir}", *extra)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def weights(run_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / f"{name}.pt")["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different}"


# --- one run and what it leaves behind ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted(shared_data_dir, tmp_path_factory) -> Path:
    """nmt-train experiment=debug on the real Multi30k directory, two epochs without a break."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    train(shared_data_dir, run_dir, "trainer.max_epochs=2")
    return run_dir


def val_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "epoch", "loss", "bleu", "lr")} for r in records if r["kind"] == "val"]


def drift_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "embeddings"]


def test_run_directory_holds_everything(uninterrupted):
    run_dir = uninterrupted
    for name in ("config.yaml", "spm.joint.model", "metrics.jsonl", "train.log", "training_curves.png",
                 "embedding_drift.png", "checkpoints/best.pt", "checkpoints/last.pt", "checkpoints/step0.pt"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.rglob("*.tmp*")), "temporary files left behind"
    assert (run_dir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "embedding_drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    assert config["name"] == "debug" and config["paths"]["run_dir"] == str(run_dir)
    assert config["data"]["train_limit"] == 500 and config["model"]["hidden_size"] == 96
    val = val_records(run_dir)
    assert [r["step"] for r in val] == [10, 20]  # 500 pairs make 10 batches of 2000 tokens; one validation an epoch
    assert all(r["loss"] > 0 for r in val) and val[1]["loss"] < val[0]["loss"]
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["train_state"]["step"] == 20 and last["train_state"]["epoch"] == 2
    assert last["config"]["model"] == config["model"]
    # training moved the weights away from step0
    step0 = weights(run_dir, "step0")
    assert all(not torch.equal(step0[k], v) for k, v in last["model"].items() if k.startswith(("encoder", "output")))
    # one embedding-drift record per validation, and it agrees with the checkpoints
    drift = drift_records(run_dir)
    assert [r["step"] for r in drift] == [10, 20]
    for side, key in (("src", SRC_EMBED), ("tgt", TGT_EMBED)):
        moved = (last["model"][key] != step0[key]).any(dim=1)[1:]  # pad row excluded
        stats = drift[-1][side]
        assert stats["rows"] == len(moved) and stats["unchanged_rows"] == int((~moved).sum())
        assert stats["moved_share"] == pytest.approx(float(moved.float().mean()))
        distance = (last["model"][key] - step0[key]).norm(dim=1)[1:].mean()
        assert stats["mean_l2"] == pytest.approx(float(distance), rel=1e-5)
        assert 0 < drift[0][side]["mean_l2"] < stats["mean_l2"]  # rows keep moving
        # a joint vocabulary: pieces of the other language never reach this side, so they never change
        assert 0 < stats["unchanged_unseen"] <= stats["unchanged_rows"]


@pytest.mark.slow  # the resume tests imply it; run it to tell nondeterminism from a resume bug
def test_the_same_settings_give_the_same_run(uninterrupted, shared_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(shared_data_dir, run_dir, "trainer.max_epochs=2")
    assert_same_weights(weights(run_dir, "last"), weights(uninterrupted, "last"))
    assert val_records(run_dir) == val_records(uninterrupted)


def test_a_files_run_can_be_loaded(debug_run):
    config = yaml.safe_load((debug_run / "config.yaml").read_text(encoding="utf-8"))
    assert config["data"]["dataset"] == "files"
    run = load_trained(debug_run, "best", torch.device("cpu"))
    assert not run.model.training
    assert_same_weights(run.model.state_dict(), weights(debug_run, "best"))
    assert run.vocab.joint and run.vocab.size("src") == run.model.src_embed.weight.size(0)


def test_existing_run_directory_is_refused_without_resume(uninterrupted, shared_data_dir, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(uninterrupted, run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    out = train(shared_data_dir, run_dir, "trainer.max_epochs=2", check=False)
    assert out.returncode == 2
    assert "already holds a run" in out.stderr and "trainer.resume=true" in out.stderr
    assert "Traceback" not in out.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before  # nothing overwritten


def test_resume_with_different_model_settings_is_refused(uninterrupted, shared_data_dir, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(uninterrupted, run_dir)
    out = train(shared_data_dir, run_dir, "trainer.max_epochs=2", "trainer.resume=true", "model.hidden_size=50",
                check=False)
    assert out.returncode == 2
    assert "Cannot resume" in out.stderr and "model.hidden_size" in out.stderr
    assert "Traceback" not in out.stderr


# --- resume equals an uninterrupted run -----------------------------------------------------------------------

def test_resume_with_more_epochs_equals_an_uninterrupted_run(uninterrupted, shared_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(shared_data_dir, run_dir, "trainer.max_epochs=1")
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["train_state"]["epoch"] == 1
    out = train(shared_data_dir, run_dir, "trainer.max_epochs=2", "trainer.resume=true")
    assert "resumed from" in out.stderr
    resumed = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    reference = load_checkpoint(uninterrupted / "checkpoints" / "last.pt")
    assert resumed["train_state"]["step"] == reference["train_state"]["step"]
    assert_same_weights(resumed["model"], reference["model"])
    assert_same_weights(weights(run_dir, "best"), weights(uninterrupted, "best"))
    assert val_records(run_dir) == val_records(uninterrupted)


def test_memory_returned_as_usual_trains_the_same_run(uninterrupted, shared_data_dir, tmp_path):
    """trainer.keep_freed_memory (on in the uninterrupted run) changes where blocks live, not a number."""
    run_dir = tmp_path / "run"
    train(shared_data_dir, run_dir, "trainer.max_epochs=2", "trainer.keep_freed_memory=false")
    assert_same_weights(weights(run_dir, "last"), weights(uninterrupted, "last"))
    assert val_records(run_dir) == val_records(uninterrupted)


def _read_until(stream, marker: str, timeout: float) -> str:
    seen, deadline = "", time.monotonic() + timeout
    while marker not in seen:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"timed out waiting for {marker!r}; got {seen[-2000:]!r}")
        chunk = os.read(stream.fileno(), 4096).decode(errors="replace")
        if not chunk:
            break
        seen += chunk
    return seen


def test_resume_after_sigint_equals_an_uninterrupted_run(uninterrupted, shared_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = [script_path("nmt-train"), *FAST_DEBUG, f"paths.data_dir={shared_data_dir}", f"paths.run_dir={run_dir}",
            "trainer.max_epochs=2"]
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        _read_until(child.stderr, "epoch 1: ", timeout=120)  # the first epoch has started
        time.sleep(0.3)
        child.send_signal(signal.SIGINT)
        _, rest = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
    stderr = rest.decode(errors="replace")
    assert child.returncode == 130, stderr[-3000:]
    assert "nmt: stopped: Training stopped by SIGINT" in stderr and "Resume with" in stderr, stderr[-3000:]
    assert "Traceback" not in stderr and "nmt: error" not in stderr
    assert "WARNING stopped: Training stopped by SIGINT" in (run_dir / "train.log").read_text(encoding="utf-8")
    stopped = load_checkpoint(run_dir / "checkpoints" / "last.pt")["train_state"]
    assert 0 < stopped["step"] < 20
    train(shared_data_dir, run_dir, "trainer.max_epochs=2", "trainer.resume=true")
    assert_same_weights(weights(run_dir, "last"), weights(uninterrupted, "last"))
    assert val_records(run_dir) == val_records(uninterrupted)  # no replayed or missing records


# --- frozen and pretrained embeddings ---------------------------------------------------------------------------

def test_frozen_embeddings_are_bit_identical_after_training(shared_data_dir, tmp_path):
    train(shared_data_dir, tmp_path / "run", "model.embeddings.freeze=both")
    step0, last = weights(tmp_path / "run", "step0"), weights(tmp_path / "run", "last")
    assert torch.equal(step0[SRC_EMBED], last[SRC_EMBED])
    assert torch.equal(step0[TGT_EMBED], last[TGT_EMBED])
    # everything else did train
    assert not torch.equal(step0["output.weight"], last["output.weight"])
    assert not torch.equal(step0["encoder.rnn.weight_ih_l0"], last["encoder.rnn.weight_ih_l0"])


WORDS = ["Mann", "Frau", "Hund", "Kind", "zwei", "Ein", "Eine", "einem", "mit", "und", "auf", "der", "die",
         "Straße", "Wasser", "spielen", "steht", "ist", "rot", "Mädchen"]


def write_vectors(path: Path, dim: int, words=WORDS, header: bool = True) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(42)
    vectors = {word: torch.randn(dim, generator=generator).round(decimals=4) for word in words}
    lines = [f"{len(vectors)} {dim}"] if header else []
    lines += [f"{w} " + " ".join(f"{x:.4f}" for x in v.tolist()) for w, v in vectors.items()]
    lines.append("Zzyzxq " + " ".join(["0.5"] * dim))  # a word no piece spells
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return vectors


def test_pretrained_source_vectors_are_loaded_and_frozen(shared_data_dir, tmp_path):
    vectors_file = tmp_path / "vectors.de.txt"
    vectors = write_vectors(vectors_file, EMBEDDING_DIM)
    run_dir = tmp_path / "run"
    out = train(shared_data_dir, run_dir, f"model.embeddings.src_vectors={vectors_file}",
                "model.embeddings.freeze=src")
    coverage = [line for line in out.stderr.splitlines() if "coverage: src vectors" in line]
    assert len(coverage) == 1, out.stderr[-3000:]
    processor = spm.SentencePieceProcessor(model_file=str(run_dir / "spm.joint.model"))
    last, step0 = weights(run_dir, "last"), weights(run_dir, "step0")
    covered = 0
    for index in range(4, processor.get_piece_size()):
        piece = processor.id_to_piece(index)
        word = piece if piece in vectors else piece.lstrip("\u2581")
        if word in vectors:
            covered += 1
            assert torch.equal(last[SRC_EMBED][index], vectors[word]), piece
    assert covered >= 10  # most of these frequent words are whole pieces
    assert f"{covered}/{processor.get_piece_size() - 4} pieces covered" in coverage[0]
    assert "% of training tokens" in coverage[0]
    mann = processor.piece_to_id("\u2581Mann")  # unk (1) if it were not a piece
    assert mann >= 4 and torch.equal(last[SRC_EMBED][mann], vectors["Mann"])
    assert torch.equal(last[SRC_EMBED], step0[SRC_EMBED])  # frozen, vectors included
    assert torch.equal(last[SRC_EMBED][0], torch.zeros(EMBEDDING_DIM))  # pad stays zero
    assert not torch.equal(last[TGT_EMBED], step0[TGT_EMBED])  # the target side trained


def test_a_run_started_from_vectors_resumes_without_the_vectors_file(shared_data_dir, tmp_path):
    vectors_file = tmp_path / "vectors.de.txt"
    vectors = write_vectors(vectors_file, EMBEDDING_DIM)
    run_dir = tmp_path / "run"
    started = [f"model.embeddings.src_vectors={vectors_file}", "model.embeddings.freeze=src"]
    train(shared_data_dir, run_dir, *started, "trainer.max_epochs=1")
    vectors_file.unlink()  # moved or deleted after the start: the weights are in the checkpoint
    for resume, epochs in ((started, 2), (["model.embeddings.freeze=src"], 3)):  # the same settings, then without the file
        out = train(shared_data_dir, run_dir, *resume, f"trainer.max_epochs={epochs}", "trainer.resume=true")
        assert "coverage: src vectors" not in out.stderr  # nothing read
        assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["train_state"]["epoch"] == epochs
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        assert saved["model"]["embeddings"]["src_vectors"] == str(vectors_file)  # the record keeps where it started
    mann = spm.SentencePieceProcessor(model_file=str(run_dir / "spm.joint.model")).piece_to_id("\u2581Mann")
    assert torch.equal(weights(run_dir, "last")[SRC_EMBED][mann], vectors["Mann"])
    out = train(shared_data_dir, tmp_path / "fresh", *started, check=False)  # a new run does need the file
    assert out.returncode == 2 and "vectors.de.txt (model.embeddings.src_vectors) does not exist" in out.stderr


def test_vectors_of_the_wrong_dimension_are_a_clean_error(shared_data_dir, tmp_path):
    vectors_file = tmp_path / "vectors.txt"
    write_vectors(vectors_file, 7)
    run_dir = tmp_path / "run"
    out = train(shared_data_dir, run_dir, f"model.embeddings.src_vectors={vectors_file}", check=False)
    assert out.returncode == 2
    assert "dimension 7" in out.stderr and str(EMBEDDING_DIM) in out.stderr and "vectors.txt" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (run_dir / "config.yaml").exists()  # a failed start leaves no run behind


# --- slow: hard crashes mid-epoch, other data sets --------------------------------------------------------------

CRASH_AFTER_SAVING = """
import os, sys
import nmt.train
from nmt.cli import train
save = nmt.train.Trainer.save
def save_then_crash(self, name):
    save(self, name)
    if name == "last" and self.state.step == {step}:
        os._exit(137)  # like a power cut right after the checkpoint is written: no handler runs
nmt.train.Trainer.save = save_then_crash
sys.argv = ["nmt-train", *sys.argv[1:]]
train()
"""


def crash_after_saving(data_dir: Path, run_dir: Path, step: int, *extra: str) -> None:
    """nmt-train that dies, as in a power cut, right after writing the last.pt of update `step`."""
    args = [*FAST_DEBUG, f"paths.data_dir={data_dir}", f"paths.run_dir={run_dir}", *extra]
    crashed = run_cli(sys.executable, "-c", CRASH_AFTER_SAVING.format(step=step), *args)
    assert crashed.returncode == 137, crashed.stderr[-3000:]


@pytest.mark.slow
def test_resume_after_a_hard_crash_mid_epoch_equals_an_uninterrupted_run(shared_data_dir, tmp_path):
    extra = ["trainer.max_epochs=2", "trainer.validate_every=4"]  # checkpoints at steps 4, 8, 12, ... mid-epoch
    reference = tmp_path / "reference"
    train(shared_data_dir, reference, *extra)
    run_dir = tmp_path / "run"
    crash_after_saving(shared_data_dir, run_dir, 8, *extra)
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")["train_state"]
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (8, 0, 8)
    train(shared_data_dir, run_dir, *extra, "trainer.resume=true")
    assert_same_weights(weights(run_dir, "last"), weights(reference, "last"))
    assert_same_weights(weights(run_dir, "best"), weights(reference, "best"))
    assert val_records(run_dir) == val_records(reference)


@pytest.mark.slow
def test_tatoeba_tutorial_trains_end_to_end(shared_data_dir, tmp_path):
    if not (shared_data_dir / "tatoeba-eng-fra" / "eng-fra.txt").is_file():
        pytest.skip("no Tatoeba file in the data directory")
    run_dir = tmp_path / "run"
    out = run_cli("nmt-train", "experiment=tatoeba_fr_en_tutorial", "model=gru_small", "model.hidden_size=32",
                  "model.embedding_dim=16", "data.vocab.size=500", "data.train_limit=500", "data.val_limit=20",
                  "trainer.max_epochs=1", "trainer.device=cpu", f"paths.data_dir={shared_data_dir}",
                  f"paths.run_dir={run_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    assert len(val_records(run_dir)) == 1


@pytest.mark.slow
def test_the_full_debug_experiment_runs(shared_data_dir, tmp_path):
    """experiment=debug exactly as documented: a few seconds to a minute on a CPU."""
    run_dir = tmp_path / "run"
    out = run_cli("nmt-train", "experiment=debug", "trainer.device=cpu", f"paths.data_dir={shared_data_dir}",
                  f"paths.run_dir={run_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    val = val_records(run_dir)
    assert len(val) == 3 and val[-1]["loss"] < val[0]["loss"]


# --- embeddings end to end: vectors from the project's own script, unfreezing, tying, sparse ---------------------

def load_vectors(path: Path) -> dict[str, torch.Tensor]:
    from nmt.model.vectors import read_vectors

    return read_vectors(path)


def test_script_vectors_load_frozen_and_export_bit_for_bit(shared_data_dir, tmp_path):
    """The check in the issue: vectors from scripts/train_vectors.py, freeze=src, export equals the file."""
    vectors_file, run_dir, exported = tmp_path / "vectors.de.txt", tmp_path / "run", tmp_path / "export.txt"
    made = run_cli(sys.executable, str(REPO / "scripts" / "train_vectors.py"), "--side", "src", "--epochs", "1",
                   "--out", str(vectors_file), *FAST_DEBUG, f"paths.data_dir={shared_data_dir}")
    assert made.returncode == 0, made.stderr[-3000:]
    out = train(shared_data_dir, run_dir, f"model.embeddings.src_vectors={vectors_file}", "model.embeddings.freeze=src")
    coverage = [line for line in out.stderr.splitlines() if line.startswith("coverage: src vectors")]
    assert len(coverage) == 1, out.stderr[-3000:]
    exporting = run_cli("nmt-embeddings", f"run={run_dir}", "checkpoint=last", "side=src", f"export={exported}")
    assert exporting.returncode == 0, exporting.stderr[-3000:]
    in_file, out_file = load_vectors(vectors_file), load_vectors(exported)
    covered = [piece for piece in in_file if piece in out_file]
    # the script read the same training data with the same SentencePiece settings: every piece it saw matches
    assert len(covered) == len(in_file) > 100
    for piece in covered:
        assert torch.equal(out_file[piece], in_file[piece]), piece
    # pieces absent from the German side (English ones in the joint vocabulary) may match a German piece's
    # bare word: "▁man" takes the vector of "man"
    as_word = [p for p in out_file if p not in in_file and p.lstrip("\u2581") in in_file]
    for piece in as_word:
        assert torch.equal(out_file[piece], in_file[piece.lstrip("\u2581")]), piece
    pieces = spm.SentencePieceProcessor(model_file=str(run_dir / "spm.joint.model")).get_piece_size() - 4
    assert (f"{len(covered) + len(as_word)}/{pieces} pieces covered" in coverage[0]
            and f"{len(covered)} as the piece, {len(as_word)} as the word" in coverage[0]), coverage[0]
    assert "100.0% of training tokens" in coverage[0]  # the script wrote every piece of the source side
    assert torch.equal(weights(run_dir, "last")[SRC_EMBED], weights(run_dir, "step0")[SRC_EMBED])


def test_unfreeze_after_beyond_the_run_is_pointed_out(shared_data_dir, tmp_path):
    out = train(shared_data_dir, tmp_path / "run", "model.embeddings.freeze=src", "model.embeddings.unfreeze_after=10",
                "trainer.max_steps=3")
    assert ("model.embeddings.unfreeze_after=10 is not below trainer.max_steps=3: the frozen embeddings "
            "(model.embeddings.freeze=src) will stay frozen for the whole run") in out.stderr
    assert "stayed frozen for the whole run: model.embeddings.unfreeze_after=10 was not reached in 3 updates" in out.stderr
    assert torch.equal(weights(tmp_path / "run", "last")[SRC_EMBED], weights(tmp_path / "run", "step0")[SRC_EMBED])


UNFREEZE = ["model.embeddings.freeze=src", "model.embeddings.unfreeze_after=4", "trainer.validate_every=2"]


@pytest.fixture(scope="module")
def unfrozen(shared_data_dir, tmp_path_factory) -> Path:
    """Source embeddings frozen for 4 updates, then trained; 6 updates, a validation every 2."""
    run_dir = tmp_path_factory.mktemp("unfreeze") / "run"
    out = train(shared_data_dir, run_dir, *UNFREEZE, "trainer.max_steps=6")
    assert "step 4: embeddings unfrozen (model.embeddings.unfreeze_after=4)" in out.stderr
    return run_dir


def test_unfreeze_after_n_keeps_rows_identical_up_to_step_n_and_moves_them_after(unfrozen):
    drift = {r["step"]: r for r in drift_records(unfrozen)}
    assert sorted(drift) == [2, 4, 6]
    for step in (2, 4):  # frozen: every source row bit-identical to step 0; the target side trains
        assert drift[step]["src"]["unchanged_rows"] == drift[step]["src"]["rows"]
        assert drift[step]["src"]["mean_l2"] == 0.0 and drift[step]["tgt"]["moved_share"] > 0
    assert drift[6]["src"]["moved_share"] > 0.2 and drift[6]["src"]["mean_l2"] > 0
    step0 = weights(unfrozen, "step0")[SRC_EMBED]
    at_4 = load_checkpoint(unfrozen / "checkpoints" / "last.prev.pt")  # the checkpoint before last.pt
    assert at_4["train_state"]["step"] == 4 and torch.equal(at_4["model"][SRC_EMBED], step0)
    assert len(at_4["optimizer"]["param_groups"]) == 2  # the unfrozen table is a second group from step 4
    last = load_checkpoint(unfrozen / "checkpoints" / "last.pt")
    assert last["train_state"]["step"] == 6 and not torch.equal(last["model"][SRC_EMBED], step0)


def test_resume_after_unfreezing_equals_an_uninterrupted_run(unfrozen, shared_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(shared_data_dir, run_dir, *UNFREEZE, "trainer.max_steps=5")  # stops after unfreezing
    train(shared_data_dir, run_dir, *UNFREEZE, "trainer.max_steps=6", "trainer.resume=true")
    assert_same_weights(weights(run_dir, "last"), weights(unfrozen, "last"))


def test_three_way_tied_run_trains_one_matrix_and_loads_back(shared_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(shared_data_dir, run_dir, "model.tie_embeddings=true", "model.tie_src_tgt=true", "trainer.max_steps=3")
    last, step0 = weights(run_dir, "last"), weights(run_dir, "step0")
    assert torch.equal(last[SRC_EMBED], last[TGT_EMBED]) and torch.equal(last[TGT_EMBED], last["output.weight"])
    assert not torch.equal(last[SRC_EMBED], step0[SRC_EMBED])
    run = load_trained(run_dir, "last", torch.device("cpu"))
    assert run.model.src_embed.weight is run.model.tgt_embed.weight is run.model.output.weight
    drift = drift_records(run_dir)[-1]
    assert drift["src"] == drift["tgt"]  # one table, measured twice


def test_sparse_gradients_train_and_resume(shared_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    sparse = ["model.embeddings.sparse=true", "trainer.validate_every=2"]
    train(shared_data_dir, run_dir, *sparse, "trainer.max_steps=2")
    train(shared_data_dir, run_dir, *sparse, "trainer.max_steps=4", "trainer.resume=true")
    reference = tmp_path / "reference"
    train(shared_data_dir, reference, *sparse, "trainer.max_steps=4")
    assert_same_weights(weights(run_dir, "last"), weights(reference, "last"))
    last, step0 = weights(reference, "last"), weights(reference, "step0")
    assert not torch.equal(last[SRC_EMBED], step0[SRC_EMBED])
    optimizer = load_checkpoint(reference / "checkpoints" / "last.pt")["optimizer"]
    assert [g["sparse"] for g in optimizer["param_groups"]] == [False, True]


def test_kept_validation_weights_average_into_a_checkpoint_that_evaluates(shared_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(shared_data_dir, run_dir, "trainer.keep_checkpoints=2", "trainer.validate_every=2", "trainer.max_steps=6")
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("val-*.pt"))
    assert kept == ["val-00000004.pt", "val-00000006.pt"]  # the validation at step 2 was dropped
    assert_same_weights(weights(run_dir, "val-00000006"), weights(run_dir, "last"))
    out = run_cli(sys.executable, str(REPO / "scripts" / "average_checkpoints.py"), "--run", str(run_dir), "--last", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    a, b, mean = (weights(run_dir, name) for name in ("val-00000004", "val-00000006", "averaged"))
    for key in mean:
        if mean[key].is_floating_point():
            assert torch.allclose(mean[key], (a[key] + b[key]) / 2, atol=1e-7), key
    assert not torch.equal(mean["output.weight"], b["output.weight"])
    evaluated = run_cli("nmt-evaluate", f"run={run_dir}", "eval.checkpoint=averaged", "eval.beam_size=1")
    assert evaluated.returncode == 0 and "averaged.pt" in (run_dir / "eval" / "test.json").read_text()
    too_many = run_cli(sys.executable, str(REPO / "scripts" / "average_checkpoints.py"), "--run", str(run_dir), "--last", "3")
    assert too_many.returncode == 2 and "trainer.keep_checkpoints=3" in too_many.stderr


def test_resuming_a_run_that_reached_its_limit_takes_no_step(shared_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(shared_data_dir, run_dir, "trainer.max_steps=4", "trainer.validate_every=2")
    before = weights(run_dir, "last")
    train(shared_data_dir, run_dir, "trainer.max_steps=4", "trainer.validate_every=2", "trainer.resume=true")
    assert_same_weights(weights(run_dir, "last"), before)
    assert [r["step"] for r in val_records(run_dir)] == [2, 4]
    train(shared_data_dir, run_dir, "trainer.max_steps=6", "trainer.validate_every=2", "trainer.resume=true")
    assert [r["step"] for r in val_records(run_dir)] == [2, 4, 6]


def test_average_last_averages_at_the_end_and_the_average_competes_for_best(shared_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(shared_data_dir, run_dir, "trainer.keep_checkpoints=3", "trainer.average_last=2", "trainer.validate_every=2",
          "trainer.max_steps=6", "trainer.early_stopping_metric=loss")
    a, b, mean = (weights(run_dir, name) for name in ("val-00000004", "val-00000006", "averaged"))
    for key in mean:
        if mean[key].is_floating_point():
            assert torch.allclose(mean[key], (a[key] + b[key]) / 2, atol=1e-7), key
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (average,) = [r for r in records if r["kind"] == "averaged"]
    assert (average["first_step"], average["last_step"]) == (4, 6)
    best_validation = min(r["loss"] for r in val_records(run_dir))
    assert average["best"] == (average["loss"] < best_validation)
    best = weights(run_dir, "best")
    assert torch.equal(best["output.weight"], mean["output.weight"]) == average["best"]
    assert_same_weights(weights(run_dir, "last"), b)  # last.pt keeps the trained weights, for resuming


def test_average_from_leaves_out_the_validations_made_early_in_the_budget(shared_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(shared_data_dir, run_dir, "trainer.keep_checkpoints=4", "trainer.average_last=4", "trainer.validate_every=2",
          "trainer.max_steps=8", "trainer.average_from=0.6")
    kept = [load_checkpoint(path) for path in sorted((run_dir / "checkpoints").glob("val-*.pt"))]
    budget = {state["step"]: state["budget_used"] for state in kept}
    assert budget == {2: 0.25, 4: 0.5, 6: 0.75, 8: 1.0}  # trainer.max_steps is the budget here
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    (average,) = [r for r in records if r["kind"] == "averaged"]
    assert (average["first_step"], average["last_step"], average["averaged"]) == (6, 8, 2)
    assert "averaged the weights of the last 2 validations (steps 6 to 8)" in (run_dir / "train.log").read_text()
    a, b, mean = (weights(run_dir, name) for name in ("val-00000006", "val-00000008", "averaged"))
    assert torch.allclose(mean["output.weight"], (a["output.weight"] + b["output.weight"]) / 2, atol=1e-7)


def test_average_last_needs_the_weights_kept(shared_data_dir, tmp_path):
    out = run_cli("nmt-train", *FAST_DEBUG, f"paths.data_dir={shared_data_dir}", f"paths.run_dir={tmp_path / 'run'}",
                  "trainer.average_last=3", "trainer.keep_checkpoints=2")
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "trainer.keep_checkpoints=3 (or more)" in out.stderr


def test_a_run_resumed_mid_epoch_trains_on_the_pieces_sampled_for_that_epoch(shared_data_dir, tmp_path):
    extra = ["data.subword_alpha=0.2", "trainer.validate_every=3"]  # one epoch (FAST_DEBUG), checkpoints mid-epoch
    reference = tmp_path / "reference"
    out = train(shared_data_dir, reference, *extra)
    assert "epoch 1: segmentation sampled" in out.stderr
    # only the epochs that last.pt, or the last.pt it replaced, may resume into keep their pieces
    replaced = load_checkpoint(previous_path(reference / "checkpoints" / "last.pt"))["train_state"]["epoch"]
    kept = sorted(p.name for p in (reference / "segmentation").iterdir())
    assert kept == [f"epoch-{epoch + 1:04d}.npz" for epoch in range(replaced, 1)] == ["epoch-0001.npz"]
    # SentencePiece's draws differ between processes: the run starts from the reference's pieces
    run_dir = tmp_path / "run"
    (run_dir / "segmentation").mkdir(parents=True)
    shutil.copy(reference / "segmentation" / "epoch-0001.npz", run_dir / "segmentation")
    crash_after_saving(shared_data_dir, run_dir, 3, *extra)
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["train_state"]["batch_in_epoch"] == 3  # mid-epoch
    out = train(shared_data_dir, run_dir, *extra, "trainer.resume=true")
    assert "segmentation sampled" not in out.stderr and "sampled for it before" in out.stderr
    assert_same_weights(weights(run_dir, "last"), weights(reference, "last"))
    assert val_records(run_dir) == val_records(reference)


# --- learning-rate schedules over the training budget ------------------------------------------------------

def test_linear_schedule_falls_with_the_steps_and_resumes_after_a_crash_as_if_uninterrupted(shared_data_dir, tmp_path):
    extra = ["optim.scheduler=linear", "optim.warmup_steps=0", "optim.lr=0.003", "optim.min_lr=0.0003",
             "trainer.max_steps=8", "trainer.validate_every=2"]
    reference = tmp_path / "reference"
    train(shared_data_dir, reference, *extra)
    # after update k of 8 the rate is 0.003 - 0.0027 * k / 8: each validation logs the rate for the next update
    assert [r["lr"] for r in val_records(reference)] == pytest.approx([0.003 - 0.0027 * k / 8 for k in (2, 4, 6, 8)])
    run_dir = tmp_path / "run"
    crash_after_saving(shared_data_dir, run_dir, 4, *extra)
    train(shared_data_dir, run_dir, *extra, "trainer.resume=true")
    assert_same_weights(weights(run_dir, "last"), weights(reference, "last"))
    assert val_records(run_dir) == val_records(reference)


def test_cycles_fall_to_a_tenth_of_the_rate_by_the_end_of_every_epoch_after_cycle_from(shared_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(shared_data_dir, run_dir, "optim.scheduler=linear", "optim.warmup_steps=0", "optim.lr=0.003",
          "optim.min_lr=0.0003", "optim.cycle_from=0.3333333", "trainer.max_epochs=3", "trainer.log_every=1")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]  # one per update, with the rate that update used
    size = sum(r["epoch"] == 1 for r in steps)
    assert size >= 3 and [r["epoch"] for r in steps] == [1] * size + [2] * size + [3] * size
    for k, record in enumerate(steps):
        epoch, j = divmod(k, size)
        fall = 0.0003 + 0.0027 * (1 - (epoch + j / size) / 3)  # the linear fall over three epochs
        cycle = 1.0 if epoch == 0 else 1 - 0.9 * j / (size - 1)  # from epoch 2, each epoch is one cycle
        assert record["lr"] == pytest.approx(fall * cycle), (epoch, j)


def test_inverse_sqrt_warms_up_then_falls_with_each_update(shared_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(shared_data_dir, run_dir, "optim.scheduler=inverse_sqrt", "optim.warmup_steps=4", "optim.lr=0.003",
          "trainer.max_steps=8", "trainer.validate_every=2")
    # after update k the rate for the next is 0.003 * min((k + 1) / 4, sqrt(4 / (k + 1)))
    expected = [0.003 * min((k + 1) / 4, math.sqrt(4 / (k + 1))) for k in (2, 4, 6, 8)]
    assert [r["lr"] for r in val_records(run_dir)] == pytest.approx(expected)


def test_a_time_budget_schedule_ends_at_min_lr_when_the_time_is_up(shared_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(shared_data_dir, run_dir, "optim.scheduler=cosine", "optim.warmup_steps=0", "optim.min_lr=0.00001",
          "trainer.max_time=6s", "trainer.max_epochs=100", "trainer.validate_every=5")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val"]
    assert len(val) >= 2 and val[-1]["elapsed"] >= 6
    lrs = [r["lr"] for r in val]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 5e-3  # falling from optim.lr (debug: 5e-3) from the start
    assert val[-1]["lr"] == pytest.approx(1e-5)  # the step that used the time up set the floor
