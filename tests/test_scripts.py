"""scripts/: the skip-gram vector trainer, the sparse-gradient benchmark, the speed benchmark's FLOP count,
and the Joey NMT side-by-side's reading of Joey's log."""

from __future__ import annotations

import json
import sys

import pytest
import sentencepiece as spm
import torch
import torch.nn.functional as F

from conftest import REPO, run_cli
from nmt.model.vectors import detect_format, read_vectors

SCRIPTS = REPO / "scripts"


def test_train_vectors_on_a_finished_run_writes_its_pieces(debug_run, tmp_path):
    out_file = tmp_path / "vectors.en.bin"
    out = run_cli(sys.executable, str(SCRIPTS / "train_vectors.py"), "--run", str(debug_run), "--side", "tgt",
                  "--epochs", "2", "--dim", "16", "--format", "word2vec_binary", "--out", str(out_file))
    assert out.returncode == 0, out.stderr[-3000:]
    assert detect_format(out_file) == "word2vec_binary"
    vectors = read_vectors(out_file)
    processor = spm.SentencePieceProcessor(model_file=str(debug_run / "spm.joint.model"))
    pieces = {processor.id_to_piece(i) for i in range(4, processor.get_piece_size())}
    assert 100 < len(vectors) <= len(pieces) and set(vectors) <= pieces  # keyed by the run's pieces
    assert all(v.shape == (16,) and torch.isfinite(v).all() for v in vectors.values())
    first = next(iter(vectors))
    assert first in ("\u2581a", "\u2581A", ".")  # most frequent first, as word2vec writes
    summary = json.loads(out.stderr.strip().splitlines()[-1].split("wrote ", 1)[1])
    assert summary["pieces"] == len(vectors) and summary["epochs"] == 2


def test_train_vectors_refuses_bad_arguments_before_training(debug_run, tmp_path):
    script = str(SCRIPTS / "train_vectors.py")
    for args, message in ((["--run", str(debug_run), "--out", str(tmp_path)], f"--out={tmp_path} is a directory"),
                          (["--run", str(debug_run), "--dim", "0", "--out", str(tmp_path / "v.txt")], "--dim 0"),
                          (["--run", str(tmp_path / "nope"), "--out", str(tmp_path / "v.txt")],
                           "Pass --run DIR")):
        out = run_cli(sys.executable, script, *args)
        assert out.returncode == 2 and out.stderr.startswith("nmt: error:"), out.stderr[-2000:]
        assert message in out.stderr and "Traceback" not in out.stderr and "skip-gram" not in out.stderr
    assert not (tmp_path / "v.txt").exists()


def test_skipgram_learns_from_context():
    """Two pieces that share every context end up closer than two that share none."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        import train_vectors
    finally:
        sys.path.remove(str(SCRIPTS))
    import numpy as np

    # sentences "x A y" and "x B y" (A, B share contexts); "p C q" (C shares none with A)
    rng = np.random.default_rng(0)
    sentences = []
    for _ in range(300):
        sentences.append([4, 5 if rng.random() < 0.5 else 6, 7])
        sentences.append([8, 9, 10])
    flat = np.array([i for s in sentences for i in s])
    offsets = np.cumsum([0] + [len(s) for s in sentences])
    args = train_vectors.parse_args(["--out", "x", "--epochs", "15", "--window", "1", "--negatives", "3",
                                     "--subsample", "1", "--batch-size", "64", "--lr", "0.02"])
    vectors = train_vectors.train(flat, offsets, 11, 8, args)
    assert F.cosine_similarity(vectors[5], vectors[6], dim=0) > F.cosine_similarity(vectors[5], vectors[9], dim=0) + 0.3


def test_train_vectors_refuses_a_run_and_overrides_together(debug_run, tmp_path):
    out = run_cli(sys.executable, str(SCRIPTS / "train_vectors.py"), "--run", str(debug_run), "--out",
                  str(tmp_path / "v.txt"), "experiment=debug")
    assert out.returncode == 2 and "not both" in out.stderr and "Traceback" not in out.stderr


def test_bench_sparse_writes_a_table_and_json(tmp_path):
    report = tmp_path / "bench.json"
    out = run_cli(sys.executable, str(SCRIPTS / "bench_sparse.py"), "--vocab-sizes", "300", "--embedding-dim", "8",
                  "--hidden-size", "8", "--steps", "4", "--warmup", "1", "--rounds", "2", "--batch-size", "4",
                  "--length", "5", "--json", str(report))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| 300 | dense |" in out.stdout and "| 300 | sparse |" in out.stdout
    results = json.loads(report.read_text())["results"]
    assert [(r["vocab_size"], r["mode"], r["steps"]) for r in results] == [(300, "dense", 4), (300, "sparse", 4)]
    assert all(r["step_ms_median"] > 0 and r["optimizer_ms_median"] > 0 for r in results)


def load_script(name: str):
    """scripts/NAME.py as a module (scripts/ is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("output_size", [None, 24])
def test_benchmark_flop_count_matches_torchs_count_of_a_training_step(output_size):
    """The analytic FLOPs per target token (the MFU's numerator) against FlopCounterMode's count of the
    matrix products in one real forward + backward, fused recurrence included."""
    import numpy as np
    from torch.utils.flop_counter import FlopCounterMode

    from nmt.config import ModelConfig
    from nmt.data.batching import EncodedCorpus, collate
    from nmt.model.seq2seq import build_model

    cfg = ModelConfig(embedding_dim=16, hidden_size=20, attention_size=12, output_size=output_size, dropout=0.0)
    vocab = 50
    rng = np.random.default_rng(0)
    # equal lengths, as in a length-bucketed batch: torch would also count work on padded positions
    src = [rng.integers(4, vocab, 7).tolist() for _ in range(3)]
    tgt = [rng.integers(4, vocab, 5).tolist() for _ in range(3)]
    batch = collate(EncodedCorpus.from_lists(src, tgt), range(3))
    model = build_model(cfg, vocab, vocab)
    mask = batch.tgt_out != 0
    with FlopCounterMode(display=False) as counter:
        model(batch.src_ids, batch.src_lens, batch.tgt_in, mask, batch.tgt_out[mask]).backward()
    src_lens, tgt_lens = batch.src_lens.numpy(), mask.sum(1).numpy()
    benchmark = load_script("benchmark")
    analytic = benchmark.flops_per_target_token(cfg, vocab, [(src_lens, tgt_lens)])["flops_per_tgt_token"]
    measured = counter.get_total_flops() / int(mask.sum())
    # the analytic count takes backward as twice forward for every product; torch counts each one
    assert measured == pytest.approx(analytic, rel=0.03)


JOEY_LOG = """\
2026-11-22 14:22:37,111 - INFO - joeynmt.training - Epoch   1, Step:      150, Batch Loss:    76.086983, \
Batch Acc: 0.242088, Tokens per Sec:      809, Lr: 0.001000
2026-11-22 14:23:09,741 - INFO - joeynmt.prediction - Generation took 32.6156[sec].
2026-11-22 14:23:09,812 - INFO - joeynmt.prediction - Evaluation result (greedy): bleu:   1.37, loss:  79.19, \
ppl: 142.86, acc:   0.24, 0.0581[sec]
2026-11-22 14:26:41,222 - INFO - joeynmt.training - Epoch   1, Step:      250, Batch Loss:    66.449745, \
Batch Acc: 0.249791, Tokens per Sec:      894, Lr: 0.001000
2026-11-22 14:27:05,050 - INFO - joeynmt.training - Epoch   1, total training loss: 21262.58, num. of seqs: 29000, \
num. of tokens: 454234, 557.1786[sec]
2026-11-22 14:27:05,196 - INFO - joeynmt.prediction - Decoding on dev set... (device: cpu, n_gpu: 0)
2026-11-22 14:27:50,873 - INFO - joeynmt.prediction - Generation took 45.6774[sec].
2026-11-22 14:27:50,940 - INFO - joeynmt.prediction - Evaluation result (beam search): bleu:   1.80, 0.0558[sec]
2026-11-22 14:27:50,941 - INFO - joeynmt.prediction - Decoding on test set... (device: cpu, n_gpu: 0)
2026-11-22 14:28:31,554 - INFO - joeynmt.prediction - Generation took 40.6127[sec].
2026-11-22 14:28:31,620 - INFO - joeynmt.prediction - Evaluation result (beam search): bleu:   1.83, 0.0560[sec]
"""


def test_bench_joey_reads_joeys_log_and_writes_its_vocabulary(debug_run, tmp_path):
    """Joey NMT 2.3.0's own log lines (from a real run) give the epochs' tokens per second and the test
    set's decoding time, not the dev set's; Joey's vocabulary file is the run's pieces without specials."""
    bench_joey = load_script("bench_joey")
    result = {**bench_joey.parse_training(JOEY_LOG), **bench_joey.parse_decoding(JOEY_LOG)}
    assert result["train_tgt_tokens"] == 454234 and result["train_seconds"] == pytest.approx(557.1786)
    assert result["train_tgt_tokens_per_s"] == pytest.approx(454234 / 557.1786)
    assert result["window_tgt_tokens_per_s"] == [809, 894] and result["train_epochs"] == 1
    assert (result["beam5_seconds"], result["beam5_bleu"]) == (40.6127, 1.83)  # the test set's, after the dev set's
    with pytest.raises(SystemExit, match="no epoch summary"):
        bench_joey.parse_training(JOEY_LOG.replace("total training loss", "interrupted"))
    second = ("2026-11-22 14:36:05,050 - INFO - joeynmt.training - Epoch   2, total training loss: 17000.00, "
              "num. of seqs: 29000, num. of tokens: 454234, 542.8214[sec]\n")
    two = bench_joey.parse_training(JOEY_LOG + second)  # each epoch's own figures, summed
    assert (two["train_epochs"], two["train_sentences"], two["train_tgt_tokens"]) == (2, 58000, 908468)
    assert two["train_seconds"] == pytest.approx(1100.0)

    processor = spm.SentencePieceProcessor(model_file=str(debug_run / "spm.joint.model"))
    count = bench_joey.write_vocab(processor, tmp_path / "vocab.txt")
    pieces = (tmp_path / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(pieces) == count == processor.get_piece_size() - 4
    assert not {"<unk>", "<pad>", "<s>", "</s>"} & set(pieces)
    assert pieces == [processor.id_to_piece(i) for i in range(4, processor.get_piece_size())]

    joey = {**result, "beam5_sentences_per_s": 24.6, "beam5_pieces_per_s": 383.8, "peak_rss_mb": 2423.0,
            "mean_hypothesis_pieces": 15.6}
    nmt = {"train_tgt_tokens_per_s": 2172.0, "beam5_sentences_per_s": 92.0, "peak_rss_mb": 2341.0,
           "train_bf16": {"tgt_tokens_per_s": 3554.0},
           "decode_beam5": {"bleu": 40.48, "mean_output_pieces": 14.7, "tokens_per_s": 1352.4}}
    table = bench_joey.table(joey, nmt)
    assert "| 815 | 2,172 | 2.66× |" in table and "| 815 | 3,554 | 4.36× |" in table
    assert "| 24.6 | 92.0 | 3.74× |" in table and "| 24.6 | – | – |" in table  # no bf16 decoding figure given
    assert "| 384 | 1,352 | 3.52× |" in table  # per piece: the hypotheses' lengths differ
    assert "| 1.83 (1 epoch) | 40.48 |" in table
    decode_only = {key: value for key, value in joey.items() if key not in ("peak_rss_mb", "beam5_pieces_per_s")}
    assert "RSS" not in bench_joey.table({**decode_only, "train_epochs": 5}, nmt)  # the decoding's RSS is not training's
    assert "(5 epochs)" in bench_joey.table({**decode_only, "train_epochs": 5}, nmt)
    resumed = {**decode_only, "train_epochs": 6, "joey_config": {"training": {"load_model": "joey5/model/latest.ckpt"}}}
    assert "(6 epochs after --load-model)" in bench_joey.table(resumed, nmt)  # not the model's whole training

    config = bench_joey.joey_config(tmp_path, tmp_path / "vocab.txt", tmp_path / "spm.model", tmp_path / "model", 250, 10)
    assert config["training"]["epochs"] == 10 and "load_model" not in config["training"]
    config = bench_joey.joey_config(tmp_path, tmp_path / "vocab.txt", tmp_path / "spm.model", tmp_path / "model", 250, 10,
                                    tmp_path / "earlier" / "latest.ckpt")
    assert config["training"]["load_model"] == str(tmp_path / "earlier" / "latest.ckpt")


def test_benchmark_table_without_bf16_says_why_and_keeps_the_fp32_rows():
    benchmark = load_script("benchmark")
    decoding = {"sentences_per_s": 92.0, "tokens_per_s": 1352.0, "sentences": 1000, "mean_output_pieces": 14.7,
                "bleu": 40.48}
    result = {"peak_fp32_gflops": 150.0, "peak_bf16_gflops": None, "flops_per_tgt_token": 51.6e6, "output_size": 256,
              "train_fp32": {"tgt_tokens_per_s": 1500.0, "mfu": 0.516, "steps": 24, "tgt_tokens_per_step": 3091.0},
              "bf16_skipped": "this CPU has no fast bf16 matrix kernels", "decode_beam1": decoding,
              "decode_beam5": decoding, "decode_model": "runs/x (best)", "peak_rss_mb": 1200.0, "quick": True,
              "machine": {"gpu": None, "processor": "AMD EPYC", "threads": 2, "torch": "2.13.0"}}
    table = benchmark.table(result).splitlines()
    assert "| matmul peak fp32 / bf16 | 150 / – GFLOP/s |" in table
    assert "| bf16 | not measured: this CPU has no fast bf16 matrix kernels |" in table
    assert any(row.startswith("| training fp32 | 1,500 target tok/s, MFU 51.6%") for row in table)
    assert not any("bf16 decoding" in row or "training bf16" in row for row in table)
    assert sum("decoding, test2016" in row for row in table) == 2


def test_benchmark_keeps_the_better_of_its_two_peak_measurements(monkeypatch):
    # a peak measured in a slow minute would inflate the MFU: the second measurement replaces it when higher
    benchmark = load_script("benchmark")
    again = {torch.float32: 171.0, torch.bfloat16: 700.0}
    monkeypatch.setattr(benchmark, "matmul_peak_gflops", lambda device, dtype: again[dtype])
    result = {"peak_fp32_gflops": 102.0, "peak_bf16_gflops": 773.0}
    benchmark.measure_peaks_again(result, torch.device("cpu"))
    assert result == {"peak_fp32_gflops": 171.0, "peak_fp32_gflops_samples": [102.0, 171.0],
                      "peak_bf16_gflops": 773.0, "peak_bf16_gflops_samples": [773.0, 700.0]}
    skipped = {"peak_fp32_gflops": 174.0, "peak_bf16_gflops": None}  # no bf16 kernels: nothing to measure
    benchmark.measure_peaks_again(skipped, torch.device("cpu"))
    assert skipped == {"peak_fp32_gflops": 174.0, "peak_fp32_gflops_samples": [174.0, 171.0], "peak_bf16_gflops": None}


def test_benchmark_with_a_wrong_run_says_so_before_measuring_anything(shared_data_dir, tmp_path):
    import subprocess

    missing = tmp_path / "no-such-run"
    out = subprocess.run([sys.executable, str(SCRIPTS / "benchmark.py"), "--quick", "--data-dir", str(shared_data_dir),
                          "--run", str(missing), "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"The run directory {missing} does not exist" in out.stderr and "(here: --run)" in out.stderr
    assert "matmul peak" not in out.stderr  # nothing measured first


def test_average_checkpoints_names_a_run_directory_that_does_not_exist(tmp_path):
    import subprocess

    missing = tmp_path / "no-such-run"
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "average_checkpoints.py"), "--run", str(missing),
                          "--last", "3"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"--run {missing}: no such run directory" in out.stderr
    assert "0 validation checkpoint" not in out.stderr
