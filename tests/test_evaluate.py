"""nmt-evaluate on a trained debug run: files written, scores equal the sacrebleu command line."""

import json
import shutil
import subprocess
import sys

import pytest
import sacrebleu
import torch

from conftest import script_path
from nmt.config import EvalOptions, EvaluateConfig
from nmt.errors import NMTError
from nmt.evaluate import evaluate, score
from nmt.precision import has_bf16_matmul


def test_score_matches_sacrebleu_api_on_known_text():
    hyps = ["the cat sat on the mat", "a dog runs"]
    refs = ["the cat sat on the mat", "a dog is running"]
    result = score(hyps, refs)
    assert result["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert result["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert 0 < result["bleu"] < 100 and 0 < result["chrf"] < 100  # a partial match: neither 0 nor perfect
    assert result["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert "chrF2" in result["chrf_text"]


@pytest.fixture
def own_run(debug_run, tmp_path):
    """A copy of the shared debug run, for tests that write eval/ files into it."""
    run = tmp_path / "run"
    shutil.copytree(debug_run, run)
    return run


def test_evaluate_writes_files_and_agrees_with_sacrebleu_cli(own_run):
    debug_run = own_run
    out = subprocess.run([script_path("nmt-evaluate"), f"run={debug_run}", "eval.split=val", "eval.beam_size=3"],
                         capture_output=True, text=True, check=True)
    assert "BLEU = " in out.stdout and "nrefs:1|case:mixed" in out.stdout and "chrF2" in out.stdout
    hyp, ref = debug_run / "eval" / "val.hyp", debug_run / "eval" / "val.ref"
    report = json.loads((debug_run / "eval" / "val.json").read_text())
    assert len(hyp.read_text(encoding="utf-8").splitlines()) == report["sentences"] == 30
    assert report["decoding"]["beam_size"] == 3
    assert report["sentences_per_s"] > 0 and report["tgt_tokens_per_s"] > 0
    cli = subprocess.run([sys.executable, "-m", "sacrebleu", str(ref), "-i", str(hyp), "-m", "bleu", "chrf", "-b"],
                         capture_output=True, text=True, check=True)
    bleu_cli, chrf_cli = json.loads(cli.stdout)  # with -b and two metrics: a JSON list of the two scores
    assert bleu_cli == pytest.approx(round(report["bleu"], 1), abs=1e-9)
    assert chrf_cli == pytest.approx(round(report["chrf"], 1), abs=1e-9)


def test_evaluate_records_the_precision_it_decoded_in(own_run):
    debug_run = own_run
    out = subprocess.run([script_path("nmt-evaluate"), f"run={debug_run}", "eval.split=val", "eval.beam_size=1",
                          "eval.precision=bf16"], capture_output=True, text=True, check=True)
    report = json.loads((debug_run / "eval" / "val.json").read_text())
    if has_bf16_matmul(torch.device("cpu")):
        assert report["decoding"]["precision"] == "bf16" and "no bfloat16" not in out.stderr
    else:  # an AVX2-only CPU: decoded in fp32, and said so
        assert report["decoding"]["precision"] == "fp32" and "eval.precision=bf16: this CPU" in out.stderr


def test_evaluate_own_files_with_wrong_reference_count(debug_run, tmp_path):
    src, ref = tmp_path / "src.txt", tmp_path / "ref.txt"
    src.write_text("Ein Hund.\nZwei Katzen.\n", encoding="utf-8")
    ref.write_text("A dog.\n", encoding="utf-8")
    cfg = EvaluateConfig(run=str(debug_run), eval=EvalOptions(src=str(src), ref=str(ref), beam_size=2))
    with pytest.raises(NMTError, match=r"src.txt has 2 lines but eval.ref .*ref.txt has 1"):
        evaluate(cfg)


def test_evaluate_missing_run_is_a_clean_error(tmp_path):
    out = subprocess.run([script_path("nmt-evaluate"), f"run={tmp_path / 'nope'}"], capture_output=True, text=True)
    assert out.returncode != 0
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_evaluate_n_best_writes_a_moses_list_whose_first_entries_are_the_scored_output(debug_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(debug_run, run)
    subprocess.run([script_path("nmt-evaluate"), f"run={run}", "eval.split=val", "eval.beam_size=3", "eval.n_best=3"],
                   capture_output=True, text=True, check=True)
    hyps = (run / "eval" / "val.hyp").read_text(encoding="utf-8").splitlines()
    entries = [line.split(" ||| ") for line in (run / "eval" / "val.nbest").read_text(encoding="utf-8").splitlines()]
    assert json.loads((run / "eval" / "val.json").read_text())["nbest"] == str(run / "eval" / "val.nbest")
    by_sentence = {}
    for number, text, features, value in entries:
        assert features == f"score= {value}"
        by_sentence.setdefault(int(number), []).append((text, float(value)))
    assert sorted(by_sentence) == list(range(len(hyps))) == list(range(30))
    for number, nbest in by_sentence.items():
        assert 1 <= len(nbest) <= 3
        assert nbest[0][0] == hyps[number]  # the best of the list is what was scored
        scores = [value for _, value in nbest]
        assert scores == sorted(scores, reverse=True)
    assert any(len(nbest) == 3 for nbest in by_sentence.values())
    subprocess.run([script_path("nmt-evaluate"), f"run={run}", "eval.split=val", "eval.beam_size=3"],
                   capture_output=True, text=True, check=True)
    assert "nbest" not in json.loads((run / "eval" / "val.json").read_text())
    assert not (run / "eval" / "val.nbest").exists()  # the stale list is gone


def test_evaluate_an_ensemble_of_checkpoints(debug_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(debug_run, run)

    def evaluate_val(*overrides):
        """-> the n-best list's (sentence, text, score) entries and the report; scores are the ensemble's log-probabilities."""
        subprocess.run([script_path("nmt-evaluate"), f"run={run}", "eval.split=val", "eval.beam_size=3", "eval.n_best=2",
                        *overrides], capture_output=True, text=True, check=True)
        entries = [line.split(" ||| ") for line in (run / "eval" / "val.nbest").read_text(encoding="utf-8").splitlines()]
        return [(int(number), text, float(value)) for number, text, _, value in entries], \
            json.loads((run / "eval" / "val.json").read_text())

    alone, report = evaluate_val()
    assert report["ensemble"] == []
    twice, report = evaluate_val("eval.ensemble=[best]")  # two copies of one model: the same probabilities
    assert [entry[:2] for entry in twice] == [entry[:2] for entry in alone]
    assert [entry[2] for entry in twice] == pytest.approx([entry[2] for entry in alone], abs=1e-3)
    assert report["ensemble"] == [str(run / "checkpoints" / "best.pt")]
    # with the untrained weights as a member, every hypothesis is scored by the mean of two different distributions
    mixed, report = evaluate_val("eval.ensemble=[step0]")
    assert report["ensemble"] == [str(run / "checkpoints" / "step0.pt")]
    alone_scores = {(number, text): value for number, text, value in alone}
    mixed_scores = {(number, text): value for number, text, value in mixed}
    shared = alone_scores.keys() & mixed_scores.keys()  # the same hypothesis of the same sentence
    assert shared and all(abs(alone_scores[key] - mixed_scores[key]) > 1e-3 for key in shared)
    _, report = evaluate_val("eval.checkpoint=last", "eval.ensemble=[best,step0]")
    assert report["checkpoint"] == str(run / "checkpoints" / "last.pt")
    assert report["ensemble"] == [str(run / "checkpoints" / n) for n in ("best.pt", "step0.pt")]
    out = subprocess.run([script_path("nmt-evaluate"), f"run={run}", "eval.ensemble=[val-00000099]"],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "val-00000099 does not exist" in out.stderr and "eval.ensemble" in out.stderr


def test_evaluate_other_multi30k_test_sets(tmp_path):
    """eval.split=test_2017_mscoco scores a Multi30k run on a test set it never saw: that set's files."""
    from types import SimpleNamespace

    from nmt.cli import compose_config
    from nmt.errors import ConfigError
    from nmt.evaluate import evaluation_data

    folder = tmp_path / "multi30k"
    folder.mkdir()
    for lang, word in (("de", "Satz"), ("en", "sentence")):
        (folder / f"test_2017_mscoco.{lang}").write_text("".join(f"{word} {i}\n" for i in range(461)), encoding="utf-8")
    run = SimpleNamespace(config=compose_config("train", ["data=multi30k_de_en"])[0])
    options = EvaluateConfig(run="r", data_dir=str(tmp_path), eval=EvalOptions(split="test_2017_mscoco"))
    name, text = evaluation_data(options, run)
    assert name == "test_2017_mscoco"
    assert len(text.src) == len(text.tgt) == 461
    assert (text.src[460], text.tgt[460]) == ("Satz 460", "sentence 460")
    with pytest.raises(NMTError, match="no split 'test_2099_flickr'.*test_2017_mscoco"):
        unknown = EvalOptions(split="test_2099_flickr")
        evaluation_data(EvaluateConfig(run="r", data_dir=str(tmp_path), eval=unknown), run)
    tatoeba = SimpleNamespace(config=compose_config("train", ["data=tatoeba_fr_en"])[0])
    with pytest.raises(NMTError, match="data.dataset=tatoeba; score other files with eval.src and eval.ref"):
        evaluation_data(options, tatoeba)
    with pytest.raises(ConfigError, match="eval.split='train' is not a split"):
        EvalOptions(split="train")


def test_a_missing_or_damaged_test_split_is_explained_in_nmt_evaluate_terms(tmp_path):
    from types import SimpleNamespace

    from nmt.config import DataConfig, SplitFiles, TrainConfig
    from nmt.evaluate import evaluation_data

    def run_with(test: SplitFiles):
        data = DataConfig(dataset="files", train=SplitFiles(tsv="t.tsv"), val=SplitFiles(tsv="v.tsv"), test=test)
        return SimpleNamespace(files=SimpleNamespace(run_dir=tmp_path / "run"), config=TrainConfig(data=data))

    cfg = EvaluateConfig(run=str(tmp_path / "run"))
    with pytest.raises(NMTError, match=r"has no test split \(it trained without data.test\)\. Score your own files "
                                       r"with eval.src=FILE eval.ref=FILE, or the dev set with eval.split=val\."):
        evaluation_data(cfg, run_with(SplitFiles()))
    bad = tmp_path / "test.tsv"
    bad.write_text("Ein Hund.\tA dog.\nkein Tab\n", encoding="utf-8")
    with pytest.raises(NMTError) as error:
        evaluation_data(cfg, run_with(SplitFiles(tsv=str(bad))))
    assert "(line 2)" in str(error.value) and "score a copy without them with eval.src and eval.ref" in str(error.value)
    assert "data.on_bad_line" not in str(error.value)  # not a key nmt-evaluate takes
