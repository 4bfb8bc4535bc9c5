"""Translate a list of sentences with a trained model: the one decoding path that validation,
nmt-evaluate and nmt-translate share."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from nmt.config import DecodeConfig
from nmt.data.batching import EncodedCorpus, collate, decode_batches
from nmt.data.vocab import Vocab
from nmt.model.seq2seq import Seq2Seq
from nmt.precision import decode_precision
from nmt.search import Hypothesis, decode


@dataclass
class Translation:
    source: str
    text: str
    src_pieces: list[str]
    tgt_pieces: list[str]
    hypotheses: list[Hypothesis]  # n_best, best first


def hypothesis_texts(vocab: Vocab, translation: Translation) -> list[str]:
    """The n-best hypotheses of a translation as detokenized text, best first (none for an empty source)."""
    return [vocab.decode(h.tokens, "tgt") for h in translation.hypotheses]


def translate_sentences(model: Seq2Seq, vocab: Vocab, sources: list[str], cfg: DecodeConfig, device: torch.device,
                        max_src_len: int | None = None, keep_attention: bool = False,
                        progress: bool = False) -> list[Translation]:
    """Decode `sources` in length-sorted batches; results come back in input order.

    An empty source gives an empty translation. Sources longer than `max_src_len` pieces are cut to it.
    """
    src_ids = vocab.encode(sources, "src")
    if max_src_len is not None:
        src_ids = [ids[:max_src_len] for ids in src_ids]
    corpus = EncodedCorpus.from_lists(src_ids, [[] for _ in src_ids])
    results: list[Translation | None] = [None] * len(sources)
    nonempty = np.array([len(ids) > 0 for ids in src_ids])
    for index in np.flatnonzero(~nonempty).tolist():
        results[index] = Translation(sources[index], "", [], [], [])
    lens = np.where(nonempty, corpus.src_lens, -1)
    batches = [[i for i in b if nonempty[i]] for b in decode_batches(lens, cfg.batch_size)]
    was_training = model.training
    model.eval()
    # fp32 leaves any autocast of the caller (validation under trainer.precision) as it is
    bf16 = decode_precision(cfg, device) == "bf16"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    with autocast, model.token_table(), tqdm(total=int(nonempty.sum()), desc="decode", unit="sent", leave=False, disable=not progress) as bar:
        for indices in filter(None, batches):
            batch = collate(corpus, indices, with_target=False).to(device)
            hyps = decode(model, batch.src_ids, batch.src_lens, cfg.beam_size, cfg.alpha, cfg.max_len_ratio,
                          cfg.n_best, keep_attention)
            for index, nbest in zip(indices, hyps):
                best = nbest[0]
                results[index] = Translation(
                    sources[index], vocab.decode(best.tokens, "tgt"),
                    vocab.id_to_piece(src_ids[index], "src") + ["</s>"],
                    vocab.id_to_piece(best.tokens, "tgt") + ["</s>"], nbest)
            bar.update(len(indices))
    model.train(was_training)
    return results
