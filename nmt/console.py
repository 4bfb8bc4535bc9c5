"""Console output: logging that does not break tqdm bars, and the run's log file."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

FORMAT = "%(asctime)s %(levelname)s %(message)s"
ONCE = {"once": True}  # log.warning(..., extra=ONCE): said once per command, however often it recurs


class SayOnce(logging.Filter):
    """Drops a record marked with extra=ONCE whose text was already logged. The training text is read
    twice (for SentencePiece, then to encode it), and a warning about one of its lines would otherwise
    come twice; setup_logging starts each command with a fresh one."""

    def __init__(self) -> None:
        super().__init__()
        self.said: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "once", False):
            return True
        if not hasattr(record, "first_time"):  # decided once per record, for all the handlers
            text = record.getMessage()
            record.first_time = text not in self.said
            self.said.add(text)
        return record.first_time


class TqdmHandler(logging.StreamHandler):
    """Writes log lines above any active tqdm bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def setup_logging(log_file: Path | None = None, level: int = logging.INFO) -> None:
    root = logging.getLogger("nmt")
    root.setLevel(level)
    root.propagate = False
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    once = SayOnce()  # one for both handlers: what the console dropped, the file drops too
    console = TqdmHandler()
    console.setFormatter(logging.Formatter("%(message)s"))
    console.addFilter(once)
    root.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(FORMAT, "%Y-%m-%d %H:%M:%S"))
        file_handler.addFilter(once)
        root.addHandler(file_handler)


def log_to_file(text: str, level: int = logging.ERROR) -> None:
    """Write `text` to the run's log file alone (the console has it already), e.g. the error that ended the run."""
    root = logging.getLogger("nmt")
    record = root.makeRecord(root.name, level, __file__, 0, text, None, None)
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


class _Keeper(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def kept_records() -> Iterator[list[logging.LogRecord]]:
    """What is logged inside the block (to the console as usual), kept for the run's log file, which is
    not open yet: hand the records to log_records_to_file once it is."""
    keeper, root = _Keeper(), logging.getLogger("nmt")
    root.addHandler(keeper)
    try:
        yield keeper.records
    finally:
        root.removeHandler(keeper)


def log_records_to_file(records: list[logging.LogRecord]) -> None:
    for record in records:
        log_to_file(record.getMessage(), record.levelno)
