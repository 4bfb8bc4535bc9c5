"""The run directory: where each file lives, the saved config, and the rules for reusing a directory."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from omegaconf import OmegaConf

from nmt.checkpoint import load_checkpoint, previous_path
from nmt.config import TrainConfig
from nmt.data.vocab import Vocab
from nmt.errors import NMTError
from nmt.model.ensemble import Ensemble
from nmt.model.seq2seq import Seq2Seq, build_model

log = logging.getLogger(__name__)

# Settings that shape the model or its vocabulary: a resumed run must keep them ...
FIXED_ON_RESUME = ("data", "model")
# ... except these, which change how the work is done but not its result.
FREE_ON_RESUME = ("data.encode_workers",)
# ... and these, read only when a run starts: a resume takes the weights from its checkpoint, so the file
# may have moved or gone (the run's config.yaml keeps the path it started from).
READ_AT_START = ("model.embeddings.src_vectors", "model.embeddings.tgt_vectors")


@dataclass(frozen=True)
class RunFiles:
    run_dir: Path

    @property
    def config(self) -> Path:
        return self.run_dir / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def log(self) -> Path:
        return self.run_dir / "train.log"

    def checkpoint(self, name: str) -> Path:
        return self.run_dir / "checkpoints" / f"{name}.pt"

    def segmentation(self, epoch: int) -> Path:
        """The training pieces of epoch `epoch` (0-based) under data.subword_alpha."""
        return self.run_dir / "segmentation" / f"epoch-{epoch + 1:04d}.npz"

    def segmentations(self) -> list[Path]:
        return sorted((self.run_dir / "segmentation").glob("epoch-*.npz"))

    def has_checkpoint(self) -> bool:
        """Whether there is a last.pt (or the last.pt it replaced) to resume from."""
        return self.checkpoint("last").exists() or previous_path(self.checkpoint("last")).exists()

    def validation_checkpoints(self) -> list[Path]:
        """The kept checkpoints/val-STEP.pt (trainer.keep_checkpoints), oldest first."""
        return sorted((self.run_dir / "checkpoints").glob("val-*.pt"))


def read_config(files: RunFiles) -> dict:
    if not files.config.exists():
        raise NMTError(f"{files.run_dir} is not a training run: it has no config.yaml. Pass run=DIR with the "
                       f"paths.run_dir of a run made by nmt-train.")
    try:
        with open(files.config, encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
    except OSError as error:
        raise NMTError(f"{files.config} cannot be read ({error.strerror}). It should be the file of settings that "
                       f"nmt-train wrote; check its permissions, or pass run=DIR with another run.") from None
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise NMTError(f"{files.config}{where} is not valid YAML, so the run's settings cannot be read. nmt-train "
                       f"writes this file; restore it (a copy made by another run of the same command will do), "
                       f"or train the run again.") from None
    if not isinstance(config, dict):
        raise NMTError(f"{files.config} does not hold the run's settings (a mapping of sections). nmt-train writes "
                       f"this file; restore it, or train the run again.")
    return config


def make_directory(path: Path, key: str) -> None:
    """mkdir -p for a directory the user named with `key`; a path that cannot be one is the user's to fix."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise NMTError(f"{key}={path}: cannot make that directory ({error.strerror}). Choose a path that is not a "
                       f"file and whose parent you can write to.") from None


def prepare_output_file(path: Path, key: str) -> None:
    """Before any work, make the directory of a file the user named with `key`, or refuse a path that could
    not be written: a directory, one under a file, or one in a read-only directory."""
    if path.is_dir():
        raise NMTError(f"{key}={path} is a directory; give the path of a file to write.")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise NMTError(f"{key}={path}: cannot make its directory {path.parent} ({error.strerror}). Choose a path "
                       f"that is not under a file and whose parent you can write to.") from None
    probe = path.parent / f".{path.name}.{os.getpid()}.probe"  # a real write: os.access says yes for root, or /proc
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as error:
        raise NMTError(f"{key}={path}: cannot write in {path.parent} ({error.strerror}). Choose another path.") from None


def write_config(files: RunFiles, cfg_dict: dict) -> None:
    files.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = files.config.with_name(".config.yaml.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        yaml.safe_dump(cfg_dict, handle, sort_keys=False, allow_unicode=True)
    os.replace(tmp, files.config)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return keys


def absolute_data_paths(data: dict) -> dict:
    """The data section with the files of the own-data splits (data.train.src, ...) as absolute paths, so that
    config.yaml finds them from any working directory and a resume compares files, not spellings."""
    data = dict(data)
    for split in ("train", "val", "test"):
        if isinstance(data.get(split), dict):
            data[split] = {key: str(Path(value).absolute()) if key in ("src", "tgt", "tsv") and value else value
                           for key, value in data[split].items()}
    return data


def check_resumable(files: RunFiles, resume: bool, cfg_dict: dict) -> bool:
    """Refuse to reuse a directory that holds another run unless resuming; True when a checkpoint is resumed."""
    if not files.config.exists():
        if resume:
            log.warning("trainer.resume=true but %s holds no run yet; starting from the beginning", files.run_dir)
        return False
    if not resume:
        raise NMTError(
            f"The run directory {files.run_dir} already holds a run (config.yaml). Continue it with "
            f"trainer.resume=true, or choose a new paths.run_dir; nothing was overwritten."
        )
    saved = read_config(files)
    saved["data"] = absolute_data_paths(saved.get("data", {}))  # runs of earlier versions kept them as typed
    started = files.has_checkpoint()
    free = (*FREE_ON_RESUME, *READ_AT_START) if started else FREE_ON_RESUME
    changed = [d for section in FIXED_ON_RESUME for d in _differences(saved.get(section, {}), cfg_dict[section], f"{section}.")
               if not d.startswith(tuple(f"{key} " for key in free))]
    if changed:
        raise NMTError(
            f"Cannot resume {files.run_dir} with different data or model settings: {'; '.join(changed)}. "
            f"Resume with the original settings, or start a new run in another paths.run_dir."
        )
    if not started:
        log.warning("%s has no checkpoint yet; starting from the beginning", files.run_dir)
        return False
    embeddings, started_with = cfg_dict["model"]["embeddings"], saved.get("model", {}).get("embeddings", {})
    for key in READ_AT_START:  # the record keeps the files the run started from
        name = key.rsplit(".", 1)[1]
        embeddings[name] = started_with.get(name)
    return True


@dataclass
class TrainedRun:
    """A run directory loaded for use: its config, vocabulary and model (in eval mode)."""

    files: RunFiles
    config: TrainConfig
    vocab: Vocab
    model: Seq2Seq | Ensemble
    checkpoint: Path
    ensemble: list[Path] = field(default_factory=list)  # the other members' checkpoints, when model is an Ensemble


def checkpoint_path(files: RunFiles, name: str) -> Path:
    """best | last | step0 | averaged (scripts/average_checkpoints.py), another checkpoint of the run by
    name (val-00003420), or a path to a .pt file."""
    named = files.checkpoint(name)
    if name in ("best", "last", "step0", "averaged") or named.is_file():
        return named
    in_run = files.run_dir / "checkpoints" / name  # the file name as listed there: last.pt, val-00003420.pt
    return in_run if not Path(name).is_file() and in_run.is_file() else Path(name)


def load_trained(run_dir: str | Path, checkpoint: str, device, ensemble: Sequence[str] = ()) -> TrainedRun:
    """Rebuild the model from a run's saved config and load a checkpoint's weights into it; with
    `ensemble`, more checkpoints of the run, each into a model of its own, decoding as one Ensemble."""
    files = RunFiles(Path(run_dir))
    if not files.run_dir.is_dir():
        what = "is a file, not a directory" if files.run_dir.exists() else "does not exist"
        raise NMTError(f"The run directory {files.run_dir} {what}. Pass run=DIR with a directory made by nmt-train "
                       f"(its paths.run_dir).")
    saved = read_config(files)
    try:
        config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), saved))
    except Exception as error:  # noqa: BLE001 - any schema mismatch means the file is not ours
        raise NMTError(f"{files.config} does not match this version of nmt ({str(error).splitlines()[0]}).") from None
    vocab = Vocab.load(files.run_dir, config.data.vocab.joint)
    paths = [checkpoint_path(files, name) for name in [checkpoint, *ensemble]]
    models = [_load_model(files, config, vocab, path, device) for path in paths]
    model = Ensemble(models) if ensemble else models[0]
    return TrainedRun(files, config, vocab, model, paths[0], paths[1:])


def _load_model(files: RunFiles, config: TrainConfig, vocab: Vocab, path: Path, device) -> Seq2Seq:
    if not path.exists():
        raise NMTError(f"The checkpoint {path} does not exist; has the run {files.run_dir} saved one yet? "
                       f"Choose another with eval.checkpoint or eval.ensemble (nmt-evaluate), translate.checkpoint or "
                       f"translate.ensemble (nmt-translate), or checkpoint (nmt-embeddings): best, last, averaged or "
                       f"step0 (or a file in {files.run_dir / 'checkpoints'}).")
    state = load_checkpoint(path, map_location="cpu")
    model = build_model(config.model, vocab.size("src"), vocab.size("tgt"))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        details = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]  # after "Error(s) in ...:"
        shown = "; ".join(details[:3])[:600] or str(error).strip()[:300]
        raise NMTError(f"The checkpoint {path} does not fit the model of {files.config} ({shown}): choose a "
                       f"checkpoint written by this run.") from None
    return model.to(device).eval()
