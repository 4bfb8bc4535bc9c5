"""Shared fixtures: the real data directory, a tiny corpus, seeding, and a trained debug run."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Console scripts (nmt-train, ...) must be those of the interpreter running the tests, not whichever
# nmt-train comes first on PATH (another checkout's, say); subprocesses inherit this PATH.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

# Overrides that keep an end-to-end `experiment=debug` run to a few seconds on a CPU. One thread: tests compare the
# weights of runs in different processes bit for bit, and on two threads MKL's tanh made them differ now and then on
# an Intel CPU. nmt/model/activation.py removed that cause; one thread keeps any other from making CI flaky (README,
# "Nothing lost: checkpoints and resuming").
FAST_DEBUG = ["experiment=debug", "data.train_limit=500", "data.val_limit=20", "trainer.max_epochs=1",
              "trainer.device=cpu", "trainer.num_threads=1"]

# A small German-English corpus: enough distinct words for SentencePiece and for batching tests.
TINY_PAIRS = [
    ("Ein Mann fährt Fahrrad.", "A man rides a bike."),
    ("Zwei Hunde spielen im Schnee.", "Two dogs play in the snow."),
    ("Eine Frau liest ein Buch.", "A woman reads a book."),
    ("Kinder spielen im Park.", "Children play in the park."),
    ("Ein Hund läuft über die Wiese.", "A dog runs across the meadow."),
    ("Der Mann trinkt Kaffee.", "The man drinks coffee."),
    ("Eine Katze schläft auf dem Sofa.", "A cat sleeps on the sofa."),
    ("Zwei Männer arbeiten auf einer Baustelle.", "Two men work on a construction site."),
    ("Ein Mädchen isst einen Apfel.", "A girl eats an apple."),
    ("Die Frau singt ein Lied.", "The woman sings a song."),
    ("Ein Junge springt ins Wasser.", "A boy jumps into the water."),
    ("Menschen warten auf den Bus.", "People wait for the bus."),
]


def _data_dir() -> Path:
    configured = os.environ.get("NMT_TEST_DATA_DIR")
    return Path(configured) if configured else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real corpora (multi30k/, tatoeba-eng-fra/): $NMT_TEST_DATA_DIR, else <repo>/../shared/data."""
    path = _data_dir()
    if not (path / "multi30k" / "train.de").is_file():
        pytest.skip(f"no real data at {path}; set NMT_TEST_DATA_DIR to a directory holding multi30k/")
    return path


@pytest.fixture(autouse=True, scope="session")
def isolated_cache(tmp_path_factory):
    """Encoded corpora and SentencePiece models are cached in a temporary folder for the session, never in
    ~/.cache; console scripts run by the tests inherit NMT_CACHE_DIR."""
    previous = os.environ.get("NMT_CACHE_DIR")
    os.environ["NMT_CACHE_DIR"] = str(tmp_path_factory.mktemp("nmt-cache"))
    yield Path(os.environ["NMT_CACHE_DIR"])
    if previous is None:
        os.environ.pop("NMT_CACHE_DIR", None)
    else:
        os.environ["NMT_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def seed_everything():
    """Every test starts from the same random state."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def nmt_logging_reaches_caplog():
    """Undo nmt.console.setup_logging (which in-process train/evaluate calls) so caplog sees nmt's logs."""
    yield
    logger = logging.getLogger("nmt")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> dict:
    """TINY_PAIRS written as train.{de,en} (three copies), val.{de,en} and train.tsv under tmp_path."""
    src = [s for s, _ in TINY_PAIRS]
    tgt = [t for _, t in TINY_PAIRS]
    train_src, train_tgt = src * 3, tgt * 3
    paths = {
        "train_src": tmp_path / "train.de", "train_tgt": tmp_path / "train.en",
        "val_src": tmp_path / "val.de", "val_tgt": tmp_path / "val.en",
        "train_tsv": tmp_path / "train.tsv",
    }
    paths["train_src"].write_text("\n".join(train_src) + "\n", encoding="utf-8")
    paths["train_tgt"].write_text("\n".join(train_tgt) + "\n", encoding="utf-8")
    paths["val_src"].write_text("\n".join(src[:4]) + "\n", encoding="utf-8")
    paths["val_tgt"].write_text("\n".join(tgt[:4]) + "\n", encoding="utf-8")
    paths["train_tsv"].write_text("".join(f"{s}\t{t}\n" for s, t in zip(train_src, train_tgt)), encoding="utf-8")
    return {"paths": paths, "src": train_src, "tgt": train_tgt, "dir": tmp_path}


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a console script (nmt-train, ...) and capture its text output.

    The script beside the running Python is preferred, so `.venv/bin/python -m pytest` tests this
    checkout's install even when another install's nmt-train comes first on PATH.
    """
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([script_path(args[0]), *args[1:]], capture_output=True, text=True, timeout=timeout, env=env)


def script_path(name: str) -> str:
    """A console script of the environment running the tests (beside sys.executable), else `name` on PATH."""
    script = Path(sys.executable).parent / name
    return str(script) if script.is_file() else name


@pytest.fixture(scope="session")
def debug_data(shared_data_dir: Path, tmp_path_factory) -> Path:
    """Small de/en files cut from Multi30k: train (500 pairs), val (30) and test (30)."""
    folder = tmp_path_factory.mktemp("debug_data")
    for split, stem, count in (("train", "train", 500), ("val", "val", 30), ("test", "test_2016_flickr", 30)):
        for lang in ("de", "en"):
            lines = (shared_data_dir / "multi30k" / f"{stem}.{lang}").read_text(encoding="utf-8").splitlines()
            (folder / f"{split}.{lang}").write_text("\n".join(lines[:count]) + "\n", encoding="utf-8")
    return folder


def debug_files_overrides(data: Path) -> list[str]:
    """experiment=debug on the files from `debug_data`, one epoch on the CPU."""
    overrides = ["experiment=debug", "data.dataset=files", "data.src_lang=de", "data.tgt_lang=en",
                 "trainer.max_epochs=1", "trainer.device=cpu"]
    for split in ("train", "val", "test"):
        overrides += [f"data.{split}.src={data / f'{split}.de'}", f"data.{split}.tgt={data / f'{split}.en'}"]
    return overrides


@pytest.fixture(scope="session")
def debug_run(debug_data: Path, tmp_path_factory) -> Path:
    """One trained de->en debug run on `debug_data` (its val split has 30 pairs), shared by the
    evaluate and translate tests; treat it as read-only (copy it to change it)."""
    run_dir = tmp_path_factory.mktemp("debug_run") / "run"
    out = run_cli("nmt-train", *debug_files_overrides(debug_data), f"paths.run_dir={run_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir
