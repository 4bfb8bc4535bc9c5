"""Corpus-size benchmark: encoding time, cache size, peak memory while training, time to the first batch.

Builds training corpora of 10k, 100k and 1M pairs by repeating Multi30k's training split with light
perturbation (each copy after the first drops a few words and swaps a neighbouring pair, per side),
then for each size runs `nmt-train experiment=debug` on it twice in a subprocess, with a fresh cache:

  run 1: encodes the corpus into the cache (and trains the SentencePiece model), then trains;
  run 2: a new run directory on the same cache: must log "reusing cache" and not encode.

Memory is measured from outside: the child's ru_maxrss (VmHWM: peak resident set, file-backed pages
of the memory map included) and its peak RssAnon (anonymous memory: what cannot be dropped under
pressure), sampled from /proc every 50 ms. A baseline process holds the same model and Adam
optimizer and runs the same number of steps on random batches without any corpus, to show what
the corpus adds; the model and optimizer themselves are params + grads + 2 Adam moments.

    python scripts/bench_corpus.py --data-dir ../shared/data --out bench_corpus.json
    python scripts/bench_corpus.py --sizes 10000 100000 --steps 50     # quicker

Writes JSON (--out) and prints a markdown table. Timings depend on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
DEBUG_VOCAB = 1000  # data.vocab.size in experiment=debug


# --- corpora ----------------------------------------------------------------------------------------------

def perturb(words: list[str], rng: random.Random) -> list[str]:
    """Drop about one word in ten (never all) and swap one neighbouring pair."""
    kept = [w for w in words if rng.random() > 0.1] or words[:1]
    if len(kept) > 2:
        i = rng.randrange(len(kept) - 1)
        kept[i], kept[i + 1] = kept[i + 1], kept[i]
    return kept


def build_corpus(size: int, multi30k: Path, out: Path, seed: int = 0) -> Path:
    """train.{de,en} of `size` pairs (Multi30k once as is, then perturbed copies) and val.{de,en} (100 pairs)."""
    folder = out / f"corpus-{size}"
    done = folder / "done"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    src = (multi30k / "train.de").read_text(encoding="utf-8").splitlines()
    tgt = (multi30k / "train.en").read_text(encoding="utf-8").splitlines()
    rng = random.Random(seed)
    with open(folder / "train.de", "w", encoding="utf-8") as de, open(folder / "train.en", "w", encoding="utf-8") as en:
        for i in range(size):
            s, t = src[i % len(src)], tgt[i % len(tgt)]
            if i >= len(src):
                s, t = " ".join(perturb(s.split(), rng)), " ".join(perturb(t.split(), rng))
            de.write(s + "\n")
            en.write(t + "\n")
    for lang in ("de", "en"):
        lines = (multi30k / f"val.{lang}").read_text(encoding="utf-8").splitlines()[:100]
        (folder / f"val.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    done.touch()
    return folder


# --- measuring a child process ----------------------------------------------------------------------------

def _status_kb(pid: int, field: str) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else 0


def run_measured(args: list[str], env: dict) -> dict:
    """Run a command; its wall time, exit status, stderr, ru_maxrss and peak RssAnon / RssFile (MB)."""
    started = time.monotonic()
    child = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    peaks = {"RssAnon": 0, "RssFile": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for field in peaks:
                peaks[field] = max(peaks[field], _status_kb(child.pid, field))
            stop.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr_lines = []
    reader = threading.Thread(target=lambda: stderr_lines.extend(child.stderr), daemon=True)
    reader.start()
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    sampler.join()
    reader.join()
    return {"returncode": child.returncode, "wall_s": round(time.monotonic() - started, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "peak_anon_mb": round(peaks["RssAnon"] / 1024, 1),
            "peak_file_mb": round(peaks["RssFile"] / 1024, 1), "stderr": "".join(stderr_lines)}


def train_command(corpus: Path, run_dir: Path, cache_dir: Path, steps: int) -> list[str]:
    return [str(BIN / "nmt-train"), "experiment=debug", "data.dataset=files", "data.src_lang=de", "data.tgt_lang=en",
            f"data.train.src={corpus / 'train.de'}", f"data.train.tgt={corpus / 'train.en'}",
            f"data.val.src={corpus / 'val.de'}", f"data.val.tgt={corpus / 'val.en'}",
            "data.train_limit=0", "data.val_limit=50", "data.vocab.max_sentences=200000",
            f"trainer.max_steps={steps}", "trainer.max_epochs=1000", f"trainer.validate_every={steps}",
            "trainer.device=cpu", f"paths.run_dir={run_dir}", f"paths.cache_dir={cache_dir}"]


def parse_log(run_dir: Path) -> dict:
    text = (run_dir / "train.log").read_text(encoding="utf-8")
    first = re.search(r"first batch ready ([\d.]+) s", text)
    encoded = re.search(r"encoded (\d+) training pairs in ([\d.]+) s \((\d+) process", text)
    pairs = re.search(r"data: (\d+) training pairs", text)
    return {"time_to_first_batch_s": float(first.group(1)) if first else None,
            "encode_s": float(encoded.group(2)) if encoded else None,
            "encode_processes": int(encoded.group(3)) if encoded else None,
            "reused_cache": "reusing cache" in text, "encoded": encoded is not None,
            "training_pairs": int(pairs.group(1)) if pairs else None}


def folder_mb(folder: Path, pattern: str) -> float:
    return round(sum(f.stat().st_size for e in folder.glob(pattern) for f in e.iterdir()) / 1e6, 1)


def bench_size(size: int, multi30k: Path, work: Path, steps: int, env: dict) -> dict:
    corpus = build_corpus(size, multi30k, work)
    cache_dir, runs = work / f"cache-{size}", work / f"runs-{size}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    shutil.rmtree(runs, ignore_errors=True)
    result = {"pairs": size, "corpus_mb": round(sum((corpus / f"train.{l}").stat().st_size for l in ("de", "en")) / 1e6, 1)}
    for name in ("first_run", "second_run"):
        run_dir = runs / name
        measured = run_measured(train_command(corpus, run_dir, cache_dir, steps), env)
        if measured["returncode"] != 0:
            raise SystemExit(f"{name} for {size} pairs failed:\n{measured['stderr'][-3000:]}")
        del measured["stderr"]
        result[name] = {**measured, **parse_log(run_dir)}
    result["cache_mb"] = folder_mb(cache_dir, "train-*")
    result["vocab_cache_mb"] = folder_mb(cache_dir, "vocab-*")
    return result


# --- the baseline: model and optimizer, no corpus -----------------------------------------------------------

def baseline_worker(steps: int) -> None:
    """Run in a child: the debug model and Adam, `steps` steps on random full-length batches of 2000 tokens."""
    import torch

    from nmt.cli import compose_config
    from nmt.model.seq2seq import build_model
    from nmt.train import build_optimizer

    cfg, _ = compose_config("train", ["experiment=debug"])
    torch.manual_seed(0)
    model = build_model(cfg.model, DEBUG_VOCAB, DEBUG_VOCAB)
    optimizer = build_optimizer(model, cfg)
    length = 20
    batch = cfg.data.batch_tokens // (length + 1)
    for _ in range(steps):
        src = torch.randint(4, DEBUG_VOCAB, (batch, length + 1))
        tgt = torch.randint(4, DEBUG_VOCAB, (batch, length + 1))
        every = torch.ones_like(tgt, dtype=torch.bool)
        loss = model(src, torch.full((batch,), length + 1), tgt, every, tgt.flatten()) / tgt.numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"params": params, "model_optimizer_mb": round(params * 4 * 4 / 1e6, 1)}), file=sys.stderr)


def bench_baseline(steps: int, env: dict) -> dict:
    measured = run_measured([sys.executable, __file__, "--baseline-worker", str(steps)], env)
    if measured["returncode"] != 0:
        raise SystemExit(f"the baseline failed:\n{measured['stderr'][-3000:]}")
    return {**json.loads(measured["stderr"].strip().splitlines()[-1]),
            **{k: measured[k] for k in ("peak_rss_mb", "peak_anon_mb", "wall_s")}}


# --- report -----------------------------------------------------------------------------------------------

def table(results: dict) -> str:
    base = results["baseline"]
    mo = base["model_optimizer_mb"]
    rows = ["| pairs | text MB | cache MB | encode s (processes) | 1st run: peak RSS / anon MB | 2nd run: reused cache | "
            "2nd run: peak RSS / anon MB | above baseline (anon) MB | 2nd run: first batch s |",
            "|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in results["sizes"]:
        one, two = r["first_run"], r["second_run"]
        rows.append(f"| {r['pairs']:,} | {r['corpus_mb']} | {r['cache_mb']} | {one['encode_s']} ({one['encode_processes']}) "
                    f"| {one['peak_rss_mb']:.0f} / {one['peak_anon_mb']:.0f} | {'yes' if two['reused_cache'] and not two['encoded'] else 'NO'} "
                    f"| {two['peak_rss_mb']:.0f} / {two['peak_anon_mb']:.0f} | {two['peak_anon_mb'] - base['peak_anon_mb']:+.0f} "
                    f"| {two['time_to_first_batch_s']} |")
    rows.append(f"\nbaseline (model + Adam + {results['steps']} steps, no corpus): peak RSS {base['peak_rss_mb']:.0f} MB, "
                f"anon {base['peak_anon_mb']:.0f} MB; model + optimizer alone {mo} MB ({base['params']:,} parameters).")
    check = results["check"]
    rows.append(f"1M vs 10k, second run, model + optimizer excluded: peak RSS x{check['rss_ratio']:.2f}, "
                f"peak anon x{check['anon_ratio']:.2f} (limit x1.5: {'pass' if check['pass'] else 'FAIL'}).")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"), help="holds multi30k/")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/nmt-bench-corpus"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=100, help="training steps per run")
    parser.add_argument("--out", type=Path, default=Path("bench_corpus.json"))
    parser.add_argument("--baseline-worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_worker is not None:
        return baseline_worker(args.baseline_worker)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    started = time.time()
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
               "load_average_at_start": os.getloadavg(), "steps": args.steps,
               "baseline": bench_baseline(args.steps, env), "sizes": []}
    for size in args.sizes:
        print(f"{size:,} pairs ...", file=sys.stderr, flush=True)
        results["sizes"].append(bench_size(size, args.data_dir / "multi30k", args.work_dir, args.steps, env))
    results["load_average_at_end"] = os.getloadavg()
    results["seconds"] = round(time.time() - started)
    by_size = {r["pairs"]: r["second_run"] for r in results["sizes"]}
    small, large = by_size[min(by_size)], by_size[max(by_size)]
    mo = results["baseline"]["model_optimizer_mb"]
    rss_ratio = (large["peak_rss_mb"] - mo) / (small["peak_rss_mb"] - mo)
    anon_ratio = (large["peak_anon_mb"] - mo) / (small["peak_anon_mb"] - mo)
    results["check"] = {"rss_ratio": round(rss_ratio, 3), "anon_ratio": round(anon_ratio, 3),
                        "pass": rss_ratio <= 1.5 and anon_ratio <= 1.5,
                        "reused": all(r["second_run"]["reused_cache"] and not r["second_run"]["encoded"]
                                      for r in results["sizes"])}
    args.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(table(results))
    print(f"\nload average at start {results['load_average_at_start']}, at end {results['load_average_at_end']}; "
          f"{results['seconds']} s in all; JSON in {args.out}")


if __name__ == "__main__":
    main()
