#!/usr/bin/env python
"""Kill a training run with SIGKILL at random moments, resume it each time, and compare the result with
an uninterrupted run of the same config, tensor by tensor.

    python scripts/chaos_resume.py --data-dir ../shared/data --kills 5 --out chaos.json

The run is `nmt-train experiment=debug` (plus any overrides given after `--`). One kill is aimed at a
write of checkpoints/last.pt that replaces an earlier one: the script watches for the temporary file
that `save_checkpoint` writes and kills the moment it appears, so the resume must start from the last.pt
before it. The others land at random times within what is left of the run (the
reference run's duration times the share of its steps still to train). A run that still ends before
its kill is started again from scratch, and the kills are counted anew, so that the reported kills
are those the final result lived through. After the last kill the run is resumed to the end, then the
final "model" tensors of checkpoints/last.pt and best.pt are compared with torch.equal.
Exit status: 0 when every tensor is equal, 1 otherwise, 2 when a run failed or kept ending first.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nmt.checkpoint import load_checkpoint


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data", help="paths.data_dir for the runs (default: data)")
    parser.add_argument("--kills", type=int, default=5, help="how many times to SIGKILL the run (default: 5)")
    parser.add_argument("--seed", type=int, default=None, help="seed for the kill times (default: random)")
    parser.add_argument("--workdir", default=None, help="where the two runs go (default: a temporary directory)")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    parser.add_argument("overrides", nargs="*", help="extra nmt-train overrides (put them after --)")
    return parser.parse_args()


def train_command(data_dir: str, run_dir: Path, overrides: list[str], resume: bool) -> list[str]:
    command = [shutil.which("nmt-train") or "nmt-train", "experiment=debug", "trainer.device=cpu",
               f"paths.data_dir={data_dir}", f"paths.run_dir={run_dir}", *overrides]
    return command + (["trainer.resume=true"] if resume else [])


def start(command: list[str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 - closed when the process is reaped
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def checkpoint_being_written(run_dir: Path) -> str | None:
    """The name of the checkpoint whose temporary file exists right now (".last.pt.tmp" -> "last.pt")."""
    folder = run_dir / "checkpoints"
    try:
        names = [p.name for p in folder.iterdir()]
    except FileNotFoundError:
        return None
    return next((n[1:-4] for n in names if n.startswith(".") and n.endswith(".pt.tmp")), None)


def saved_step(run_dir: Path) -> int | None:
    """The step of checkpoints/last.pt (or of last.prev.pt, where a resume would fall back), if any."""
    for name in ("last.pt", "last.prev.pt"):
        path = run_dir / "checkpoints" / name
        try:
            return load_checkpoint(path)["train_state"]["step"]
        except Exception:  # noqa: BLE001 - missing or torn: try the fallback
            continue
    return None


AIMED_AT = "last.pt"  # the checkpoint whose write the aimed kill tears, when an earlier one stands


def kill_after(process: subprocess.Popen, run_dir: Path, delay: float, at_checkpoint_write: bool) -> str:
    """Wait `delay` seconds (or for a write of AIMED_AT over an earlier one to begin) and SIGKILL the process group.

    Returns what happened: "killed", "killed while writing last.pt", or "finished" when the run
    ended on its own first.
    """
    deadline = time.monotonic() + delay
    while process.poll() is None:
        writing = checkpoint_being_written(run_dir) if at_checkpoint_write else None
        if writing == AIMED_AT and (run_dir / "checkpoints" / AIMED_AT).exists():
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return f"killed while writing {writing}"
        if not at_checkpoint_write and time.monotonic() >= deadline:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return "killed"
        time.sleep(0.002 if at_checkpoint_write else 0.02)
    return "finished"


def compare(reference: Path, chaos: Path) -> dict[str, dict]:
    result = {}
    for name in ("last", "best"):
        a, b = (load_checkpoint(run / "checkpoints" / f"{name}.pt") for run in (reference, chaos))
        # under trainer.ema_decay, "model" is the moving average and "training_model" the weights that train
        for part in ("model", "training_model"):
            if part not in a and part not in b:
                continue
            x, y = a.get(part, {}), b.get(part, {})
            different = sorted(k for k in x if k not in y or not torch.equal(x[k], y[k]))
            key = name if part == "model" else f"{name} ({part})"
            result[key] = {"tensors": len(x), "different": different, "equal": not different and x.keys() == y.keys()}
    return result


def main() -> int:
    args = parse_args()
    rng = random.Random(args.seed)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="nmt-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    reference, chaos = workdir / "reference", workdir / "chaos"
    for folder in (reference, chaos):
        if folder.exists():
            shutil.rmtree(folder)

    print(f"reference run (uninterrupted): {reference}", flush=True)
    started = time.monotonic()
    done = subprocess.run(train_command(args.data_dir, reference, args.overrides, False),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return 2
    reference_seconds = time.monotonic() - started
    total_steps = saved_step(reference)
    print(f"  finished in {reference_seconds:.1f} s, {total_steps} steps", flush=True)

    # One kill, chosen at random among the N, waits for a write of last.pt; the others fire at a random
    # time within the part of the run that is left.
    aimed = rng.randrange(args.kills) if args.kills else -1
    events, log_path = [], workdir / "chaos.log"
    killed, step, restarts = 0, None, 0
    while killed < args.kills:
        at_write = killed == aimed
        left = 1 - (step or 0) / max(1, total_steps)
        delay = rng.uniform(0.5, max(1.0, reference_seconds * left))
        process = start(train_command(args.data_dir, chaos, args.overrides, killed > 0), log_path)
        outcome = kill_after(process, chaos, delay, at_write)
        if outcome == "finished":
            if process.returncode != 0:
                print(f"the run failed (exit {process.returncode}); see {log_path}", file=sys.stderr)
                return 2
            # It ended before the kill: start again from scratch, and count the kills anew, so that
            # the kills reported are the ones the final run lived through.
            restarts += 1
            if restarts > 5:
                print("the run ended before its kill 6 times; is the machine much faster or slower than during "
                      "the reference run?", file=sys.stderr)
                return 2
            shutil.rmtree(chaos)
            killed, step = 0, None
            events.append({"outcome": "finished before the kill; restarted from scratch", "delay_s": round(delay, 2)})
            print(f"the run finished before its kill at {delay:.1f} s; starting it again from scratch, "
                  f"with the kills counted anew", flush=True)
            continue
        killed += 1
        step = saved_step(chaos)
        events.append({"outcome": outcome, "delay_s": None if at_write else round(delay, 2),
                       "resumable_from_step": step})
        where = outcome.replace("killed ", "") if at_write else f"after {delay:.1f} s"
        print(f"kill {killed}: SIGKILL {where}; "
              f"resumes from step {step if step is not None else 0}", flush=True)

    process = start(train_command(args.data_dir, chaos, args.overrides, True), log_path)
    if process.wait() != 0:
        print(f"the final resume failed (exit {process.returncode}); see {log_path}", file=sys.stderr)
        return 2
    comparison = compare(reference, chaos)
    equal = all(c["equal"] for c in comparison.values())
    result = {"kills": killed, "restarts": restarts, "events": events, "reference_seconds": round(reference_seconds, 1),
              "overrides": ["experiment=debug", *args.overrides], "checkpoints": comparison, "all_equal": equal}
    print(f"survived {killed} SIGKILLs; final 'model' tensors equal to the uninterrupted run: "
          f"{'yes, all ' + str(comparison['last']['tensors']) if equal else 'NO'} "
          f"(last.pt: {comparison['last']['equal']}, best.pt: {comparison['best']['equal']})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not args.keep and not args.workdir:
        shutil.rmtree(workdir)
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
