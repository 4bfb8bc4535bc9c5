"""Data-parallel training: each rank's share of an epoch, two gloo ranks equal one process on the union
of their batches, agreed NaN skips, and nmt-train under torchrun (one run directory, resume)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp
import yaml

from conftest import FAST_DEBUG, TINY_PAIRS, run_cli
from nmt.checkpoint import load_checkpoint
from nmt.cli import main
from nmt.config import ModelConfig, OptimConfig, TrainConfig, VocabConfig
from nmt.data.batching import EncodedCorpus, collate, epoch_batches
from nmt.data.sampling import SegmentationSampler, load_segmentation
from nmt.data.vocab import Vocab
from nmt.distributed import Distributed, PeerFailed, advance, rank_batches, teardown, wrap_model
from nmt.errors import Interrupted, NMTError
from nmt.model.seq2seq import build_model
from nmt.run import RunFiles, load_trained
from nmt.train import Trainer, train_step

# --- each rank's share of the epoch ----------------------------------------------------------------------


@pytest.mark.parametrize("num_batches", [1, 2, 7, 10, 11])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_ranks_get_distinct_batches_and_the_same_number_of_steps(num_batches, world_size):
    shares = [rank_batches(num_batches, 0, rank, world_size) for rank in range(world_size)]
    steps = -(-num_batches // world_size)
    assert all(len(share) == steps for share in shares)  # nobody waits at the end of the epoch
    # step by step, the ranks hold different batches while there are enough to go round
    for step in range(steps):
        at_step = [share[step] for share in shares]
        assert len(set(at_step)) == min(world_size, num_batches)
    taken = [b for step in range(steps) for b in (share[step] for share in shares)]
    assert taken[:num_batches] == list(range(num_batches))  # every batch once, in the epoch's order
    assert all(0 <= b < num_batches for b in taken)  # the padding repeats batches from the epoch's start


def test_global_position_advances_by_world_size_and_stops_at_the_end():
    position, positions = 0, []
    while position < 10:
        position = advance(position, 10, 3)
        positions.append(position)
    assert positions == [3, 6, 9, 10]


@pytest.mark.parametrize("before, after", [(2, 1), (2, 3), (3, 2), (1, 4)])
def test_a_resume_with_another_number_of_ranks_continues_at_the_first_untrained_batch(before, after):
    num_batches, steps_before = 23, 4
    position, trained = 0, []
    for step in range(steps_before):  # `before` ranks train 4 steps, then stop (a checkpoint saves `position`)
        trained += [rank_batches(num_batches, 0, r, before)[step] for r in range(before)]
        position = advance(position, num_batches, before)
    assert position == steps_before * before
    shares = [rank_batches(num_batches, position, r, after) for r in range(after)]
    for step in range(len(shares[0])):
        trained += [share[step] for share in shares]
    assert trained[:num_batches] == list(range(num_batches))  # no batch skipped, none trained twice


# --- two gloo ranks equal one process on A + B ---------------------------------------------------------------

def tiny_config() -> TrainConfig:
    return TrainConfig(model=ModelConfig(embedding_dim=8, hidden_size=6, dropout=0.0),
                       optim=OptimConfig(lr=0.01, label_smoothing=0.1, clip_grad_norm=1.0))


def tiny_corpus() -> EncodedCorpus:
    rng = np.random.default_rng(5)
    src = [rng.integers(4, 30, size=n).tolist() for n in (3, 5, 2, 7, 4, 6)]
    tgt = [rng.integers(4, 30, size=n).tolist() for n in (4, 2, 6, 3, 8, 5)]
    return EncodedCorpus.from_lists(src, tgt)


BATCH_A, BATCH_B = [0, 1, 2], [3, 4, 5]  # 15 and 19 target tokens: unequal, so averaging per-rank means would be wrong


def fresh_model():
    """A tiny model and plain SGD. Adam would divide each gradient by its own size, so float-level
    differences in the summation order of near-zero gradients would become lr-sized weight differences;
    SGD keeps the comparison about what DDP does: average the gradients."""
    torch.manual_seed(7)
    model = build_model(tiny_config().model, 30, 30)
    return model, torch.optim.SGD(model.parameters(), lr=0.5)


def _rank_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """Leaves the group as nmt-train does (`teardown`): after a barrier, and only once the DDP wrapper, which lives
    in `_rank_steps`, is gone. (Destroying the group under a live wrapper is one suspect for the rare SIGABRT,
    "terminate called without an active exception", that this fixture met in CI.)"""
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    dist = Distributed(rank, world_size, rank, torch.device("cpu"))
    clean = False
    try:
        _rank_steps(dist, out_dir)
        clean = True
    finally:
        teardown(dist, clean)


def _rank_steps(dist: Distributed, out_dir: str) -> None:
    rank = dist.rank
    model, optimizer = fresh_model()
    ddp = wrap_model(model, dist)
    corpus = tiny_corpus()
    first = train_step(ddp, collate(corpus, [BATCH_A, BATCH_B][rank]), optimizer, tiny_config(), dist.device, dist)
    after_first = {k: v.clone() for k, v in model.state_dict().items()}
    # second step: rank 1 alone sees an infinite logit; both ranks must skip the update
    hook = ddp.module.decoder.pre_output.register_forward_hook(lambda m, i, out: out * float("inf")) if rank == 1 else None
    second = train_step(ddp, collate(corpus, [BATCH_A, BATCH_B][rank]), optimizer, tiny_config(), dist.device, dist)
    if hook is not None:
        hook.remove()
    unchanged = all(torch.equal(v, after_first[k]) for k, v in model.state_dict().items())
    # main_first: rank 0 runs the block before the others, and its failure reaches them
    marker = Path(out_dir) / "written-by-rank-0"
    with dist.main_first():
        seen = marker.exists()
        marker.touch()
    try:
        with dist.main_first():
            if rank == 0:
                raise NMTError("the data is bad")
        outcome = "ran"
    except PeerFailed:
        outcome = "peer failed"
    except NMTError:
        outcome = "failed"
    torch.save({"state": after_first, "first": (first.loss, first.tokens, first.status),
                "second": second.status, "unchanged": unchanged, "seen": seen, "outcome": outcome},
               Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_rank_worker, args=(2, str(out / "init"), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_two_ranks_on_a_and_b_equal_one_process_on_a_plus_b(two_rank_results):
    model, optimizer = fresh_model()
    corpus = tiny_corpus()
    single = train_step(model, collate(corpus, BATCH_A + BATCH_B), optimizer, tiny_config(), torch.device("cpu"))
    expected = model.state_dict()
    for result in two_rank_results:
        loss, tokens, status = result["first"]
        assert status == "ok" and tokens == single.tokens == 34
        assert loss == pytest.approx(single.loss, rel=1e-6)  # the mean over both ranks' tokens
        for key, value in result["state"].items():
            torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
    # the step did something, and the ranks hold identical weights
    assert any(not torch.equal(v, fresh_model()[0].state_dict()[k]) for k, v in expected.items())
    for key, value in two_rank_results[0]["state"].items():
        assert torch.equal(value, two_rank_results[1]["state"][key]), key


def test_a_non_finite_loss_on_one_rank_skips_the_update_on_every_rank(two_rank_results):
    assert [r["second"] for r in two_rank_results] == ["nonfinite", "nonfinite"]
    assert all(r["unchanged"] for r in two_rank_results)


def test_rank_0_prepares_first_and_its_failure_stops_the_others_instead_of_hanging(two_rank_results):
    assert [r["seen"] for r in two_rank_results] == [False, True]
    assert [r["outcome"] for r in two_rank_results] == ["failed", "peer failed"]


# --- nmt-train under torchrun ------------------------------------------------------------------------------

def torchrun(*args: str, nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    script = str(Path(sys.executable).parent / "nmt-train")
    return run_cli(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   script, *args, timeout=timeout)


def val_records(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "epoch", "loss", "bleu")} for r in records if r["kind"] == "val"]


@pytest.fixture(scope="module")
def two_rank_run(shared_data_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("torchrun") / "run"
    out = torchrun(*FAST_DEBUG, f"paths.data_dir={shared_data_dir}", f"paths.run_dir={run_dir}")
    assert out.returncode == 0, out.stderr[-4000:]
    return run_dir, out


def test_torchrun_writes_one_run_directory_with_one_set_of_checkpoints(two_rank_run):
    run_dir, out = two_rank_run
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best.pt", "last.pt", "step0.pt"]
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["run"]
    # 500 pairs make 10 batches of 2000 tokens: 5 steps of 2 ranks, one validation, logged once
    assert [r["step"] for r in val_records(run_dir)] == [5]
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert (last["train_state"]["step"], last["train_state"]["epoch"], last["train_state"]["world_size"]) == (5, 1, 2)
    assert len(last["rng"]["ranks"]) == 2
    assert out.stderr.count("training stopped:") == 1  # rank 0 alone logs
    assert (run_dir / "train.log").read_text().count("2 processes (DDP)") == 1
    # the checkpoint holds the plain model: a single process loads it for evaluation
    run = load_trained(run_dir, "best", torch.device("cpu"))
    assert not any(key.startswith("module.") for key in run.model.state_dict())


def test_a_two_rank_run_resumed_by_one_process_continues_at_the_right_global_batch(shared_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    out = torchrun(*FAST_DEBUG, f"paths.data_dir={shared_data_dir}", f"paths.run_dir={run_dir}", "trainer.max_steps=2")
    assert out.returncode == 0, out.stderr[-4000:]
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")["train_state"]
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (2, 0, 4)  # 2 steps of 2 ranks: batches 0-3
    out = run_cli("nmt-train", *FAST_DEBUG, f"paths.data_dir={shared_data_dir}", f"paths.run_dir={run_dir}",
                  "trainer.resume=true")
    assert out.returncode == 0, out.stderr[-4000:]
    assert "continues on 1 process(es) instead of 2: the epoch goes on at its batch 4" in out.stderr
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")["train_state"]
    assert (state["step"], state["epoch"], state["batch_in_epoch"], state["world_size"]) == (2 + 6, 1, 0, 1)


def _segmentation_worker(rank: int, world_size: int, init_file: str, run_dir: str) -> None:
    """Trainer.epoch_corpus on one rank of two, with a real vocabulary and sampler; saves what it returned."""
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        vocab = Vocab.load(Path(run_dir), joint=True)
        src, tgt = [s for s, _ in TINY_PAIRS] * 3, [t for _, t in TINY_PAIRS] * 3
        best = EncodedCorpus.from_lists(vocab.encode(src, "src"), vocab.encode(tgt, "tgt"))
        cfg = TrainConfig()
        cfg.data.subword_alpha = 0.2
        trainer = SimpleNamespace(cfg=cfg, files=RunFiles(Path(run_dir)), state=SimpleNamespace(epoch=0),
                                  dist=Distributed(rank, world_size, rank, torch.device("cpu")), data=SimpleNamespace(train=best),
                                  sampler=SegmentationSampler(best, vocab, cfg.data))
        corpus = Trainer.epoch_corpus(trainer)
        np.savez(Path(run_dir) / f"rank{rank}.npz", src_flat=corpus.src_flat, tgt_flat=corpus.tgt_flat)
    finally:
        torch_dist.destroy_process_group()


def test_every_rank_trains_on_the_segmentation_that_rank0_sampled(tmp_path):
    run_dir = tmp_path / "run"
    src, tgt = [s for s, _ in TINY_PAIRS] * 3, [t for _, t in TINY_PAIRS] * 3
    vocab = Vocab.build(run_dir, src, tgt, VocabConfig(size=60), seed=1)
    mp.spawn(_segmentation_worker, args=(2, str(tmp_path / "init"), str(run_dir)), nprocs=2, join=True)
    saved = load_segmentation(run_dir / "segmentation" / "epoch-0001.npz")
    best = EncodedCorpus.from_lists(vocab.encode(src, "src"), vocab.encode(tgt, "tgt"))
    for rank in range(2):
        with np.load(run_dir / f"rank{rank}.npz") as pieces:
            assert np.array_equal(pieces["src_flat"], saved.src_flat) and np.array_equal(pieces["tgt_flat"], saved.tgt_flat)
    assert not np.array_equal(saved.src_flat, best.src_flat)  # sampled, not the best segmentation


def test_two_ranks_train_on_one_sampled_segmentation_and_a_resume_reads_it_back(shared_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    sampled = [*FAST_DEBUG, f"paths.data_dir={shared_data_dir}", f"paths.run_dir={run_dir}", "data.subword_alpha=0.2"]
    out = torchrun(*sampled, "trainer.max_steps=2")
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stderr.count("segmentation sampled") == 1  # drawn once (that every rank reads it: the test above)
    out = run_cli("nmt-train", *sampled, "trainer.resume=true")
    assert out.returncode == 0, out.stderr[-4000:]
    assert "segmentation sampled" not in out.stderr and "sampled for it before" in out.stderr
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    pieces = load_segmentation(run_dir / "segmentation" / "epoch-0001.npz")
    batches = epoch_batches(pieces, cfg["data"]["batch_tokens"], cfg["data"]["sort_pool"], cfg["trainer"]["seed"], 0)
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")["train_state"]
    assert (state["step"], state["epoch"]) == (2 + len(batches) - 4, 1)  # batches 0-3 by two ranks, the rest by one


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def _rank_pid(torchrun_pid: int, rank: int, timeout: float = 120) -> int:
    """The pid of the worker with RANK=rank under a torchrun process (torchrun's agent starts the workers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = _children(torchrun_pid)
        while pending:
            pid = pending.pop()
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + str(rank).encode() in environ:
                return pid
            pending += _children(pid)
        time.sleep(0.2)
    raise AssertionError(f"no worker with RANK={rank} under {torchrun_pid}")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the worker through /proc")
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step_and_rank0_saves(shared_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    script = str(Path(sys.executable).parent / "nmt-train")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *FAST_DEBUG,
            f"paths.data_dir={shared_data_dir}", f"paths.run_dir={run_dir}", "trainer.max_epochs=8"]
    # 8 epochs of 10 steps: long enough that the signal lands in training even when it is delivered late
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        rank1 = _rank_pid(child.pid, 1)
        deadline = time.monotonic() + 180
        while not (run_dir / "checkpoints" / "step0.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)  # training has started
        time.sleep(1.0)
        os.kill(rank1, signal.SIGTERM)  # rank 1 alone: rank 0 learns of it through the reduced stop flag
        _, stderr = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
    assert "Training stopped by SIGTERM" in stderr and "Resume with: torchrun" in stderr, stderr[-4000:]
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")["train_state"]
    assert 0 < last["step"] < 80 and last["stop_reason"] == "interrupted"
    # resuming (here on one process) finishes the run
    out = run_cli("nmt-train", *FAST_DEBUG, f"paths.data_dir={shared_data_dir}", f"paths.run_dir={run_dir}",
                  "trainer.max_epochs=8", "trainer.resume=true")
    assert out.returncode == 0, out.stderr[-4000:]
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["train_state"]["epoch"] == 8


@pytest.mark.slow
def test_kill_and_resume_under_torchrun_equals_an_uninterrupted_two_rank_run(two_rank_run, shared_data_dir, tmp_path):
    """SIGINT to torchrun mid-run, resume under torchrun: bit-identical to the run that was never stopped
    (each rank gets its own random state back)."""
    reference = tmp_path / "reference"
    extra = ["trainer.max_epochs=2", "trainer.validate_every=3"]
    out = torchrun(*FAST_DEBUG, f"paths.data_dir={shared_data_dir}", f"paths.run_dir={reference}", *extra)
    assert out.returncode == 0, out.stderr[-4000:]
    run_dir = tmp_path / "run"
    script = str(Path(sys.executable).parent / "nmt-train")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *FAST_DEBUG,
            f"paths.data_dir={shared_data_dir}", f"paths.run_dir={run_dir}", *extra]
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / "checkpoints" / "last.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # the first mid-epoch checkpoint (step 3) is written
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
    assert "Training stopped by SIGINT" in stderr, stderr[-4000:]
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["train_state"]["step"] < 10
    out = torchrun(*FAST_DEBUG, f"paths.data_dir={shared_data_dir}", f"paths.run_dir={run_dir}", *extra,
                   "trainer.resume=true")
    assert out.returncode == 0, out.stderr[-4000:]
    resumed, expected = (load_checkpoint(d / "checkpoints" / "last.pt") for d in (run_dir, reference))
    assert resumed["train_state"]["step"] == expected["train_state"]["step"] == 10
    for key, value in expected["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert val_records(run_dir) == val_records(reference)


# --- errors under torchrun: said once ------------------------------------------------------------------------

def test_a_config_error_is_printed_by_rank_0_alone(monkeypatch, capsys):
    for rank, expected in (("1", ""), ("0", "nmt: error: trainer.precision='fp8'")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_info:
            main("train", lambda cfg, cfg_dict: None, ["trainer.precision=fp8"])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.startswith(expected)


def test_an_error_of_one_rank_is_printed_by_that_rank_with_its_number(monkeypatch, capsys):
    def fails(error):
        def task(cfg, cfg_dict):
            raise error
        return task

    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        main("train", fails(NMTError("cannot read the cache")), [])
    assert capsys.readouterr().err == "nmt: error: (rank 1) cannot read the cache\n"
    with pytest.raises(SystemExit) as exit_info:  # every rank stopped alike: rank 0 says it
        main("train", fails(Interrupted("stopped by SIGINT")), [])
    assert exit_info.value.code == 130 and capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as exit_info:  # the shell's status for the signal: 128 + 15
        main("train", fails(Interrupted("stopped by SIGTERM", signal.SIGTERM)), [])
    assert exit_info.value.code == 143 and capsys.readouterr().err == ""


def test_a_repeated_sigterm_does_not_abort_the_save_but_a_second_ctrl_c_does():
    """torchrun forwards the SIGTERM that a cluster manager may also send to the workers directly."""
    trainer = SimpleNamespace(signalled=False, interrupted=0)
    Trainer.on_signal(trainer, signal.SIGTERM, None)
    Trainer.on_signal(trainer, signal.SIGTERM, None)  # ignored: already stopping
    assert trainer.interrupted == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
        Trainer.on_signal(trainer, signal.SIGINT, None)


def test_wrapping_for_ddp_gives_no_deprecation_warning(tmp_path):
    """torch 2.13 deprecated broadcast_buffers; each rank used to print the FutureWarning."""
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        model, _ = fresh_model()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # a one-process group: DDP's constructor is what warned, whatever the number of ranks
            ddp = wrap_model(model, SimpleNamespace(enabled=True, device=torch.device("cpu")))
        assert ddp.module is model
        assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
    finally:
        torch_dist.destroy_process_group()
