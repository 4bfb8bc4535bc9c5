#!/usr/bin/env python
"""Joey NMT 2.3.0 on this machine, to put beside scripts/benchmark.py: training speed and beam-5 decoding.

Joey NMT needs its own environment (it pins protobuf < 3.21 and pulls in tensorboard, datasets and
more); install torch first so that pip keeps the CPU build. On today's packages Joey 2.3.0 also needs
importlib_metadata (it imports it without declaring it) and sentencepiece 0.2.0 (0.2.3 no longer has
the SetVocabulary name it calls); this script runs it with torch.load's weights_only check off, which
its checkpoints predate, and with a constant learning rate, since its default plateau scheduler
passes an argument that torch 2.13 no longer takes.

    python -m venv ~/joey
    ~/joey/bin/pip install torch==2.13.0 joeynmt==2.3.0 importlib_metadata sentencepiece==0.2.0
    python scripts/benchmark.py --data-dir ../shared/data --run runs/best --out nmt.json
    python scripts/bench_joey.py --joey-python ~/joey/bin/python --data-dir ../shared/data \
        --spm runs/best/spm.joint.model --nmt-json nmt.json --out joey.json

Joey trains the issue's reference model on Multi30k de→en, one epoch unless --epochs says more:
embeddings 256, a bidirectional GRU encoder of 512, a GRU decoder of 512 with Bahdanau attention
(Joey's defaults otherwise: input feeding, a bridge to the initial state), dropout 0.2, batches of
4,096 tokens, fp32, on the joint SentencePiece vocabulary of the given model (the pieces nmt uses).
It validates (greedy) every --validate-at steps, which writes the checkpoint, and after training
decodes test2016 with beam 5 (alpha 1.0, --decode-batch sentences a batch: 32 by default, Joey's
fastest of 32, 64 and 128 on the Zen 4 host of docs/speed.md; the runs recorded before the option
existed used 64) as its `train` command does. Figures are Joey's own: the target tokens and training
seconds (validation excluded) summed over its epoch summaries, and "Generation took" for test2016.

Beam search runs until the hypotheses end, so its speed depends on the model decoded: on the 2-core
AMX host of docs/speed.md, Joey decoded test2016 with its one-epoch model (BLEU 1.5, long repetitive
hypotheses) at 44-55 sentences/s, with a 5-epoch model at 58-63 and with an 11-epoch one (BLEU 35.6)
at 40-46. The hypotheses' mean length is reported, and pieces/s. For a side by side that means
something, train Joey once for long enough (--epochs; --load-model goes on from a checkpoint of an
earlier run, into another --work-dir; five epochs took about half an hour there), then time its
decoding again with --decode-only, which runs Joey's `test` command on the model already in
--work-dir, alternating with benchmark.py's runs.

Writes JSON (--out) and prints a markdown table; with --nmt-json (benchmark.py's JSON from the same
machine) the table also gives nmt's figures and the ratios. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import sentencepiece
import yaml

EPOCH_SUMMARY = re.compile(r"Epoch\s+\d+, total training loss: \S+, num\. of seqs: (\d+), "
                           r"num\. of tokens: (\d+), ([\d.]+)\[sec\]")
WINDOW = re.compile(r"Tokens per Sec:\s+(\d+)")
GENERATION = re.compile(r"Generation took ([\d.]+)\[sec\]")
BEAM_RESULT = re.compile(r"Evaluation result \(beam search\): bleu:\s+([\d.]+)")
# sentences a batch when Joey decodes test2016: on the Zen 4 host of docs/speed.md Joey's beam search was
# slowest with 128 and a little faster with 32 than with 64 (nmt decodes 128 a batch)
DECODE_BATCH = 32


def joey_config(data_dir: Path, vocab: Path, spm_model: Path, model_dir: Path, validate_at: int,
                epochs: int = 1, load_model: Path | None = None, decode_batch: int = DECODE_BATCH) -> dict:
    side = {"level": "bpe", "tokenizer_type": "sentencepiece", "voc_file": str(vocab),
            "tokenizer_cfg": {"model_file": str(spm_model)}}
    rnn = {"type": "recurrent", "rnn_type": "gru", "hidden_size": 512, "num_layers": 1, "dropout": 0.2,
           "embeddings": {"embedding_dim": 256}}
    return {
        "name": "reference_gru_bahdanau",
        "data": {"train": str(data_dir / "multi30k" / "train"), "dev": str(data_dir / "multi30k" / "val"),
                 "test": str(data_dir / "multi30k" / "test_2016_flickr"), "dataset_type": "plain",
                 "src": {"lang": "de", **side}, "trg": {"lang": "en", **side}},
        "training": {"model_dir": str(model_dir), "overwrite": True, "use_cuda": False, "fp16": False,
                     "random_seed": 42, "optimizer": "adam", "learning_rate": 0.001, "batch_size": 4096,
                     # a constant learning rate (Joey's default plateau scheduler fails on a recent torch)
                     "scheduling": "exponential", "decrease_factor": 1.0,
                     "batch_type": "token", "epochs": epochs, "validation_freq": validate_at, "logging_freq": 25,
                     "eval_metrics": ["bleu"], "early_stopping_metric": "ppl", "keep_best_ckpts": 1,
                     "shuffle": True, "num_workers": 0, "print_valid_sents": [0],
                     **({"load_model": str(load_model)} if load_model else {})},
        "testing": {"beam_size": 5, "beam_alpha": 1.0, "batch_size": decode_batch, "batch_type": "sentence",
                    "eval_metrics": ["bleu"], "sacrebleu_cfg": {"tokenize": "13a"}},
        "model": {"initializer": "xavier_uniform", "tied_embeddings": False, "tied_softmax": False,
                  "encoder": {**rnn, "bidirectional": True},
                  "decoder": {**rnn, "hidden_dropout": 0.2, "input_feeding": True, "init_hidden": "bridge",
                              "attention": "bahdanau"}},
    }


def write_vocab(processor: sentencepiece.SentencePieceProcessor, target: Path) -> int:
    """Joey's vocabulary file: the model's pieces, without its control and unknown pieces (Joey adds its own)."""
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())
              if not (processor.is_control(i) or processor.is_unknown(i))]
    target.write_text("\n".join(pieces) + "\n", encoding="utf-8")
    return len(pieces)


def parse_training(log: str) -> dict:
    """The training figures of Joey's train.log, summed over its epoch summaries."""
    summaries = EPOCH_SUMMARY.findall(log)
    if not summaries:
        raise SystemExit("bench_joey: Joey's log has no epoch summary; see its train.log for what went wrong.")
    sequences, tokens, seconds = (sum(float(s[i]) for s in summaries) for i in range(3))
    return {"train_epochs": len(summaries), "train_sentences": int(sequences), "train_tgt_tokens": int(tokens),
            "train_seconds": seconds, "train_tgt_tokens_per_s": tokens / seconds,
            "window_tgt_tokens_per_s": [int(w) for w in WINDOW.findall(log)]}


def parse_decoding(log: str) -> dict:
    """The beam-5 decoding of test2016 in Joey's train.log or test.log."""
    after_test = log[log.index("Decoding on test set"):]
    return {"beam5_seconds": float(GENERATION.search(after_test)[1]),
            "beam5_bleu": float(BEAM_RESULT.search(after_test)[1])}


def table(joey: dict, nmt: dict | None) -> str:
    """Joey's figures beside nmt's (benchmark.py's JSON) where given, with the ratios."""
    nmt = nmt or {}
    train_bf16 = nmt.get("train_bf16", {}).get("tgt_tokens_per_s")
    rows = [  # label, Joey's figure, nmt's figure or None, format
        ("training, target tok/s: both fp32", joey["train_tgt_tokens_per_s"], nmt.get("train_tgt_tokens_per_s"),
         "{:,.0f}"),
        ("training, target tok/s: nmt bf16 (Joey fp32)", joey["train_tgt_tokens_per_s"], train_bf16, "{:,.0f}"),
        ("beam-5 decoding of test2016, sent/s: both fp32", joey["beam5_sentences_per_s"],
         nmt.get("beam5_sentences_per_s"), "{:.1f}"),
        ("beam-5 decoding, sent/s: nmt bf16 (Joey fp32)", joey["beam5_sentences_per_s"],
         nmt.get("beam5_bf16_sentences_per_s"), "{:.1f}"),
        ("beam-5 decoding, hypothesis pieces/s: both fp32", joey.get("beam5_pieces_per_s"),
         nmt.get("decode_beam5", {}).get("tokens_per_s"), "{:,.0f}"),
        ("peak RSS of the training process, MB", joey.get("peak_rss_mb"), nmt.get("peak_rss_mb"), "{:,.0f}"),
    ]
    lines = ["| | Joey NMT 2.3.0 | nmt | nmt / Joey |", "|---|---:|---:|---:|"]
    for label, joey_value, nmt_value, form in rows:
        if joey_value is None:  # pieces/s in an older JSON; RSS after --decode-only
            continue
        if nmt_value is None:
            lines.append(f"| {label} | {form.format(joey_value)} | – | – |")
        else:
            lines.append(f"| {label} | {form.format(joey_value)} | {form.format(nmt_value)} | "
                         f"{nmt_value / joey_value:.2f}× |")
    beam = nmt.get("decode_beam5", {})
    nmt_bleu, nmt_length = (f"{beam['bleu']:.2f}", f"{beam['mean_output_pieces']:.1f}") if beam else ("–", "–")
    epochs = joey.get("train_epochs", 1)
    resumed = " after --load-model" if joey.get("joey_config", {}).get("training", {}).get("load_model") else ""
    joey_bleu = f"{joey['beam5_bleu']:.2f} ({epochs} epoch{'s' if epochs > 1 else ''}{resumed})"
    lines.append(f"| test2016 BLEU of the decoded model (beam 5) | {joey_bleu} | {nmt_bleu} | |")
    lines.append(f"| mean hypothesis length, pieces | {joey['mean_hypothesis_pieces']:.1f} | {nmt_length} | |")
    return "\n".join(lines)


def run_joey(args: argparse.Namespace) -> dict:
    """Train and decode with Joey as the module docstring says (or, with --decode-only, decode with the model
    already in --work-dir); its figures, read from its own logs."""
    work, data_dir, spm_model = Path(args.work_dir).resolve(), Path(args.data_dir).resolve(), Path(args.spm).resolve()
    for needed in (spm_model, data_dir / "multi30k" / "train.de"):
        if not needed.is_file():
            raise SystemExit(f"bench_joey: {needed} does not exist; check --spm and --data-dir.")
    config_path, model_dir = work / "joey.yaml", work / "model"
    processor = sentencepiece.SentencePieceProcessor(model_file=str(spm_model))
    if args.decode_only:
        if not (model_dir / "train.log").is_file():
            raise SystemExit(f"bench_joey: --decode-only needs a model that this script trained in {work}; "
                             f"run it once without --decode-only (and with --epochs) first.")
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        config["testing"]["batch_size"] = args.decode_batch  # the rest as the model was trained
        config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        command = ["test", str(config_path), "-o", str(model_dir / "decode.hyps")]
        log_name, hyps_name = "test.log", "decode.hyps.test"
        (model_dir / log_name).unlink(missing_ok=True)  # Joey appends to its log
    else:
        work.mkdir(parents=True, exist_ok=True)
        write_vocab(processor, work / "vocab.txt")
        load_model = Path(args.load_model).resolve() if args.load_model else None
        if load_model and model_dir in load_model.parents:
            raise SystemExit(f"bench_joey: --load-model {load_model} lies in the model directory that Joey empties "
                             f"before training; give another --work-dir.")
        config = joey_config(data_dir, work / "vocab.txt", spm_model, model_dir, args.validate_at, args.epochs,
                             load_model, args.decode_batch)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        command = ["train", str(config_path)]
        log_name, hyps_name = "train.log", "best.hyps.test"

    started = time.monotonic()
    with open(work / "joey.out", "w", encoding="utf-8") as out:
        # Joey 2.3.0 predates torch 2.6, whose torch.load refuses its checkpoints by default
        env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
        done = subprocess.run([args.joey_python, "-m", "joeynmt", *command],
                              stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"bench_joey: Joey NMT exited with {done.returncode}; its output is in {work / 'joey.out'}.")
    result = parse_training((model_dir / "train.log").read_text(encoding="utf-8"))
    result.update(parse_decoding((model_dir / log_name).read_text(encoding="utf-8")))
    hypotheses = (model_dir / hyps_name).read_text(encoding="utf-8").splitlines()
    pieces = sum(len(processor.encode(h)) for h in hypotheses) / len(hypotheses)
    result.update({
        "beam5_sentences_per_s": len(hypotheses) / result["beam5_seconds"],
        "beam5_pieces_per_s": len(hypotheses) * pieces / result["beam5_seconds"],
        "mean_hypothesis_pieces": pieces,
        # of the training run, or with --decode-only of the decoding alone
        ("decode_peak_rss_mb" if args.decode_only else "peak_rss_mb"):
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "decode_only": args.decode_only, "wall_seconds": wall, "vocab_pieces": processor.get_piece_size(),
        "joey_config": config,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "python": sys.version.split()[0]},
    })
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--joey-python", help="the python of an environment with joeynmt 2.3.0")
    parser.add_argument("--data-dir", default="data", help="holds multi30k/{train,val,test_2016_flickr}.{de,en}")
    parser.add_argument("--spm", help="a joint SentencePiece model, e.g. RUN/spm.joint.model")
    parser.add_argument("--work-dir", default="joey_bench", help="Joey's config, vocabulary and model dir go here")
    parser.add_argument("--validate-at", type=int, default=150,
                        help="validate every this many steps, which writes the checkpoint; a multiple of 25")
    parser.add_argument("--epochs", type=int, default=1,
                        help="Joey's training epochs; with --load-model, the epoch to train up to (Joey counts on)")
    parser.add_argument("--load-model", default=None,
                        help="go on training from this Joey checkpoint (e.g. an earlier --work-dir's model/latest.ckpt)")
    parser.add_argument("--decode-only", action="store_true",
                        help="train nothing: decode test2016 again with the model in --work-dir")
    parser.add_argument("--decode-batch", type=int, default=DECODE_BATCH,
                        help=f"sentences per beam-search batch (default {DECODE_BATCH})")
    parser.add_argument("--nmt-json", default=None, help="scripts/benchmark.py's JSON from this machine")
    parser.add_argument("--out", default=None, help="write the JSON here")
    parser.add_argument("--report", default=None, help="run nothing: print the table of this script's earlier JSON")
    args = parser.parse_args()
    if args.report:
        result = json.loads(Path(args.report).read_text(encoding="utf-8"))
    elif args.joey_python and args.spm:
        result = run_joey(args)
    else:
        parser.error("give --joey-python and --spm to run Joey, or --report FILE to print an earlier result")
    nmt = json.loads(Path(args.nmt_json).read_text(encoding="utf-8")) if args.nmt_json else None
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(table(result, nmt))
    return 0


if __name__ == "__main__":
    sys.exit(main())
