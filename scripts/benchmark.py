#!/usr/bin/env python
"""Speed of the reference model, measured in one run so that the ratios hold on a noisy machine.

    python scripts/benchmark.py --data-dir ../shared/data --out benchmark.json [--quick]

The reference model (issue #7): Multi30k de->en, a joint SentencePiece unigram vocabulary of 8k,
embeddings 256, a bidirectional GRU encoder of 512 per direction, a GRU decoder of 512, Bahdanau
attention (512), dropout 0.2, batches of 4,096 target tokens. The script measures:
  - the machine's matmul peak (fp32 and bf16, 2048^3 on a CPU and 8192^3 on a GPU, the best of five runs
    before training and five after); bf16 is skipped, with a note in the JSON and the table, on a CPU
    without bf16 matrix kernels (AVX2 only), where nmt trains in fp32 instead;
  - training throughput in real target tokens per second (padding excluded), for fp32 and bf16 autocast,
    through the trainer's own `train_step`, after a warm-up of 16 steps (20 without --quick) on batches
    outside the timed ones: on a CPU, oneDNN makes a bf16 kernel for each product shape the first time it
    meets it (1-20 ms each), and nmt makes the shapes recur (nmt.precision.row_quantum), so after its first
    steps a run finds most of them made; a shorter warm-up would time that start-up rather than training. The
    timed batches are the epoch's 5th to 28th (6th to 45th), as before the warm-up was lengthened, and both
    precisions get the same warm-up;
  - the model's analytic FLOPs per target token (forward + backward = 3 x forward, from the layer
    sizes and the source/target lengths of the timed batches) and the MFU against the measured peak;
  - greedy and beam-5 decoding of test2016 (sentences/s, output pieces/s and BLEU; beam 5 also with
    bf16 matrix products, eval.precision=bf16) through the same
    `translate_sentences` that nmt-evaluate uses; with --run DIR a trained model is used, otherwise
    the benchmark's barely trained one, whose output lengths are not those of a real model (greedy
    runs to the length limit, beam search may stop after one piece), so only --run gives figures to report;
  - peak RSS of the process.
Like nmt-train, it first has glibc's malloc keep freed memory (trainer.keep_freed_memory).
It writes JSON (--out) and prints a markdown table. --quick finishes within about 3 minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import sacrebleu
import torch

from nmt.cli import TRAIN_KERNELS, limit_kernel_caches
from nmt.config import DecodeConfig, ModelConfig, TrainConfig, VocabConfig
from nmt.data.batching import EncodedCorpus, collate, epoch_batches
from nmt.data.vocab import Vocab
from nmt.data.sources import multi30k_paths
from nmt.decoding import translate_sentences
from nmt.errors import NMTError
from nmt.model.seq2seq import Seq2Seq, build_model
from nmt.precision import Precision, has_bf16_matmul
from nmt.run import load_trained
from nmt.runtime import keep_freed_memory
from nmt.train import build_optimizer, train_step


# the decodings of test2016 that the benchmark times: JSON key, table name, beam size, precision
DECODINGS = (("decode_beam1", "greedy", 1, "fp32"), ("decode_beam5", "beam 5", 5, "fp32"),
             ("decode_beam5_bf16", "beam 5, bf16", 5, "bf16"))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data",
                        help="the data directory holding multi30k/, downloaded there if missing (default: data)")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    parser.add_argument("--quick", action="store_true", help="fewer steps and sentences: about 3 minutes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16 (default: both)")
    parser.add_argument("--run", default=None, help="a trained run directory to decode with (its own vocabulary)")
    parser.add_argument("--output-size", type=int, default=None,
                        help="the deep-output width (model.output_size; default: the embedding size, 256); "
                             "512 gives Joey NMT's output layer and about 66 MFLOP per target token")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "nmt-benchmark"),
                        help="where the 8k SentencePiece model is kept between runs")
    return parser.parse_args()


# --- the machine ----------------------------------------------------------------------------------------------

# the precisions whose matmul peak is measured, and the JSON key of each: peak_fp32_gflops, peak_bf16_gflops
PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    # 2048^3 is enough for a CPU's matrix units; a GPU reaches its peak only on larger products (an H200's
    # bf16: 401 TFLOP/s at 2048^3, 760 at 8192^3), and a low peak would inflate the MFU
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best / 1e9


def measure_peaks_again(result: dict, device: torch.device) -> None:
    """Measure the matmul peaks again (after training) and keep the better of the two measurements.

    On a shared host one measurement can come from a slow minute, and a low peak inflates the MFU; both
    samples stay in the JSON (peak_fp32_gflops_samples, peak_bf16_gflops_samples)."""
    for precision, dtype in PEAK_DTYPES.items():
        key = f"peak_{precision}_gflops"
        if result[key] is not None:
            result[f"{key}_samples"] = [result[key], matmul_peak_gflops(device, dtype)]
            result[key] = max(result[f"{key}_samples"])


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# --- the model's arithmetic -------------------------------------------------------------------------------------

def flops_per_target_token(cfg: ModelConfig, vocab_size: int, batches: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """Analytic training FLOPs per real target token: 2 x multiply-adds x 3 (forward + backward).

    `batches` are (source lengths with eos, target lengths with eos) of the batches timed. Each target
    step attends over its sentence's real source positions; the encoder's work per source token is
    spread over the batch's target tokens.
    """
    E, H = cfg.embedding_dim, cfg.hidden_size
    A = cfg.attention_size or H
    src_tokens = sum(int(s.sum()) for s, _ in batches)
    tgt_tokens = sum(int(t.sum()) for _, t in batches)
    sentences = sum(len(s) for s, _ in batches)
    attended = sum(int((s * t).sum()) for s, t in batches)  # sum over target steps of the source length
    encoder = 2 * 3 * H * E + 2 * H * A  # both directions' GRU input gates, then the key projection, per source token
    recurrent = 2 * 3 * H * H  # both directions' state products, per source token but a sentence's first (zero states)
    O = cfg.output_size or E  # the deep-output width
    decoder = 3 * H * (E + 2 * H) + 3 * H * H + H * A + (H + 2 * H + E) * O + O * vocab_size  # per target token
    attention = A + 2 * H  # per (target step, source position): v . tanh(.) and the weighted sum of states
    bridge = 2 * H * H  # per sentence
    macs = (encoder * src_tokens + recurrent * (src_tokens - sentences) + decoder * tgt_tokens + attention * attended
            + bridge * sentences) / tgt_tokens
    return {"flops_per_tgt_token": 3 * 2 * macs, "src_per_tgt_token": src_tokens / tgt_tokens,
            "attended_per_tgt_token": attended / tgt_tokens}


# --- training and decoding ---------------------------------------------------------------------------------------

def measure_training(model: Seq2Seq, corpus: EncodedCorpus, cfg: TrainConfig, device: torch.device, precision: str,
                     warmup: list[list[int]], timed: list[list[int]]) -> dict:
    optimizer = build_optimizer(model, cfg)
    mixed = Precision(precision, device)  # trainer.precision: autocast (and a scaler for fp16)
    model.train()
    for indices in warmup:
        train_step(model, collate(corpus, indices), optimizer, cfg, device, precision=mixed)
    tokens, losses = 0, []
    synchronize(device)
    started = time.perf_counter()
    for indices in timed:
        result = train_step(model, collate(corpus, indices), optimizer, cfg, device, precision=mixed)
        tokens += result.tokens
        losses.append(result.loss)
    synchronize(device)
    seconds = time.perf_counter() - started
    steps = len(timed)
    return {"tgt_tokens_per_s": tokens / seconds, "steps": steps, "warmup_steps": len(warmup), "seconds": seconds,
            "tgt_tokens_per_step": tokens / steps, "last_loss": losses[-1]}


def measure_decoding(model: Seq2Seq, vocab: Vocab, sources: list[str], references: list[str], device: torch.device,
                     beam_size: int, precision: str = "fp32") -> dict:
    cfg = DecodeConfig(beam_size=beam_size, alpha=1.0 if beam_size > 1 else 0.0, precision=precision)
    translate_sentences(model, vocab, sources[:cfg.batch_size], cfg, device)  # warm-up: one batch
    synchronize(device)
    started = time.perf_counter()
    translations = translate_sentences(model, vocab, sources, cfg, device)
    synchronize(device)
    seconds = time.perf_counter() - started
    pieces = sum(len(t.tgt_pieces) for t in translations)
    bleu = sacrebleu.corpus_bleu([t.text for t in translations], [references]).score
    return {"sentences_per_s": len(sources) / seconds, "tokens_per_s": pieces / seconds,
            "sentences": len(sources), "mean_output_pieces": pieces / len(sources), "bleu": bleu,
            "batch_size": cfg.batch_size}


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def main() -> int:
    args = parse_args()
    limit_kernel_caches(TRAIN_KERNELS)  # as nmt-train does: oneDNN's bf16 kernel caches, bounded
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    kept = keep_freed_memory()  # as nmt-train does by default (trainer.keep_freed_memory)
    try:  # as nmt-train does: download into the data directory on first use, else a clear error
        train, test = (multi30k_paths(Path(args.data_dir), stem, "de", "en") for stem in ("train", "test_2016_flickr"))
    except NMTError as error:
        print(f"benchmark: error: {error} (here: --data-dir)", file=sys.stderr)
        return 2
    trained = None
    if args.run:  # loaded before the minutes of measuring, so that a wrong --run ends the script at once
        try:
            trained = load_trained(args.run, "best", device)
        except NMTError as error:
            print(f"benchmark: error: {error} (here: --run)", file=sys.stderr)
            return 2
    first, steps, settle, decode_count = (4, 24, 12, 500) if args.quick else (5, 40, 15, 1000)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    result: dict = {"machine": {"platform": platform.platform(), "processor": cpu_name(),
                                "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device),
                                "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None},
                    "quick": args.quick, "keep_freed_memory": kept,
                    "output_size": args.output_size or ModelConfig().embedding_dim}

    print("matmul peak ...", file=sys.stderr, flush=True)
    bf16 = has_bf16_matmul(device)
    for precision, dtype in PEAK_DTYPES.items():
        measured = precision == "fp32" or bf16
        result[f"peak_{precision}_gflops"] = matmul_peak_gflops(device, dtype) if measured else None
    if not bf16:  # emulated bf16 would take the quick run far past its 3 minutes, and nmt-train falls back to fp32
        result["bf16_skipped"] = (f"this {'CPU' if device.type == 'cpu' else 'device'} has no fast bf16 matrix "
                                  f"kernels (on a CPU they need AVX-512 or AMX); nmt runs fp32 instead")
        print(f"bf16 skipped: {result['bf16_skipped']}", file=sys.stderr, flush=True)
        precisions = [p for p in precisions if p != "bf16"]

    print("vocabulary and data ...", file=sys.stderr, flush=True)
    train_src, train_tgt = read_lines(train.src), read_lines(train.tgt)
    vocab = Vocab.build(Path(args.cache_dir) / "multi30k_de_en_unigram8k", train_src, train_tgt,
                        VocabConfig(size=8000), seed=1)
    corpus = EncodedCorpus.from_lists(vocab.encode(train_src, "src"), vocab.encode(train_tgt, "tgt"))
    cfg = TrainConfig()  # the defaults are the reference model: gru_base sizes, dropout 0.2, Adam, 4,096 tokens
    cfg.trainer.device = args.device
    cfg.model.output_size = args.output_size
    batches = epoch_batches(corpus, cfg.data.batch_tokens, cfg.data.sort_pool, seed=1, epoch=0)
    timed = batches[first:first + steps]
    warmup = batches[first + steps:first + steps + settle] + batches[:first]  # the warm-up: none of the timed batches
    lengths = [(corpus.src_lens[b] + 1, corpus.tgt_lens[b] + 1) for b in timed]
    result.update(flops_per_target_token(cfg.model, vocab.size("tgt"), lengths))

    model = None
    for precision in precisions:
        print(f"training, {precision} ...", file=sys.stderr, flush=True)
        torch.manual_seed(1)
        model = build_model(cfg.model, vocab.size("src"), vocab.size("tgt")).to(device)
        result[f"train_{precision}"] = measure_training(model, corpus, cfg, device, precision, warmup, timed)
    if precisions:
        print("matmul peak, again ...", file=sys.stderr, flush=True)
        measure_peaks_again(result, device)
    for precision in precisions:
        peak = result[f"peak_{precision}_gflops"]
        measured = result[f"train_{precision}"]
        measured["mfu"] = measured["tgt_tokens_per_s"] * result["flops_per_tgt_token"] / (peak * 1e9)
    if "fp32" in precisions:
        result["train_tgt_tokens_per_s"] = result["train_fp32"]["tgt_tokens_per_s"]
        result["mfu"] = result["train_fp32"]["mfu"]
    if "fp32" in precisions and "bf16" in precisions:
        result["bf16_speedup"] = result["train_bf16"]["tgt_tokens_per_s"] / result["train_fp32"]["tgt_tokens_per_s"]

    test_sources, test_references = read_lines(test.src)[:decode_count], read_lines(test.tgt)[:decode_count]
    if trained:
        decode_model, decode_vocab, result["decode_model"] = trained.model, trained.vocab, f"{args.run} (best)"
    else:
        decode_model, decode_vocab = model, vocab
        result["decode_model"] = (f"the benchmark's model after {len(warmup) + steps} steps: untrained, so greedy runs to "
                                  f"the length limit and beam search may stop after one piece; pass --run DIR of a "
                                  f"trained run for representative decoding figures")
    for key, name, beam, precision in DECODINGS:
        if precision == "bf16" and not bf16:
            continue
        print(f"decoding, {name} ...", file=sys.stderr, flush=True)
        with torch.no_grad():
            result[key] = measure_decoding(decode_model, decode_vocab, test_sources, test_references, device, beam,
                                           precision)
    result["greedy_sentences_per_s"] = result["decode_beam1"]["sentences_per_s"]
    result["beam5_sentences_per_s"] = result["decode_beam5"]["sentences_per_s"]
    result["beam5_bf16_sentences_per_s"] = result["decode_beam5_bf16"]["sentences_per_s"] if bf16 else None
    result["peak_rss_mb"] = peak_rss_mb()

    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(table(result))
    return 0


def table(r: dict) -> str:
    bf16_peak = "–" if r["peak_bf16_gflops"] is None else f"{r['peak_bf16_gflops']:.0f}"
    rows = [("matmul peak fp32 / bf16", f"{r['peak_fp32_gflops']:.0f} / {bf16_peak} GFLOP/s"),
            ("FLOPs per target token (train)", f"{r['flops_per_tgt_token'] / 1e6:.1f} MFLOP "
                                               f"(deep output {r['output_size']} wide)")]
    for precision in ("fp32", "bf16"):
        if f"train_{precision}" in r:
            t = r[f"train_{precision}"]
            rows.append((f"training {precision}", f"{t['tgt_tokens_per_s']:,.0f} target tok/s, MFU {t['mfu']:.1%} "
                                                 f"({t['steps']} steps, {t['tgt_tokens_per_step']:,.0f} tok/step)"))
    if "bf16_speedup" in r:
        rows.append(("bf16 / fp32 training speed", f"{r['bf16_speedup']:.2f}x"))
    if "bf16_skipped" in r:
        rows.append(("bf16", f"not measured: {r['bf16_skipped']}"))
    for key, name, _, _ in DECODINGS:
        if key not in r:
            continue
        d = r[key]
        rows.append((f"{name} decoding, test2016", f"{d['sentences_per_s']:.0f} sent/s, {d['tokens_per_s']:,.0f} tok/s "
                                                   f"({d['sentences']} sentences, {d['mean_output_pieces']:.1f} pieces "
                                                   f"each), BLEU {d['bleu']:.2f}"))
    rows.append(("decoded with", r["decode_model"]))
    rows.append(("peak RSS", f"{r['peak_rss_mb']:,.0f} MB"))
    machine = r["machine"]
    header = (f"{machine['gpu'] or machine['processor']}, {machine['threads']} threads, torch {machine['torch']}"
              f"{', quick' if r['quick'] else ''}")
    lines = [f"| {header} | |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
