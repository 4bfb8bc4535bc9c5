"""Embedding drift: distances from step 0, rows moved and never changed, the record and its plot."""

from __future__ import annotations

import json

import pytest
import torch

from nmt.checkpoint import save_checkpoint
from nmt.config import ModelConfig
from nmt.model.drift import EmbeddingDrift, describe, drift_stats
from nmt.model.seq2seq import build_model
from nmt.plots import plot_embedding_drift

V, E = 8, 3


def test_drift_stats_counts_moved_and_unchanged_rows_without_the_pad_row():
    initial = torch.randn(V, E)
    initial[0] = 0  # pad
    weight = initial.clone()
    weight[2] += torch.tensor([3.0, 4.0, 0.0])  # moved by 5
    weight[5, 1] = torch.nextafter(weight[5, 1], torch.tensor(1e9))  # moved by one ulp: still "moved"
    counts = torch.tensor([0, 4, 9, 0, 0, 3, 0, 1])  # rows 3, 4, 6 never occur in the training data
    stats = drift_stats(weight, initial, counts, pad_id=0)
    assert stats["rows"] == V - 1
    assert stats["unchanged_rows"] == V - 1 - 2
    assert stats["moved_share"] == pytest.approx(2 / 7)
    assert stats["unchanged_unseen"] == 3
    assert stats["mean_l2"] == pytest.approx(5 / 7, rel=1e-6)
    weight[0] = 1.0  # the pad row is left out even if it moved
    assert drift_stats(weight, initial, counts, pad_id=0)["unchanged_rows"] == V - 1 - 2


def test_measure_compares_with_step0_and_counts_eos_as_read(tmp_path):
    model = build_model(ModelConfig(embedding_dim=E, hidden_size=4), V, V)
    save_checkpoint({"model": model.state_dict()}, tmp_path / "step0.pt")
    counts = torch.tensor([0, 0, 0, 0, 5, 5, 0, 0])  # unk, bos, eos, 6 and 7 absent from the training text
    drift = EmbeddingDrift(tmp_path / "step0.pt", {"src": counts, "tgt": counts})
    with torch.no_grad():
        model.src_embed.weight[4] += 1.0
    record = drift.measure(model, step=7)
    assert record["kind"] == "embeddings" and record["step"] == 7
    assert record["src"]["unchanged_rows"] == V - 2 and record["tgt"]["unchanged_rows"] == V - 1
    # </s> is added to every source and target, <s> to every target: they do not count as absent
    assert record["src"]["unchanged_unseen"] == 4  # unk, bos, 6, 7
    assert record["tgt"]["unchanged_unseen"] == 3  # unk, 6, 7
    line = describe(record)
    assert line.startswith("embeddings: src 14.3% of rows moved") and "tgt 0.0% of rows moved" in line


def test_a_table_shared_by_both_sides_counts_a_piece_absent_only_when_both_sides_lack_it(tmp_path):
    model = build_model(ModelConfig(embedding_dim=E, hidden_size=4, tie_src_tgt=True), V, V)
    save_checkpoint({"model": model.state_dict()}, tmp_path / "step0.pt")
    src = torch.tensor([0, 0, 0, 0, 5, 0, 0, 0])
    tgt = torch.tensor([0, 0, 0, 0, 0, 5, 0, 0])  # 5 is a target word only; 6 and 7 occur on neither side
    record = EmbeddingDrift(tmp_path / "step0.pt", {"src": src, "tgt": tgt}, shared=True).measure(model, step=0)
    assert record["src"] == record["tgt"]
    assert record["src"]["unchanged_rows"] == V - 1  # frozen, say: nothing moved
    assert record["src"]["unchanged_unseen"] == 3  # unk, 6, 7 (bos: every target starts with it)


def test_drift_plot_of_one_run_or_several(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    stats = {"rows": 9, "mean_l2": 0.1, "moved_share": 0.5, "unchanged_rows": 4, "unchanged_unseen": 2}
    records = [{"kind": "val", "step": 10, "loss": 3.0, "bleu": 1.0}]
    records += [{"kind": "embeddings", "step": s, "src": stats, "tgt": stats} for s in (10, 20)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    plot_embedding_drift(metrics, tmp_path / "one.png")
    plot_embedding_drift({"frozen": metrics, "trainable": metrics}, tmp_path / "two.png")
    for name in ("one.png", "two.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp*"))
