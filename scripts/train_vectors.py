#!/usr/bin/env python
"""Train piece vectors with skip-gram and negative sampling (word2vec, Mikolov et al. 2013) on the
SentencePiece-encoded training data, and write them in word2vec format, keyed by pieces.

The vectors load with model.embeddings.src_vectors / tgt_vectors, so pretrained initialisation and
freezing can be tried without downloading anything:

    python scripts/train_vectors.py --side src --out vectors.de.txt experiment=debug paths.data_dir=../shared/data
    nmt-train experiment=debug paths.data_dir=../shared/data model.embeddings.src_vectors=vectors.de.txt \\
        model.embeddings.freeze=src

The trailing key=value arguments are nmt-train overrides: the script reads the same training data
and trains the same SentencePiece model as nmt-train would with them (training it is deterministic),
so the pieces match the run's. `--run DIR` uses a finished run's data settings and SentencePiece
model instead. `--dim` defaults to the config's model.embedding_dim.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from nmt.cli import compose_config, fail
from nmt.config import TrainConfig
from nmt.console import setup_logging
from nmt.data.pipeline import prepare_training_data
from nmt.data.vocab import SPECIAL_IDS
from nmt.errors import NMTError
from nmt.model.vectors import write_vectors
from nmt.run import RunFiles, prepare_output_file, read_config

log = logging.getLogger("nmt.train_vectors")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Any further key=value "
                                     "arguments are nmt-train overrides (experiment=debug paths.data_dir=...).")
    parser.add_argument("--out", required=True, help="the vectors file to write")
    parser.add_argument("--side", choices=("src", "tgt"), default="src", help="which language (default src)")
    parser.add_argument("--run", help="take the data settings and SentencePiece model of this finished run")
    parser.add_argument("--dim", type=int, help="vector size (default: the config's model.embedding_dim)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--window", type=int, default=5, help="largest distance to a context piece")
    parser.add_argument("--negatives", type=int, default=5, help="noise pieces per (piece, context) pair")
    parser.add_argument("--subsample", type=float, default=1e-3, help="word2vec's frequent-piece threshold t")
    parser.add_argument("--min-count", type=int, default=1, help="write only pieces seen this often")
    parser.add_argument("--batch-size", type=int, default=4096, help="(piece, context) pairs per update")
    parser.add_argument("--lr", type=float, default=0.005, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--format", choices=("word2vec_text", "word2vec_binary"), default="word2vec_text")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args, overrides = parser.parse_known_args(argv)
    unknown = [a for a in overrides if a.startswith("-")]
    if unknown:
        parser.error(f"unknown option(s): {' '.join(unknown)}")
    args.overrides = overrides
    return args


def training_corpus(args: argparse.Namespace, work_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str], int]:
    """(flat piece ids, sentence offsets, pieces, config embedding_dim) of the chosen side's training data."""
    if args.run:
        if args.overrides:
            raise NMTError("Give either --run DIR or nmt-train overrides, not both.")
        files = RunFiles(Path(args.run))
        if not files.config.exists():
            raise NMTError(f"--run {args.run} is not a training run: it has no config.yaml. Pass --run DIR with the "
                           f"paths.run_dir of a run made by nmt-train.")
        saved = read_config(files)
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), saved))
        spm_dir = Path(args.run)
    else:
        cfg, _ = compose_config("train", args.overrides)
        spm_dir = work_dir
    data = prepare_training_data(cfg.data, Path(cfg.paths.data_dir), spm_dir, cfg.trainer.seed)
    corpus = data.train
    flat, offsets = getattr(corpus, f"{args.side}_flat"), getattr(corpus, f"{args.side}_offsets")
    vocab = data.vocab.side(args.side)
    pieces = [vocab.id_to_piece(i) for i in range(vocab.get_piece_size())]
    return flat.astype(np.int64), offsets, pieces, cfg.model.embedding_dim


def skipgram_pairs(flat: np.ndarray, offsets: np.ndarray, counts: np.ndarray, args: argparse.Namespace,
                   rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch's (centre, context) pairs, shuffled: frequent pieces subsampled, then a random window
    of 1..window pieces on each side of each centre, within its sentence (as word2vec does)."""
    sentence = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))  # (N,) sentence of each token
    frequency = counts / counts.sum()
    threshold = args.subsample
    keep_prob = np.minimum(1.0, (np.sqrt(frequency / threshold) + 1) * threshold / np.maximum(frequency, 1e-12))
    keep = rng.random(len(flat)) < keep_prob[flat]
    ids, sentence = flat[keep], sentence[keep]
    reach = rng.integers(1, args.window + 1, len(ids))  # (N,) each centre's window
    centres, contexts = [], []
    for distance in range(1, args.window + 1):
        same = sentence[:-distance] == sentence[distance:]
        left = np.flatnonzero(same & (reach[:-distance] >= distance))  # centre i, context i + distance
        right = np.flatnonzero(same & (reach[distance:] >= distance))  # centre i + distance, context i
        centres += [ids[left], ids[right + distance]]
        contexts += [ids[left + distance], ids[right]]
    centres, contexts = np.concatenate(centres), np.concatenate(contexts)
    order = rng.permutation(len(centres))
    return torch.from_numpy(centres[order]), torch.from_numpy(contexts[order])


def sgns_loss(centre_vectors: torch.Tensor, context_vectors: torch.Tensor, noise_vectors: torch.Tensor) -> torch.Tensor:
    """centre, context (B, D), noise (B, K, D) -> mean of -log σ(u·v) - Σ log σ(-u·n)."""
    positive = F.logsigmoid((centre_vectors * context_vectors).sum(-1))  # (B,)
    negative = F.logsigmoid(-torch.bmm(noise_vectors, centre_vectors.unsqueeze(-1)).squeeze(-1)).sum(-1)  # (B,)
    return -(positive + negative).mean()


def train(flat: np.ndarray, offsets: np.ndarray, vocab_size: int, dim: int, args: argparse.Namespace) -> torch.Tensor:
    """The input ("centre") vectors (V, D) after args.epochs epochs of skip-gram with negative sampling."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    counts = np.bincount(flat, minlength=vocab_size).astype(np.float64)
    centre = torch.nn.Embedding(vocab_size, dim)
    context = torch.nn.Embedding(vocab_size, dim)
    torch.nn.init.uniform_(centre.weight, -0.5 / dim, 0.5 / dim)  # word2vec's initialisation
    torch.nn.init.zeros_(context.weight)
    noise = torch.from_numpy(counts ** 0.75)  # the unigram distribution to the 3/4 power
    optimizer = torch.optim.Adam([centre.weight, context.weight], lr=args.lr)
    for epoch in range(1, args.epochs + 1):
        started, total, batches = time.perf_counter(), 0.0, 0
        centres, contexts = skipgram_pairs(flat, offsets, counts, args, rng)
        for start in range(0, len(centres), args.batch_size):
            c, o = centres[start:start + args.batch_size], contexts[start:start + args.batch_size]
            negatives = torch.multinomial(noise, len(c) * args.negatives, replacement=True).view(len(c), -1)
            loss = sgns_loss(centre(c), context(o), context(negatives))  # (B, D), (B, D), (B, K, D)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
        log.info("epoch %d/%d: %d pairs, loss %.4f, %.1f s", epoch, args.epochs, len(centres),
                 total / max(1, batches), time.perf_counter() - started)
    return centre.weight.detach()


def show_neighbours(vectors: torch.Tensor, pieces: list[str], ids: list[int], k: int = 5) -> None:
    """Log the nearest pieces of a few frequent ones: a quick look at what the vectors learnt."""
    unit = F.normalize(vectors, dim=1)
    for index in ids:
        scores = unit @ unit[index]
        scores[index] = -2.0
        best = torch.topk(scores, k).indices.tolist()
        log.info("  %s: %s", pieces[index], " ".join(pieces[i] for i in best))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    prepare_output_file(Path(args.out), "--out")  # before minutes of training
    if args.dim is not None and args.dim < 1:
        raise NMTError(f"--dim {args.dim}: the vectors need a size of at least 1 (or leave --dim out for the "
                       f"config's model.embedding_dim).")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nmt-vectors-") as work_dir:
        flat, offsets, pieces, config_dim = training_corpus(args, Path(work_dir))
    dim = args.dim or config_dim
    log.info("skip-gram on the %s side: %d tokens, %d sentences, %d pieces, dimension %d", args.side, len(flat),
             len(offsets) - 1, len(pieces), dim)
    vectors = train(flat, offsets, len(pieces), dim, args)
    counts = np.bincount(flat, minlength=len(pieces))
    order = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] >= args.min_count and i not in SPECIAL_IDS]
    write_vectors(Path(args.out), [pieces[i] for i in order], vectors[order], binary=args.format == "word2vec_binary")
    show_neighbours(vectors, pieces, [i for i in order if pieces[i].startswith("\u2581") and len(pieces[i]) > 3][:6])
    summary = {"out": args.out, "side": args.side, "pieces": len(order), "dim": dim, "epochs": args.epochs,
               "tokens": int(len(flat)), "seconds": round(time.perf_counter() - started, 1)}
    log.info("wrote %s", json.dumps(summary))
    return summary


if __name__ == "__main__":
    try:
        main()
    except NMTError as error:
        fail(str(error))
