"""translate_sentences: the one decoding path shared by validation, nmt-evaluate and nmt-translate."""

from __future__ import annotations

import logging

import pytest
import torch

import nmt.precision
from nmt.config import DecodeConfig, EvalOptions, ModelConfig, VocabConfig
from nmt.data.vocab import Vocab
from nmt.decoding import translate_sentences
from nmt.model.seq2seq import build_model


@pytest.fixture
def setup(tiny_corpus, tmp_path):
    vocab = Vocab.build(tmp_path / "run", tiny_corpus["src"], tiny_corpus["tgt"], VocabConfig(size=60), seed=1)
    model = build_model(ModelConfig(embedding_dim=8, hidden_size=6, dropout=0.3), vocab.size("src"), vocab.size("tgt"))
    return model, vocab, tiny_corpus["src"][:12]


@pytest.mark.parametrize("beam_size", [1, 3])
def test_results_come_back_in_input_order_whatever_the_batch_size(setup, beam_size):
    model, vocab, sources = setup
    sources = sources[:7] + [""] + sources[7:]
    device = torch.device("cpu")
    one_batch = translate_sentences(model, vocab, sources, DecodeConfig(beam_size=beam_size, batch_size=64), device)
    small = translate_sentences(model, vocab, sources, DecodeConfig(beam_size=beam_size, batch_size=2), device)
    assert [t.source for t in one_batch] == sources
    assert [t.text for t in one_batch] == [t.text for t in small]
    empty = one_batch[7]
    assert (empty.text, empty.hypotheses, empty.src_pieces) == ("", [], [])
    for translation in one_batch[:7]:
        best = translation.hypotheses[0]
        assert translation.text == vocab.decode(best.tokens, "tgt")
        assert translation.tgt_pieces == vocab.id_to_piece(best.tokens, "tgt") + ["</s>"]
        assert translation.src_pieces == vocab.pieces(translation.source, "src") + ["</s>"]


def test_n_best_and_attention(setup):
    model, vocab, sources = setup
    results = translate_sentences(model, vocab, sources[:3], DecodeConfig(beam_size=4, n_best=3), torch.device("cpu"),
                                  keep_attention=True)
    for translation in results:
        assert len(translation.hypotheses) == 3
        best = translation.hypotheses[0]
        assert best.attention.shape == (len(translation.tgt_pieces), len(translation.src_pieces))


def test_long_sources_are_cut_and_training_mode_is_restored(setup):
    model, vocab, sources = setup
    model.train()
    long = " ".join(sources)
    results = translate_sentences(model, vocab, [long], DecodeConfig(beam_size=1), torch.device("cpu"),
                                  max_src_len=5, keep_attention=True)
    assert len(results[0].src_pieces) == 5 + 1
    assert results[0].hypotheses[0].attention.shape[1] == 6
    assert model.training  # put back as it was
    model.eval()
    translate_sentences(model, vocab, sources[:2], DecodeConfig(beam_size=1), torch.device("cpu"))
    assert not model.training


def test_decoding_is_deterministic_in_training_mode_too(setup):
    model, vocab, sources = setup
    model.train()  # dropout must be off while decoding
    cfg = DecodeConfig(beam_size=2)
    first = [t.text for t in translate_sentences(model, vocab, sources, cfg, torch.device("cpu"))]
    second = [t.text for t in translate_sentences(model, vocab, sources, cfg, torch.device("cpu"))]
    assert first == second


def test_bf16_decoding_runs_the_output_layer_in_bf16_and_fp32_keeps_the_callers_autocast(setup, monkeypatch):
    monkeypatch.setattr(nmt.precision, "has_bf16_matmul", lambda device: True)  # test bf16 on any CPU
    model, vocab, sources = setup
    dtypes = []
    model.output.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    device = torch.device("cpu")
    fp32 = translate_sentences(model, vocab, sources, DecodeConfig(beam_size=3), device)
    assert set(dtypes) == {torch.float32}
    dtypes.clear()
    bf16 = translate_sentences(model, vocab, sources, DecodeConfig(beam_size=3, precision="bf16"), device)
    assert set(dtypes) == {torch.bfloat16} and len(bf16) == len(fp32)
    dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # validation under trainer.precision=bf16
        translate_sentences(model, vocab, sources, DecodeConfig(beam_size=3), device)
    assert set(dtypes) == {torch.bfloat16}


def test_bf16_decoding_on_a_cpu_without_bf16_kernels_runs_fp32_and_says_so_once(setup, monkeypatch, caplog):
    monkeypatch.setattr(nmt.precision, "has_bf16_matmul", lambda device: False)
    monkeypatch.setattr(nmt.precision, "_WARNED", set())
    model, vocab, sources = setup
    dtypes = []
    model.output.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    cfg = EvalOptions(beam_size=3, precision="bf16")
    with caplog.at_level(logging.WARNING):
        first = translate_sentences(model, vocab, sources, cfg, torch.device("cpu"))
        second = translate_sentences(model, vocab, sources, cfg, torch.device("cpu"))
    assert set(dtypes) == {torch.float32}
    assert [t.text for t in first] == [t.text for t in second]
    warnings = [r.getMessage() for r in caplog.records if "bfloat16" in r.getMessage()]
    assert len(warnings) == 1 and "eval.precision=bf16" in warnings[0] and "eval.precision=fp32" in warnings[0]
