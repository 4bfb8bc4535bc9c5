"""nmt-evaluate: decode a split (or your own files) with a trained run, and score it with sacrebleu."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from sacrebleu.metrics import BLEU, CHRF

from nmt.config import EvaluateConfig
from nmt.console import setup_logging
from nmt.data.corpus import BadTsvLines, ParallelText, load_splits, read_lines
from nmt.decoding import hypothesis_texts, translate_sentences
from nmt.errors import NMTError
from nmt.precision import decode_precision
from nmt.run import TrainedRun, load_trained
from nmt.runtime import keep_freed_memory, pick_device

log = logging.getLogger(__name__)


def score(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU and chrF with their sacrebleu signatures."""
    bleu, chrf = BLEU(), CHRF()
    bleu_score = bleu.corpus_score(hypotheses, [references])
    chrf_score = chrf.corpus_score(hypotheses, [references])
    return {
        "bleu": bleu_score.score, "bleu_signature": str(bleu.get_signature()), "bleu_text": str(bleu_score),
        "chrf": chrf_score.score, "chrf_signature": str(chrf.get_signature()), "chrf_text": str(chrf_score),
    }


def evaluation_data(cfg: EvaluateConfig, run: TrainedRun) -> tuple[str, ParallelText]:
    """(name, text): eval.src/eval.ref when given, else the run's own val or test split, or for a Multi30k
    run another of its test sets (downloaded on first use)."""
    options = cfg.eval
    if options.src is not None:
        sources, references = read_lines(Path(options.src)), read_lines(Path(options.ref))
        if len(sources) != len(references):
            raise NMTError(
                f"eval.src {options.src} has {len(sources)} lines but eval.ref {options.ref} has {len(references)}; "
                f"each reference line must translate the same source line."
            )
        return Path(options.src).name, ParallelText(sources, references, options.src)
    data_dir, data = Path(cfg.data_dir or run.config.paths.data_dir), run.config.data
    if options.split not in ("test", "val") and data.dataset != "multi30k":  # only Multi30k has more test sets
        raise NMTError(f"eval.split={options.split} names a Multi30k test set, but this run trained on "
                       f"data.dataset={data.dataset}; score other files with eval.src and eval.ref.")
    files = getattr(data, options.split, None) if data.dataset == "files" else None
    if files is not None and not files.given:
        raise NMTError(f"The run {run.files.run_dir} has no {options.split} split (it trained without "
                       f"data.{options.split}). Score your own files with eval.src=FILE eval.ref=FILE, or the dev set "
                       f"with eval.split=val.")
    try:
        return options.split, load_splits(data, data_dir, (options.split,))[options.split]
    except BadTsvLines as error:  # its own remedy names data.on_bad_line, a training setting
        raise NMTError(error.describe("score a copy without them with eval.src and eval.ref")) from None


def evaluate(cfg: EvaluateConfig, cfg_dict: dict | None = None) -> dict:
    """Decode, write DIR/eval/<name>.hyp (and .ref), print BLEU and chrF, save DIR/eval/<name>.json."""
    setup_logging()
    keep_freed_memory()  # as nmt-train does (trainer.keep_freed_memory): the search reuses mapped pages
    device = pick_device(cfg.device, "device")
    run = load_trained(cfg.run, cfg.eval.checkpoint, device, cfg.eval.ensemble)
    name, data = evaluation_data(cfg, run)
    if not len(data):
        raise NMTError(f"There is nothing to evaluate: {data.name} is empty.")
    started = time.perf_counter()
    translations = translate_sentences(run.model, run.vocab, data.src, cfg.eval, device, progress=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    hypotheses = [t.text for t in translations]
    out_dir = run.files.run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    hyp_path, ref_path = out_dir / f"{name}.hyp", out_dir / f"{name}.ref"
    hyp_path.write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
    ref_path.write_text("".join(r + "\n" for r in data.tgt), encoding="utf-8")
    nbest_path = out_dir / f"{name}.nbest"
    if cfg.eval.n_best > 1:  # Moses' n-best form: number ||| translation ||| features ||| score, best first
        lines = []
        for number, translation in enumerate(translations):
            texts = hypothesis_texts(run.vocab, translation)
            scored = list(zip(texts, (h.score for h in translation.hypotheses))) or [("", 0.0)]
            lines += [f"{number} ||| {text} ||| score= {value:.4f} ||| {value:.4f}\n" for text, value in scored]
        nbest_path.write_text("".join(lines), encoding="utf-8")
    else:
        nbest_path.unlink(missing_ok=True)  # an n-best list of an earlier evaluation no longer matches .hyp
        nbest_path = None
    tokens = sum(len(t.tgt_pieces) for t in translations)
    result = {
        "run": str(run.files.run_dir), "checkpoint": str(run.checkpoint), "ensemble": [str(p) for p in run.ensemble],
        "split": name, "source": data.name,
        "sentences": len(hypotheses), **score(hypotheses, data.tgt),
        "seconds": seconds, "sentences_per_s": len(hypotheses) / seconds, "tgt_tokens_per_s": tokens / seconds,
        "decoding": {"beam_size": cfg.eval.beam_size, "alpha": cfg.eval.alpha, "max_len_ratio": cfg.eval.max_len_ratio,
                     "batch_size": cfg.eval.batch_size, "precision": decode_precision(cfg.eval, device),
                     "device": str(device)},
        "hypotheses": str(hyp_path), "references": str(ref_path),
    }
    if nbest_path is not None:
        result["nbest"] = str(nbest_path)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(result["bleu_text"])
    print(f"  {result['bleu_signature']}")
    print(result["chrf_text"])
    print(f"  {result['chrf_signature']}")
    print(f"{len(hypotheses)} sentences in {seconds:.1f} s ({result['sentences_per_s']:.1f} sent/s, "
          f"{result['tgt_tokens_per_s']:.0f} tgt tok/s); wrote {hyp_path}"
          f"{f', {nbest_path} (eval.n_best={cfg.eval.n_best})' if nbest_path else ''} and {out_dir / f'{name}.json'}")
    return result
