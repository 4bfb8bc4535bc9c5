"""Faults during training: NaN/Inf losses, a full disk during a checkpoint write, a CPU taken by another
process. Each leaves the last good checkpoint in place and ends with (or logs) a message that says what
to do."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import FAST_DEBUG, run_cli
from nmt.checkpoint import load_checkpoint
from nmt.cli import compose_config
from nmt.config import TrainConfig
from nmt.data.batching import EncodedCorpus, collate
from nmt.model.seq2seq import build_model
from nmt.cpuload import CpuLoad, OtherCpuUse, busy_ticks
from nmt.train import SlowdownWatch, build_optimizer, busy_cpu_warning, train_step

# Runs nmt-train in a subprocess with one function replaced from step `after` on (the patch is the fault).
PATCHED_TRAIN = """
import errno, sys
import nmt.checkpoint, nmt.train
from nmt.cli import train
AFTER = {after}
{patch}
sys.argv = ["nmt-train", *sys.argv[1:]]
train()
"""

NAN_LOSS = """
loss = nmt.train.batch_loss
calls = [0]
def nan_loss(*args, **kwargs):
    value = loss(*args, **kwargs)
    if value.requires_grad:  # training steps only, not the dev loss
        calls[0] += 1
        if calls[0] > AFTER:
            return value * float("nan")
    return value
nmt.train.batch_loss = nan_loss
"""

DISK_FULL = """
save = nmt.checkpoint.torch.save
def save_until_full(state, handle):
    if state["train_state"]["step"] > AFTER and handle.name.endswith("last.pt.tmp"):
        handle.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")
    save(state, handle)
nmt.checkpoint.torch.save = save_until_full
"""

# Every training step from step AFTER on takes 0.3 s longer, as when another process takes the cores.
SLOW_STEPS = """
import time
step = nmt.train.train_step
calls = [0]
def slow_step(*args, **kwargs):
    calls[0] += 1
    if calls[0] > AFTER:
        time.sleep(0.3)
    return step(*args, **kwargs)
nmt.train.train_step = slow_step
"""

# Other processes kept both of 2 cores busy while the trainer started (AFTER is unused).
BUSY_CORES = """
import nmt.cpuload
nmt.cpuload.OtherCpuUse.measure = lambda self: nmt.cpuload.CpuLoad(2.0, 2.0, 2)
"""


def run_patched(patch: str, after: int, data_dir, run_dir, *extra: str):
    code = PATCHED_TRAIN.format(after=after, patch=patch)
    return run_cli(sys.executable, "-c", code, *FAST_DEBUG, f"paths.data_dir={data_dir}",
                   f"paths.run_dir={run_dir}", "trainer.validate_every=4", *extra)


def test_a_nonfinite_loss_skips_the_update():
    cfg = TrainConfig()
    cfg.model.embedding_dim, cfg.model.hidden_size = 8, 6
    model = build_model(cfg.model, 30, 30)
    optimizer = build_optimizer(model, cfg)
    corpus = EncodedCorpus.from_lists([[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14]])
    batch = collate(corpus, [0, 1])
    with torch.no_grad():
        model.output.bias[0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_step(model, batch, optimizer, cfg, torch.device("cpu"))
    assert not result.updated and result.tokens == batch.num_tgt_tokens
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not optimizer.state  # no moment was updated either


def test_nonfinite_losses_in_a_row_stop_training_and_keep_the_checkpoint(shared_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    out = run_patched(NAN_LOSS, 4, shared_data_dir, run_dir, "trainer.max_nonfinite_steps=3")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "update skipped (1 in a row" in out.stderr and "update skipped (3 in a row" in out.stderr
    assert "trainer.max_nonfinite_steps=3" in out.stderr and "lower learning rate" in out.stderr
    last = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert last["train_state"]["step"] == 4
    assert all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(shared_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    out = run_patched(DISK_FULL, 4, shared_data_dir, run_dir)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert "Could not write the checkpoint" in out.stderr and "No space left on device" in out.stderr
    assert "previous checkpoint is untouched" in out.stderr
    folder = run_dir / "checkpoints"
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]  # the torn file is gone
    assert load_checkpoint(folder / "last.pt")["train_state"]["step"] == 4
    # and the run continues from there once there is room again
    resumed = run_cli("nmt-train", *FAST_DEBUG, f"paths.data_dir={shared_data_dir}", f"paths.run_dir={run_dir}",
                      "trainer.validate_every=4", "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 4" in resumed.stderr


@pytest.mark.parametrize("value", ["0", "-1"])
def test_max_nonfinite_steps_must_be_positive(value, capsys):
    with pytest.raises(SystemExit):
        compose_config("train", [f"trainer.max_nonfinite_steps={value}"])
    assert "trainer.max_nonfinite_steps" in capsys.readouterr().err


class _Payload:
    """Unpickling this creates a file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("command", ["nmt-evaluate", "nmt-translate"])
def test_console_scripts_refuse_a_checkpoint_that_would_run_code(debug_run, tmp_path, command):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    good = load_checkpoint(debug_run / "checkpoints" / "best.pt")
    torch.save({**good, "extra": _Payload(marker)}, evil)
    key = "eval.checkpoint" if command == "nmt-evaluate" else "translate.checkpoint"
    out = subprocess.run([command, f"run={debug_run}", f"{key}={evil}"], input="Ein Hund.\n", capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "Refused to load" in out.stderr and str(evil) in out.stderr
    assert not marker.exists()


def test_resume_from_a_truncated_last_checkpoint_falls_back_and_says_so(shared_data_dir, tmp_path):
    run_dir = tmp_path / "run"
    extra = ["trainer.validate_every=4", "trainer.max_steps=8"]
    first = run_cli("nmt-train", *FAST_DEBUG, f"paths.data_dir={shared_data_dir}", f"paths.run_dir={run_dir}", *extra)
    assert first.returncode == 0, first.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.pt"
    assert load_checkpoint(run_dir / "checkpoints" / "last.prev.pt")["train_state"]["step"] == 4
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # a torn write, as from a failing disk
    resumed = run_cli("nmt-train", *FAST_DEBUG, f"paths.data_dir={shared_data_dir}", f"paths.run_dir={run_dir}",
                      "trainer.validate_every=4", "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "truncated or corrupted" in resumed.stderr and "Falling back to the previous checkpoint" in resumed.stderr
    assert "at step 4" in resumed.stderr
    assert load_checkpoint(last)["train_state"]["step"] > 8  # it went on to the end of the epoch


# --- a CPU taken by another process --------------------------------------------------------------------------

def test_slowdown_watch_warns_once_when_an_interval_runs_at_under_a_quarter_of_the_fastest():
    watch = SlowdownWatch()
    assert watch.add(2_000, 1.0) is None  # a slow first interval (warm-up) sets the bar low
    assert watch.add(10_000, 1.0) is None
    assert watch.add(7_000, 1.0) is None  # the ordinary swing of batch lengths and a busy minute
    assert watch.add(2_600, 1.0) is None  # just over a quarter of 10,000
    warning = watch.add(2_000, 1.0)
    assert warning is not None
    assert "2,000 target tokens/s" in warning and "10,000" in warning and "trainer.num_threads=1" in warning
    assert watch.add(500, 1.0) is None  # once per run


def test_slowdown_watch_counts_speed_not_tokens():
    watch = SlowdownWatch()
    assert watch.add(10_000, 1.0) is None
    assert watch.add(1_000, 0.1) is None  # a short interval at the same speed
    assert watch.add(0, 0.0) is None  # nothing measured: no division by zero, no warning


def test_a_training_that_slows_down_says_why(shared_data_dir, tmp_path):
    out = run_patched(SLOW_STEPS, 8, shared_data_dir, tmp_path / "run", "trainer.max_epochs=2", "trainer.log_every=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("training has slowed to") == 1, out.stderr[-3000:]
    assert "Another process is probably using the same CPU cores" in out.stderr
    assert "trainer.num_threads=1" in out.stderr


def test_busy_cpu_warning_needs_a_busy_core_and_more_threads_than_cores_left():
    warning = busy_cpu_warning(CpuLoad(1.2, 3.0, 2), threads=2)
    assert warning is not None
    assert "about 1.2 of the 2 CPU cores" in warning and "2 threads" in warning and "trainer.num_threads=1" in warning
    assert "1 thread." in busy_cpu_warning(CpuLoad(2.0, 3.0, 2), threads=1)  # our core starves the other's team
    assert busy_cpu_warning(CpuLoad(0.7, 3.0, 2), threads=2) is None  # a browser, a daemon: not another training
    assert busy_cpu_warning(CpuLoad(1.4, 3.0, 2), threads=1) is None  # one thread and 1.4 cores: within half a core
    assert busy_cpu_warning(CpuLoad(1.2, 0.4, 2), threads=2) is None  # too short a start to judge
    assert busy_cpu_warning(CpuLoad(6.0, 3.0, 64), threads=8) is None  # a big machine with cores to spare
    assert busy_cpu_warning(CpuLoad(1.0, 3.0, 1), threads=1) is None  # one thread on one core: nothing spins
    assert busy_cpu_warning(None, threads=2) is None  # no /proc/stat


PROC_STAT = """cpu  400 10 200 9000 50 5 5 30 20 0
cpu0 100 10 50 4000 20 2 3 10 20 0
cpu1 300 0 150 5000 30 3 2 20 0 0
intr 123456 0 0
ctxt 987654
"""


def test_busy_ticks_count_user_nice_system_irq_softirq_of_our_cpus_only():
    assert busy_ticks(PROC_STAT, [0]) == 100 + 10 + 50 + 2 + 3  # not idle, iowait, steal, or guest (inside user)
    assert busy_ticks(PROC_STAT, [0, 1]) == 165 + 300 + 150 + 3 + 2
    assert busy_ticks(PROC_STAT, [1, 2]) is None  # a CPU without its line: no partial sum
    assert busy_ticks(PROC_STAT, []) is None


@pytest.mark.skipif(not os.path.exists("/proc/stat") or OtherCpuUse().measure() is None,
                    reason="reads Linux's /proc/stat, outside a container's CPU quota")
def test_other_cpu_use_counts_other_processes_and_not_our_own():
    burn = "import time\nend = time.monotonic() + {}\nwhile time.monotonic() < end: pass"
    burner = subprocess.Popen([sys.executable, "-c", burn.format(3.0)])
    try:
        time.sleep(0.5)  # past the burner's start-up
        probe = OtherCpuUse()
        time.sleep(1.5)
        load = probe.measure()
    finally:
        burner.wait()
    assert load.seconds >= 1.5 and load.others >= 0.6  # one core burnt by another process
    probe = OtherCpuUse()
    exec(burn.format(0.7))  # burnt by this process ...
    subprocess.run([sys.executable, "-c", burn.format(0.7)], check=True)  # ... and by a child it waited for
    assert probe.measure().others < 0.3


# nmt-train with every OtherCpuUse recorded: was torch loaded when it was made, and which one was measured?
RECORD_PROBES = """
import atexit, sys
import nmt.cpuload
probes, torch_loaded, measured = [], [], []
init, measure = nmt.cpuload.OtherCpuUse.__init__, nmt.cpuload.OtherCpuUse.measure
def record(self):
    probes.append(self)
    torch_loaded.append("torch" in sys.modules)
    init(self)
def record_measure(self):
    measured.append(probes.index(self))
    return measure(self)
nmt.cpuload.OtherCpuUse.__init__, nmt.cpuload.OtherCpuUse.measure = record, record_measure
atexit.register(lambda: print("probes made with torch loaded:", torch_loaded, "measured:", measured))
from nmt.cli import train
sys.argv = ["nmt-train", *sys.argv[1:]]
train()
"""


def test_nmt_train_measures_other_cpu_use_from_before_torch_loads(shared_data_dir, tmp_path):
    assert "torch" not in subprocess.run([sys.executable, "-c", "import sys, nmt.cli; print(sorted(sys.modules))"],
                                         capture_output=True, text=True, check=True).stdout
    out = run_cli(sys.executable, "-c", RECORD_PROBES, *FAST_DEBUG, f"paths.data_dir={shared_data_dir}",
                  f"paths.run_dir={tmp_path / 'run'}")
    assert out.returncode == 0, out.stderr[-3000:]
    # one probe, made at the command's start, and the trainer measured it at its first batch
    assert "probes made with torch loaded: [False] measured: [0]" in out.stdout, out.stdout[-2000:]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="the check needs the CPUs of this process (Linux)")
def test_a_training_that_starts_on_busy_cores_says_why(shared_data_dir, tmp_path):
    out = run_patched(BUSY_CORES, 0, shared_data_dir, tmp_path / "run")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("other processes kept about") == 1, out.stderr[-3000:]
    assert "trainer.num_threads=1" in out.stderr and "Troubleshooting" in out.stderr
