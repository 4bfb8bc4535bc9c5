"""Every experiment preset composes; bad settings fail at compose time with a message naming the key."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from conftest import run_cli
from nmt.cli import compose_config, main
from nmt.config import (DecodeConfig, EmbeddingConfig, EvaluateConfig, ModelConfig, TrainConfig, TrainerConfig,
                        TranslateConfig, parse_duration)
from nmt.console import setup_logging
from nmt.errors import ConfigError, NMTError

FILES = ["data.train.src=a.de", "data.train.tgt=a.en", "data.val.src=b.de", "data.val.tgt=b.en"]

PRESETS = {
    "debug": ("debug", "multi30k", "de", "en"),
    "multi30k_de_en": ("multi30k_de_en", "multi30k", "de", "en"),
    "multi30k_de_en_best": ("multi30k_de_en_best", "multi30k", "de", "en"),
    "multi30k_en_de": ("multi30k_en_de", "multi30k", "en", "de"),
    "tatoeba_fr_en": ("tatoeba_fr_en", "tatoeba", "fr", "en"),
    "tatoeba_fr_en_tutorial": ("tatoeba_fr_en_tutorial", "tatoeba", "fr", "en"),
    "files": ("files", "files", "src", "tgt"),
}


@pytest.mark.parametrize("experiment", sorted(PRESETS))
def test_every_experiment_composes(experiment):
    overrides = [f"experiment={experiment}"] + (FILES if experiment == "files" else [])
    cfg, cfg_dict = compose_config("train", overrides)
    name, dataset, src_lang, tgt_lang = PRESETS[experiment]
    assert isinstance(cfg, TrainConfig)
    assert (cfg.name, cfg.data.dataset, cfg.data.src_lang, cfg.data.tgt_lang) == (name, dataset, src_lang, tgt_lang)
    assert cfg_dict["name"] == name and cfg_dict["data"]["dataset"] == dataset


def test_presets_pin_what_they_say():
    debug, _ = compose_config("train", ["experiment=debug"])
    assert (debug.model.embedding_dim, debug.model.hidden_size, debug.data.train_limit) == (48, 96, 6000)
    tutorial, _ = compose_config("train", ["experiment=tatoeba_fr_en_tutorial"])
    assert tutorial.data.tutorial_filter and tutorial.data.heldout_fraction == 0.05
    full, _ = compose_config("train", ["experiment=tatoeba_fr_en"])
    assert not full.data.tutorial_filter
    files, _ = compose_config("train", ["experiment=files", *FILES])
    assert (files.model.embedding_dim, files.model.hidden_size) == (128, 256)  # gru_small
    assert files.data.train.src == "a.de" and files.data.val.tgt == "b.en"
    best, _ = compose_config("train", ["experiment=multi30k_de_en_best"])
    assert (best.optim.name, best.optim.weight_decay, best.optim.lr) == ("adamw", 0.1, 0.002)
    before, _ = compose_config("train", ["experiment=multi30k_de_en_best", "optim=adam", "optim.weight_decay=0"])
    assert (before.optim.name, before.optim.weight_decay, before.optim.min_lr) == ("adam", 0.0, 0.0005)


def test_command_line_overrides_reach_the_dataclasses():
    cfg, cfg_dict = compose_config("train", ["experiment=debug", "model.hidden_size=12", "trainer.max_time=15m",
                                             "optim.betas=[0.8,0.9]"])
    assert cfg.model.hidden_size == 12 and cfg_dict["model"]["hidden_size"] == 12
    assert cfg.trainer.max_seconds == 900.0
    assert cfg.optim.betas == [0.8, 0.9]


@pytest.mark.parametrize("override, key", [
    ("model.hidden_size=-1", "model.hidden_size"),
    ("model.hiden_size=5", "model.hiden_size"),
    ("trainer.max_epochs=abc", "trainer.max_epochs"),
    ("model.dropout=1.5", "model.dropout"),
])
def test_bad_override_fails_cleanly_from_the_console_script(override, key):
    out = run_cli("nmt-train", "experiment=debug", override, timeout=120)
    assert out.returncode != 0
    assert key in out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("nmt: error:")


@pytest.mark.parametrize("value", ["true", "false"])
def test_a_yes_no_given_for_a_choice_is_echoed_as_typed(value, capsys):
    with pytest.raises(SystemExit):
        compose_config("train", ["experiment=debug", f"model.embeddings.freeze={value}"])
    assert capsys.readouterr().err.strip() == (
        f"nmt: error: model.embeddings.freeze={value} is read as a yes/no, but model.embeddings.freeze takes one "
        f"of: none, src, tgt, both.")


def test_a_list_setting_given_one_bare_value_is_shown_with_brackets(capsys):
    with pytest.raises(SystemExit):
        compose_config("evaluate", ["run=x", "eval.ensemble=last"])
    assert capsys.readouterr().err.strip() == ("nmt: error: eval.ensemble takes a list: put the value in brackets, "
                                               "e.g. eval.ensemble=[last], with commas between items.")


def test_unknown_experiment_lists_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main("train", lambda cfg, cfg_dict: None, ["experiment=nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "nope" in err and "debug" in err and "multi30k_de_en" in err and "tatoeba_fr_en_tutorial" in err


@pytest.mark.parametrize("override, key", [
    ("model.dropout=1.5", "model.dropout"),
    ("model.word_dropout=1.0", "model.word_dropout"),
    ("data.vocab.type=wordpiece", "data.vocab.type"),
    ("trainer.max_time=soon", "trainer.max_time"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("model.embeddings.freeze=src", None),  # allowed: no max_norm, no tying
    ("model.tie_embeddings=true", None),
    ("data.src_lang=en", "data.src_lang"),  # the same language on both sides
    ("trainer.val_beam_size=0", "trainer.val_beam_size"),
    ("data.subword_alpha=1.5", "data.subword_alpha"),
    ("data.subword_nbest=1", "data.subword_nbest"),
    ("data.subword_nbest=-1", None),  # sample among all segmentations
    ("trainer.average_from=1.0", "trainer.average_from"),  # would leave nothing to average
    ("trainer.average_from=-0.1", "trainer.average_from"),
    ("trainer.ema_decay=1.0", "trainer.ema_decay"),  # the average would never move
    ("trainer.ema_decay=-0.5", "trainer.ema_decay"),
    ("+model.hiden_size=5", "model.hiden_size"),  # Hydra's + adds any key; nmt refuses those it does not read
    ("+foo=1", "Unknown setting foo"),
    ("trainer.resume=maybe", "Wrong type for trainer.resume"),
    ("trainer.max_epochs=null", "trainer.max_epochs cannot be null"),
    ("model=5", "config group"),  # Hydra raises a ValueError for a group given a number
])
def test_overrides_are_checked_before_any_work(override, key, capsys):
    calls = []
    if key is None:
        main("train", lambda cfg, cfg_dict: calls.append(cfg), ["experiment=debug", override])
        assert len(calls) == 1
        return
    with pytest.raises(SystemExit) as exit_info:
        main("train", lambda cfg, cfg_dict: calls.append(cfg), ["experiment=debug", override])
    assert exit_info.value.code == 2 and not calls
    err = capsys.readouterr().err
    assert key in err and err.startswith("nmt: error:") and len(err.strip().splitlines()) == 1


EMBEDDING_COMBINATIONS = [
    # (overrides, None when allowed, else words the one-line message must hold)
    (["model.tie_embeddings=true", "model.tie_src_tgt=true"], None),  # three-way tying, joint vocabulary
    (["model.tie_src_tgt=true", "data.vocab.joint=false"], ["model.tie_src_tgt", "data.vocab.joint"]),
    (["model.tie_src_tgt=true", "model.embeddings.freeze=src"], ["model.tie_src_tgt", "freeze=src", "none or both"]),
    (["model.tie_src_tgt=true", "model.embeddings.freeze=both"], None),
    (["model.tie_embeddings=true", "model.embeddings.freeze=tgt"], ["model.tie_embeddings", "freeze"]),
    (["model.tie_src_tgt=true", "model.embeddings.src_vectors=a.vec", "model.embeddings.tgt_vectors=b.vec"],
     ["model.tie_src_tgt", "a.vec", "b.vec"]),
    (["model.tie_src_tgt=true", "model.embeddings.src_vectors=a.vec", "model.embeddings.tgt_vectors=a.vec"], None),
    (["model.embeddings.unfreeze_after=100"], ["unfreeze_after", "freeze=none"]),
    (["model.embeddings.unfreeze_after=-1", "model.embeddings.freeze=src"], ["unfreeze_after"]),
    (["model.embeddings.unfreeze_after=100", "model.embeddings.freeze=src"], None),
    (["model.embeddings.sparse=true", "model.tie_embeddings=true"], ["sparse", "tie_embeddings"]),
    (["model.tie_embeddings=true", "model.output_size=512"], ["model.tie_embeddings", "model.output_size=512"]),
    (["model.tie_embeddings=true", "model.output_size=48"], None),  # the debug model's E
    (["model.embeddings.sparse=true", "optim.weight_decay=0.01"], ["sparse", "optim.weight_decay"]),
    (["model.embeddings.sparse=true", "model.tie_src_tgt=true"], None),
    (["model.embeddings.vectors_lowercase=true"], ["vectors_lowercase", "src_vectors"]),
    (["model.embeddings.vectors_subword_mean=true", "model.embeddings.tgt_vectors=b.vec"], None),
    (["model.embeddings.vectors_format=fasttext"], ["vectors_format", "word2vec_binary"]),
]


@pytest.mark.parametrize("overrides, words", EMBEDDING_COMBINATIONS)
def test_embedding_settings_that_cannot_work_are_refused(overrides, words, capsys):
    calls = []
    if words is None:
        main("train", lambda cfg, cfg_dict: calls.append(cfg), ["experiment=debug", *overrides])
        assert len(calls) == 1
        return
    with pytest.raises(SystemExit) as exit_info:
        main("train", lambda cfg, cfg_dict: calls.append(cfg), ["experiment=debug", *overrides])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and not calls
    assert err.startswith("nmt: error:") and len(err.strip().splitlines()) == 1
    for word in words:
        assert word in err


def test_three_way_tying_with_separate_vocabularies_exits_2_from_the_console_script():
    out = run_cli("nmt-train", "experiment=debug", "model.tie_embeddings=true", "model.tie_src_tgt=true",
                  "data.vocab.joint=false", timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("nmt: error: model.tie_src_tgt=true") and "data.vocab.joint=true" in out.stderr


def test_files_experiment_requires_train_and_val_files(capsys):
    with pytest.raises(SystemExit):
        compose_config("train", ["experiment=files"])
    assert "data.train.src" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["evaluate", "translate"])
def test_evaluate_and_translate_require_run(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compose_config(name, [])
    assert exit_info.value.code == 2
    assert "run" in capsys.readouterr().err
    cfg, _ = compose_config(name, ["run=some/dir"])
    assert isinstance(cfg, EvaluateConfig if name == "evaluate" else TranslateConfig)
    assert cfg.run == "some/dir"


def test_evaluate_console_script_without_run_fails_cleanly():
    out = run_cli("nmt-evaluate", timeout=120)
    assert out.returncode == 2
    assert "run=" in out.stderr and "Traceback" not in out.stderr


def test_cfg_flag_prints_the_composed_config_and_does_no_work(capsys):
    main("train", lambda cfg, cfg_dict: pytest.fail("--cfg must not train"),
         ["experiment=debug", "model.hidden_size=7", "--cfg"])
    out = capsys.readouterr().out
    assert "hidden_size: 7" in out and "name: debug" in out

def test_cfg_flag_shows_an_incomplete_config_then_says_what_it_lacks(capsys):
    # experiment=files has no data files until the user names them: --cfg is how they see which keys
    with pytest.raises(SystemExit) as exit_info:
        main("train", lambda cfg, cfg_dict: pytest.fail("--cfg must not train"), ["experiment=files", "--cfg"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "dataset: files" in captured.out and "tsv: null" in captured.out
    assert captured.err.startswith("nmt: error: data.dataset=files needs training data: data.train.src and "
                                   "data.train.tgt (two line-aligned files), or data.train.tsv")
    assert "; and dev data: data.val.src and data.val.tgt" in captured.err  # every missing split at once



@pytest.mark.parametrize("name, says", [("train", "nmt: interrupted before training started, so there is nothing to "
                                                 "resume. Run the same command again"),
                                        ("evaluate", "nmt: interrupted\n")])
def test_ctrl_c_before_the_trainer_runs_says_what_to_do(name, says, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)

    def task(cfg, cfg_dict):
        raise KeyboardInterrupt  # e.g. while SentencePiece trains: the trainer's own handler is not installed yet

    with pytest.raises(SystemExit) as exit_info:
        main(name, task, ["experiment=debug"] if name == "train" else ["run=runs/x"])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.startswith(says)


def test_ctrl_c_while_the_config_is_composed_is_no_traceback_either(capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)

    def compose(*args):
        raise KeyboardInterrupt  # Hydra loads on the first compose: the first second of every command

    monkeypatch.setattr("nmt.cli.compose_config", compose)
    with pytest.raises(SystemExit) as exit_info:
        main("train", lambda cfg, cfg_dict: pytest.fail("nothing was composed"), ["experiment=debug"])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.startswith("nmt: interrupted before training started")


def test_ctrl_c_while_torch_loads_is_held_until_the_import_is_done():
    import signal

    from nmt.cli import ctrl_c_held

    before, finished = signal.getsignal(signal.SIGINT), []
    with pytest.raises(KeyboardInterrupt):
        with ctrl_c_held():
            os.kill(os.getpid(), signal.SIGINT)  # delivered at once, to the held handler
            finished.append(True)
    assert finished and signal.getsignal(signal.SIGINT) is before
    with ctrl_c_held():  # no Ctrl-C: nothing raised
        pass


def test_the_console_scripts_load_torch_and_hydra_only_inside_main():
    # what loads before main runs is not covered by its Ctrl-C handling (the module itself: the standard library
    # alone); --cfg needs no torch at all
    code = ("import sys; import nmt.cli as cli; before = {m for m in ('torch', 'hydra', 'tqdm', 'nmt.config') if m in sys.modules}; "
            "sys.argv = ['nmt-train', 'experiment=debug', '--cfg']; cli.train(); "
            "print(sorted(before), 'torch' in sys.modules, 'hydra' in sys.modules, file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "name: debug" in out.stdout and out.stderr.strip() == "[] False True"


@pytest.mark.parametrize("argv, word", [(["foo"], "foo"), (["--cfg", "job"], "job"),
                                        (["experiment=debug", "trainer.max_steps"], "trainer.max_steps")])
def test_a_word_without_a_value_is_named(argv, word, capsys):
    calls = []
    with pytest.raises(SystemExit) as exit_info:
        main("train", lambda cfg, cfg_dict: calls.append(cfg), argv)
    assert exit_info.value.code == 2 and not calls
    err = capsys.readouterr().err
    assert err.startswith(f"nmt: error: {word!r} is not a setting: give settings as key=value")
    assert "quote" not in err  # not the advice for values with special characters


@pytest.mark.parametrize("name, word, example", [("train", "runs/x", "paths.run_dir=runs/x"),
                                                  ("translate", "runs/debug", "run=runs/debug"),
                                                  ("evaluate", "best", "run=runs/x")])
def test_the_example_for_a_word_without_a_value_is_a_key_of_that_command(name, word, example, capsys):
    with pytest.raises(SystemExit):
        main(name, lambda cfg, cfg_dict: None, [word])
    assert f"(e.g. {example});" in capsys.readouterr().err


def test_options_other_than_cfg_and_help_are_rejected(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main("train", lambda cfg, cfg_dict: pytest.fail("must not train"), ["--epochs", "3"])
    assert exit_info.value.code == 2 and "--epochs" in capsys.readouterr().err


def test_the_error_that_ends_a_run_is_also_in_its_log_file(tmp_path, capsys):
    log_file = tmp_path / "run" / "train.log"

    def task(cfg, cfg_dict):
        setup_logging(log_file)
        logging.getLogger("nmt.data").info("downloading")
        raise NMTError("Could not download train.de.gz.\nPut the file in place by hand.")

    try:
        with pytest.raises(SystemExit) as exit_info:
            main("train", task, [])
    finally:
        setup_logging()  # close the file handler
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "downloading\nnmt: error: Could not download train.de.gz. Put the file in place by hand.\n"
    lines = log_file.read_text(encoding="utf-8").splitlines()
    assert [line.split(" ", 3)[2:] for line in lines] == [
        ["INFO", "downloading"], ["ERROR", "error: Could not download train.de.gz. Put the file in place by hand."]]


# --- cross-field checks in __post_init__ ---------------------------------------------------------------

def test_cross_field_checks():
    with pytest.raises(ConfigError, match="tie_embeddings"):
        TrainConfig(model=ModelConfig(tie_embeddings=True, embeddings=EmbeddingConfig(freeze="tgt")))
    with pytest.raises(ConfigError, match="max_norm"):
        EmbeddingConfig(freeze="src", max_norm=1.0)
    with pytest.raises(ConfigError, match="n_best"):
        DecodeConfig(beam_size=2, n_best=3)
    with pytest.raises(ConfigError, match="beam_size"):
        DecodeConfig(beam_size=0)
    with pytest.raises(ConfigError, match="trainer.device"):
        TrainerConfig(device="gpu")
    TrainConfig(model=ModelConfig(tie_embeddings=True, embeddings=EmbeddingConfig(freeze="src")))  # allowed


@pytest.mark.parametrize("text, seconds", [("90", 90.0), ("90s", 90.0), ("15m", 900.0), ("1.5h", 5400.0),
                                           ("01:30:00", 5400.0), ("2:05", 125.0), (None, None), ("none", None)])
def test_parse_duration(text, seconds):
    assert parse_duration("trainer.max_time", text) == seconds


@pytest.mark.parametrize("text", ["soon", "-5", "0", "1d"])
def test_parse_duration_rejects(text):
    with pytest.raises(ConfigError, match="trainer.max_time"):
        parse_duration("trainer.max_time", text)


@pytest.mark.parametrize("command, variable, user_value, expected", [
    ("train", "LRU_CACHE_CAPACITY", None, "8"), ("train", "ONEDNN_PRIMITIVE_CACHE_CAPACITY", None, "256"),
    ("evaluate", "ONEDNN_PRIMITIVE_CACHE_CAPACITY", None, "8"), ("train", "LRU_CACHE_CAPACITY", "64", "64"),
    ("train", "ONEDNN_PRIMITIVE_CACHE_CAPACITY", "1024", "1024")])
def test_commands_cap_onednn_kernel_caches_unless_the_user_set_them(monkeypatch, command, variable, user_value,
                                                                    expected):
    # bf16 products on a CPU go through oneDNN, whose caches of one kernel per shape grow without this; nmt-train's
    # shapes are few (nmt.precision.row_quantum), so it keeps more kernels than the decoding commands
    monkeypatch.setenv(variable, user_value or "")  # restored after the test
    if user_value is None:
        monkeypatch.delenv(variable)
    seen = []
    argv = ["experiment=debug"] if command == "train" else ["run=runs/none"]
    main(command, lambda cfg, cfg_dict: seen.append(os.environ.get(variable)), argv)
    assert seen == [expected]
