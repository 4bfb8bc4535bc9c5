#!/usr/bin/env python
"""Training-step time with dense against sparse embedding gradients (model.embeddings.sparse).

Dense: Adam updates every row of both (V, E) embedding tables at every step. Sparse: the tables get
row-sparse gradients and only the rows a batch reads are updated (SparseAdam's lazy rule, in
nmt.optim.SparseDenseAdam). The output layer's (V, E) matrix is dense either way, so the gain is at
most the dense update of the two tables. Batches are synthetic: pieces drawn from a Zipf
distribution, as in text, so a batch reads a small share of a large vocabulary.

    python scripts/bench_sparse.py --vocab-sizes 8000 32000 --json bench_sparse.json

Dense and sparse alternate in rounds, so a machine whose load changes affects both alike; the
table reports medians over all timed steps. Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from nmt.config import EmbeddingConfig, ModelConfig, OptimConfig, TrainConfig
from nmt.data.batching import Batch
from nmt.data.vocab import BOS_ID, EOS_ID
from nmt.model.seq2seq import build_model
from nmt.train import build_optimizer, train_step


def synthetic_batches(vocab_size: int, batch_size: int, length: int, count: int, seed: int) -> list[Batch]:
    """`count` batches of B sentences of `length` pieces, ids Zipf-distributed over the vocabulary."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        ranks = np.minimum(rng.zipf(1.1, size=(batch_size, length)), vocab_size - 4)
        ids = torch.from_numpy(ranks + 3).long()  # ranks 1.. -> ids 4.. (after the special pieces)
        src = torch.cat([ids, torch.full((batch_size, 1), EOS_ID)], dim=1)  # (B, S)
        tgt = ids.flip(1)
        tgt_in = torch.cat([torch.full((batch_size, 1), BOS_ID), tgt], dim=1)  # (B, T)
        tgt_out = torch.cat([tgt, torch.full((batch_size, 1), EOS_ID)], dim=1)  # (B, T)
        batches.append(Batch(src, torch.full((batch_size,), length + 1), tgt_in, tgt_out))
    return batches


class Timed:
    """Wraps an optimizer's step to time it."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer, self.seconds = optimizer, []
        self.step = optimizer.step
        optimizer.step = self

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        result = self.step(*args, **kwargs)
        self.seconds.append(time.perf_counter() - started)
        return result


def setup(vocab_size: int, sparse: bool, args: argparse.Namespace):
    torch.manual_seed(args.seed)
    cfg = TrainConfig(model=ModelConfig(embedding_dim=args.embedding_dim, hidden_size=args.hidden_size, dropout=0.0,
                                        embeddings=EmbeddingConfig(sparse=sparse)),
                      optim=OptimConfig(label_smoothing=0.0))
    model = build_model(cfg.model, vocab_size, vocab_size).train()
    optimizer = build_optimizer(model, cfg)
    return cfg, model, optimizer, Timed(optimizer)


def benchmark(vocab_size: int, args: argparse.Namespace) -> list[dict]:
    batches = synthetic_batches(vocab_size, args.batch_size, args.length, args.warmup + args.steps, args.seed)
    runs = {mode: setup(vocab_size, mode == "sparse", args) for mode in ("dense", "sparse")}
    step_times: dict[str, list[float]] = {mode: [] for mode in runs}
    for mode, (cfg, model, optimizer, _) in runs.items():
        for batch in batches[:args.warmup]:
            train_step(model, batch, optimizer, cfg, torch.device("cpu"))
    for mode in runs:
        runs[mode][3].seconds.clear()
    per_round = max(1, args.steps // args.rounds)
    for start in range(args.warmup, args.warmup + args.steps, per_round):
        for mode, (cfg, model, optimizer, _) in runs.items():
            for batch in batches[start:start + per_round]:
                started = time.perf_counter()
                train_step(model, batch, optimizer, cfg, torch.device("cpu"))
                step_times[mode].append(time.perf_counter() - started)
    rows_read = float(np.mean([len(torch.unique(torch.cat([b.src_ids.flatten(), b.tgt_in.flatten()])))
                               for b in batches]))
    results = []
    for mode, (_, _, _, timed) in runs.items():
        results.append({
            "vocab_size": vocab_size, "mode": mode, "steps": len(step_times[mode]),
            "step_ms_median": 1000 * float(np.median(step_times[mode])),
            "optimizer_ms_median": 1000 * float(np.median(timed.seconds)),
            "rows_read_per_batch": rows_read,
        })
    return results


def table(results: list[dict]) -> str:
    lines = ["| V | gradients | step ms (median) | optimizer.step ms (median) | rows read per batch | speed-up |",
             "|---|---|---|---|---|---|"]
    dense = {r["vocab_size"]: r["step_ms_median"] for r in results if r["mode"] == "dense"}
    for r in results:
        speedup = dense[r["vocab_size"]] / r["step_ms_median"]
        lines.append(f"| {r['vocab_size']:,} | {r['mode']} | {r['step_ms_median']:.1f} "
                     f"| {r['optimizer_ms_median']:.1f} | {r['rows_read_per_batch']:.0f} | {speedup:.2f}× |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[8000, 32000])
    parser.add_argument("--embedding-dim", type=int, default=256)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="sentences per batch")
    parser.add_argument("--length", type=int, default=20, help="pieces per sentence")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="dense and sparse alternate this many times")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [r for vocab_size in args.vocab_sizes for r in benchmark(vocab_size, args)]
    report = {"settings": {k: v for k, v in vars(args).items() if k != "json"},
              "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "results": results}
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
