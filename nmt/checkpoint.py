"""Checkpoints: written atomically, loaded with weights_only=True so loading never runs code.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts: "model" holds the
model's state_dict, beside the optimizer, scheduler and RNG states, the counters and the config.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from nmt.errors import NMTError

log = logging.getLogger(__name__)


def previous_path(path: Path) -> Path:
    """Where the checkpoint that `path` replaced is kept: last.pt -> last.prev.pt."""
    return Path(path).with_name(f"{Path(path).stem}.prev{Path(path).suffix}")


def save_checkpoint(state: dict[str, Any], path: Path, keep_previous: bool = False) -> None:
    """Write to a temporary file beside `path`, fsync it, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a torn one. With
    `keep_previous`, the file being replaced is first moved to `previous_path(path)`, so that a
    checkpoint damaged later (say, by a disk fault) still has a good predecessor.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise NMTError(
            f"Could not write the checkpoint {path} ({error.strerror or error}). The previous checkpoint is "
            f"untouched. Free some disk space (or fix the permissions) and resume with trainer.resume=true."
        ) from None


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open directories; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _unpickler_reason(detail: str) -> str:
    """torch's multi-paragraph weights-only message -> its one line that says what failed (not its advice)."""
    lines = [line.strip() for line in detail.splitlines() if line.strip()]
    refused = [line for line in lines if "GLOBAL" in line]
    after = [line for i, line in enumerate(lines) if i and lines[i - 1].endswith("WeightsUnpickler error:")]
    return (refused or after or lines or ["unknown error"])[0][:200]


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without unpickling arbitrary objects; any problem is a clear NMTError."""
    path = Path(path)
    if not path.exists():
        raise NMTError(f"The checkpoint {path} does not exist.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _unpickler_reason(str(error))
        if "GLOBAL" not in reason:  # no class or function refused: damaged bytes, or a pickle form it cannot read
            raise NMTError(f"The checkpoint {path} cannot be read safely: it is truncated or corrupted, or was not "
                           f"written by nmt (torch's weights-only loader stopped at: {reason}). Nothing in it was "
                           f"run.") from None
        raise NMTError(
            f"Refused to load {path}: it holds objects other than tensors and plain data, so loading it could "
            f"run code ({reason}). Only load checkpoints written by nmt."
        ) from None
    except Exception as error:  # noqa: BLE001 - torch raises many types for a damaged file
        reason = (str(error).strip() or type(error).__name__).splitlines()[0].split(". ")[0][:200]
        raise NMTError(f"The checkpoint {path} is truncated or corrupted ({reason}).") from None
    if not isinstance(state, dict) or "model" not in state:
        raise NMTError(f"{path} is not an nmt checkpoint (no 'model' entry).")
    return state


def load_latest(path: Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path]:
    """Load `path`, or, when it is missing or damaged, the checkpoint it replaced (saying so)."""
    try:
        return load_checkpoint(path, map_location), Path(path)
    except NMTError as error:
        previous = previous_path(path)
        if not previous.exists():
            raise
        log.warning("%s Falling back to the previous checkpoint, %s.", error, previous)
        try:
            return load_checkpoint(previous, map_location), previous
        except NMTError as second:
            raise NMTError(f"{error} {second} Neither can be resumed: restore {Path(path).name} from a copy, or start a new "
                           f"run in another paths.run_dir (best.pt and the kept val-STEP.pt of this one can still be "
                           f"evaluated).") from None


def average_weights(paths: list[Path]) -> dict[str, Any]:
    """A model-only checkpoint whose floating-point weights are the mean of those of `paths` (summed in
    float64); other tensors, `step` and `config` come from the last of them, and `averaged_from` and
    `averaged_steps` name the checkpoints averaged and the steps they were written at."""
    return average_states([load_checkpoint(path) for path in paths], [path.name for path in paths])


def average_states(states: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """`average_weights` of checkpoints already loaded (`names`: their file names)."""
    newest = states[-1]
    averaged = {}
    for key, tensor in newest["model"].items():
        if not tensor.is_floating_point():
            averaged[key] = tensor
            continue
        total = sum(state["model"][key].double() for state in states)
        averaged[key] = (total / len(states)).to(tensor.dtype)
    return {"model": averaged, "step": newest.get("step"), "config": newest.get("config"),
            "averaged_from": names, "averaged_steps": [state.get("step") for state in states]}
