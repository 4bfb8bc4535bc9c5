"""Precision and compile benchmark: training speed of the base model, and dev BLEU of short runs.

Speed: the base model (model=gru_base: E 256, H 512; `--decoder-layers` sets its decoder's depth) with
8,000-piece vocabularies trains on random full-length batches (every sentence `--length` pieces,
`--batch-tokens` tokens a batch) through nmt.train.train_step, exactly as the trainer runs it. All
variants live in one child process and take turns, one step each per round, so that load from other
processes slows them alike; after `--warmup` steps each (which include compilation), `--steps` rounds
are timed and the median step gives target tokens per second (the fastest step is reported too).
Variants: fp32, bf16 and fp16 (autocast; fp16 with a gradient scaler; very slow on a CPU, so only by
name), and, by name, fp32 / bf16 with trainer.compile (the decoder step compiled). Compiling needs
`--decoder-layers 2` or more: a one-layer decoder trains through its fused recurrence, which never calls
the compiled step.

Quality: `nmt-train experiment=debug` (6,000 Multi30k pairs, 3 epochs) once per variant of
`--bleu-variants`, with the same decoder depth; the best dev BLEU (greedy, 200 dev sentences) and
the wall time of each run.

    python scripts/bench_precision.py --data-dir ../shared/data --out bench_precision.json
    python scripts/bench_precision.py --device cuda --variants fp32 bf16 fp16 --no-bleu     # on a GPU
    python scripts/bench_precision.py --decoder-layers 2 --variants fp32 fp32+compile --bleu-variants fp32 fp32+compile

Writes JSON (--out) and prints a markdown table. Timings depend on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
VARIANTS = {  # name: (trainer.precision, trainer.compile)
    "fp32": ("fp32", False),
    "bf16": ("bf16", False),
    "fp16": ("fp16", False),
    "fp32+compile": ("fp32", True),
    "bf16+compile": ("bf16", True),
}
VOCAB = 8000


def speed_worker(variants: list[str], device_name: str, length: int, batch_tokens: int, warmup: int,
                 rounds: int, decoder_layers: int) -> None:
    """Runs in a child process: prints one JSON line per variant with its step times and tokens per second.

    All variants live in this one process and take turns, one step each per round (in a rotating
    order), so that load from other processes on the machine slows them alike; the median step
    is reported, and the fastest.
    """
    import statistics

    import numpy as np
    import torch
    import torch._dynamo

    from nmt.cli import TRAIN_KERNELS, compose_config, limit_kernel_caches
    from nmt.data.batching import EncodedCorpus, collate
    from nmt.model.seq2seq import build_model
    from nmt.precision import Precision, compile_decoder_step
    from nmt.train import build_optimizer, train_step

    limit_kernel_caches(TRAIN_KERNELS)  # as nmt-train does, before the first bf16 kernel is built
    torch._dynamo.config.cache_size_limit = 64  # several compiled models of one class in one process
    device = torch.device(device_name)
    rows = batch_tokens // (length + 1)  # +1: eos / bos
    rng = np.random.default_rng(0)
    setups = {}
    for variant in variants:
        precision_name, compiled = VARIANTS[variant]
        cfg, _ = compose_config("train", ["model=gru_base", f"trainer.precision={precision_name}",
                                          f"model.decoder_layers={decoder_layers}"])
        torch.manual_seed(0)
        model = build_model(cfg.model, VOCAB, VOCAB).to(device)
        if compiled and not compile_decoder_step(model):
            raise SystemExit("compile unavailable")
        setups[variant] = (cfg, model, build_optimizer(model, cfg), Precision(precision_name, device))

    def step(variant: str) -> tuple[float, int]:
        cfg, model, optimizer, precision = setups[variant]
        ids = rng.integers(4, VOCAB, size=(2, rows, length)).tolist()
        batch = collate(EncodedCorpus.from_lists(ids[0], ids[1]), range(rows))
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        result = train_step(model, batch, optimizer, cfg, device, precision=precision)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started, result.tokens

    warmup_s = {v: sum(step(v)[0] for _ in range(warmup)) for v in variants}  # compiles here
    times: dict[str, list[float]] = {v: [] for v in variants}
    tokens = 0
    for round_index in range(rounds):
        order = variants[round_index % len(variants):] + variants[:round_index % len(variants)]
        for variant in order:
            seconds, tokens = step(variant)
            times[variant].append(seconds)
    for variant in variants:
        median, best = statistics.median(times[variant]), min(times[variant])
        print(json.dumps({"variant": variant, "tgt_tokens_per_s": round(tokens / median, 1),
                          "best_tgt_tokens_per_s": round(tokens / best, 1), "step_s": [round(t, 2) for t in times[variant]],
                          "warmup_s": round(warmup_s[variant], 1), "batch": [rows, length + 1],
                          "threads": torch.get_num_threads(),
                          "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None}))


def bench_speed(args) -> list[dict]:
    out = subprocess.run([sys.executable, __file__, "--speed-worker", *args.variants, "--device", args.device,
                          "--length", str(args.length), "--batch-tokens", str(args.batch_tokens),
                          "--warmup", str(args.warmup), "--steps", str(args.steps),
                          "--decoder-layers", str(args.decoder_layers)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode != 0:
        raise SystemExit(f"the speed measurement failed:\n{out.stderr[-3000:]}")
    return [json.loads(line) for line in out.stdout.strip().splitlines() if line.startswith("{")]


def bench_bleu(variant: str, args) -> dict:
    precision, compiled = VARIANTS[variant]
    run_dir = args.work_dir / f"debug-{variant}"
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.monotonic()
    out = subprocess.run([str(BIN / "nmt-train"), "experiment=debug", f"paths.data_dir={args.data_dir}",
                          f"paths.run_dir={run_dir}", f"trainer.device={args.device}",
                          f"trainer.precision={precision}", f"trainer.compile={str(compiled).lower()}",
                          f"model.decoder_layers={args.decoder_layers}"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.monotonic() - started
    if out.returncode != 0:
        return {"variant": variant, "error": out.stderr.strip().splitlines()[-1]}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["kind"] == "val"]
    return {"variant": variant, "best_dev_bleu": round(max(r["bleu"] for r in val), 2),
            "last_dev_loss": round(val[-1]["loss"], 3), "wall_s": round(wall, 1)}


def table(results: dict) -> str:
    speed = {r["variant"]: r for r in results["speed"]}
    bleu = {r["variant"]: r for r in results["bleu"]}
    fp32 = speed.get("fp32", {}).get("tgt_tokens_per_s")
    rows = ["| variant | target tok/s, median step (base model) | vs fp32 | fastest step tok/s | warmup s (incl. compile) "
            "| debug run: best dev BLEU | debug run: last dev loss | debug run: wall s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for variant in dict.fromkeys(results["variants"] + [b["variant"] for b in results["bleu"]]):
        s, b = speed.get(variant, {}), bleu.get(variant, {})
        tps = s.get("tgt_tokens_per_s")
        rows.append(f"| {variant} | {tps if tps else s.get('error', '-')} | "
                    f"{f'x{tps / fp32:.2f}' if tps and fp32 else '-'} | {s.get('best_tgt_tokens_per_s', '-')} | "
                    f"{s.get('warmup_s', '-')} | "
                    f"{b.get('best_dev_bleu', b.get('error', '-'))} | {b.get('last_dev_loss', '-')} | {b.get('wall_s', '-')} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/nmt-bench-precision"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", nargs="+", default=["fp32", "bf16"],
                        choices=list(VARIANTS), help="fp16 on a CPU is very slow: add it by name")
    parser.add_argument("--bleu-variants", nargs="+", default=["fp32", "bf16", "fp16"],
                        choices=list(VARIANTS))
    parser.add_argument("--decoder-layers", type=int, default=1,
                        help="model.decoder_layers; the compile variants need 2 or more")
    parser.add_argument("--no-bleu", action="store_true")
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--length", type=int, default=31, help="pieces per sentence (plus eos)")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="measured steps per variant (rounds)")
    parser.add_argument("--out", type=Path, default=Path("bench_precision.json"))
    parser.add_argument("--speed-worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.speed_worker:
        return speed_worker(args.speed_worker, args.device, args.length, args.batch_tokens, args.warmup, args.steps,
                            args.decoder_layers)
    if args.decoder_layers == 1 and any(VARIANTS[v][1] for v in args.variants + args.bleu_variants):
        parser.error("the compile variants need --decoder-layers 2 or more: a one-layer decoder trains through its "
                     "fused recurrence, which never calls the compiled step (nmt-train says so and runs eagerly)")
    import torch

    from nmt.precision import has_bf16_matmul

    if not has_bf16_matmul(torch.device(args.device)):  # nmt would run them as fp32: nothing to compare
        print(f"bf16 variants skipped: {args.device} has no fast bf16 matrix kernels (on a CPU they need AVX-512 or "
              f"AMX), and nmt-train runs fp32 there instead", file=sys.stderr)
        args.variants, args.bleu_variants = ([v for v in names if VARIANTS[v][0] != "bf16"]
                                             for names in (args.variants, args.bleu_variants))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}", "device": args.device,
               "load_average_at_start": os.getloadavg(), "variants": args.variants,
               "decoder_layers": args.decoder_layers, "speed": [], "bleu": []}
    if not args.no_speed:
        print(f"speed: {', '.join(args.variants)} ...", file=sys.stderr, flush=True)
        results["speed"] = bench_speed(args)
    for variant in [] if args.no_bleu else args.bleu_variants:
        print(f"debug run: {variant} ...", file=sys.stderr, flush=True)
        results["bleu"].append(bench_bleu(variant, args))
    results["load_average_at_end"] = os.getloadavg()
    results["seconds"] = round(time.time() - started)
    args.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(table(results))
    print(f"\n{results['device']}; load average at start {results['load_average_at_start']}, at end "
          f"{results['load_average_at_end']}; {results['seconds']} s in all; JSON in {args.out}")


if __name__ == "__main__":
    main()
