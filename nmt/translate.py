"""nmt-translate: translate a file, a pipe, or sentences typed at a prompt.

Piped or file input gives exactly one output line per input line, in order (with `translate.n_best=N`,
N lines per input line, best first, an empty line where the search found fewer): an empty line gives an
empty line, invalid UTF-8 and control characters are cleaned rather than fatal, and an over-long
line is cut to `translate.max_src_len` pieces with a warning.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import torch

from nmt.config import TranslateConfig, TranslateOptions
from nmt.console import setup_logging
from nmt.data.corpus import clean_line
from nmt.decoding import Translation, hypothesis_texts, translate_sentences
from nmt.errors import NMTError
from nmt.plots import plot_attention
from nmt.run import TrainedRun, load_trained, make_directory
from nmt.runtime import keep_freed_memory, pick_device

log = logging.getLogger(__name__)
CHUNK_LINES = 256  # lines read before translating, so a pipe streams


@dataclass
class Session:
    run: TrainedRun
    options: TranslateOptions
    device: torch.device
    show_attention: bool = False
    lines_seen: int = 0  # input lines translated so far, to number warnings and heatmaps

    def translate(self, lines: list[str]) -> list[Translation]:
        cleaned = [clean_line(line) for line in lines]
        limit = self.options.max_src_len
        for number, pieces in enumerate(self.run.vocab.encode(cleaned, "src")):
            if len(pieces) > limit:
                log.warning("input line %d has %d pieces; translating its first %d (translate.max_src_len)",
                            self.lines_seen + number + 1, len(pieces), limit)
        keep_attention = self.show_attention or self.options.attention_dir is not None
        results = translate_sentences(self.run.model, self.run.vocab, cleaned, self.options, self.device,
                                      max_src_len=limit, keep_attention=keep_attention)
        if self.options.attention_dir is not None:
            for result in results:
                self.lines_seen += 1
                if result.hypotheses:
                    plot_attention(result.src_pieces, result.tgt_pieces, result.hypotheses[0].attention,
                                   Path(self.options.attention_dir) / f"{self.lines_seen:05d}.png")
        else:
            self.lines_seen += len(results)
        return results


def _read_chunks(stream: IO[bytes]) -> Iterator[list[str]]:
    """Lines split on b"\\n" only, decoded leniently (a bad byte becomes U+FFFD), in chunks."""
    chunk = []
    for raw in stream:
        chunk.append(raw.rstrip(b"\n").rstrip(b"\r").decode("utf-8", errors="replace"))
        if len(chunk) == CHUNK_LINES:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def nbest_texts(session: Session, result: Translation) -> list[str]:
    """The translation's `n_best` hypotheses as text, best first; padded with "" to exactly n_best lines."""
    n = session.options.n_best
    texts = hypothesis_texts(session.run.vocab, result)[:n]
    return texts + [""] * (n - len(texts))


def translate_stream(session: Session, source: IO[bytes], sink: IO[str]) -> int:
    count = 0
    for chunk in _read_chunks(source):
        for result in session.translate(chunk):
            lines = nbest_texts(session, result) if session.options.n_best > 1 else [result.text]
            sink.write("".join(line + "\n" for line in lines))
        sink.flush()
        count += len(chunk)
    return count


def attention_text(src_pieces: list[str], tgt_pieces: list[str], weights: torch.Tensor) -> str:
    """The attention matrix as text: a column per source piece, a row per target piece, weights in %."""
    width = max(4, min(10, max(len(p) for p in src_pieces) + 1))
    label = max(len(p) for p in tgt_pieces) + 1
    header = " " * label + "".join(p[:width - 1].rjust(width) for p in src_pieces)
    rows = [header]
    for piece, row in zip(tgt_pieces, weights.tolist()):
        cells = "".join((f"{round(100 * w)}" if w >= 0.005 else ".").rjust(width) for w in row)
        rows.append(piece.ljust(label) + cells)
    return "\n".join(rows)


HELP = """Type a sentence and press Enter to translate it. Commands:
  :attn      show or hide the attention matrix (percent of attention on each source piece)
  :beam N    set the beam size (1 = greedy)
  :help      this list
  :quit      leave (Ctrl-D also leaves; Ctrl-C clears the line)"""


def interactive(session: Session) -> None:
    try:
        import readline  # noqa: F401 - gives input() line editing and history
    except ImportError:
        readline = None
    history = Path.home() / ".nmt_history"
    if readline is not None and history.exists():
        readline.read_history_file(history)
    members = f" + {len(session.run.ensemble)} more" if session.run.ensemble else ""
    print(f"nmt: {session.run.files.run_dir} ({session.run.checkpoint.name}{members}), "
          f"beam {session.options.beam_size}. Type :help for commands.")
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            break
        except KeyboardInterrupt:
            print()
            continue
        if not line.strip():
            continue
        if line.strip().startswith(":"):
            if not _command(session, line.strip()):
                break
            continue
        result = session.translate([line])[0]
        if session.options.n_best > 1:
            for rank, text in enumerate(nbest_texts(session, result), 1):
                hyp = result.hypotheses[rank - 1] if rank <= len(result.hypotheses) else None
                print(f"{rank}. {text}" + (f"  (score {hyp.score:.3f})" if hyp is not None else ""))
        else:
            print(result.text)
        if session.show_attention and result.hypotheses:
            print(attention_text(result.src_pieces, result.tgt_pieces, result.hypotheses[0].attention))
    if readline is not None:
        try:
            readline.write_history_file(history)
        except OSError:
            pass


def _command(session: Session, command: str) -> bool:
    """Run one ':' command; False means leave."""
    name, _, argument = command.partition(" ")
    if name in (":quit", ":q", ":exit"):
        return False
    if name == ":attn":
        session.show_attention = not session.show_attention
        print(f"attention display {'on' if session.show_attention else 'off'}")
    elif name == ":beam":
        if argument.strip().isdigit() and int(argument) >= 1:
            session.options.beam_size = int(argument)
            session.options.n_best = min(session.options.n_best, session.options.beam_size)
            shown = f", {session.options.n_best} best shown" if session.options.n_best > 1 else ""
            print(f"beam size {session.options.beam_size}{shown}")
        else:
            print("usage: :beam N, with N a whole number of at least 1")
    elif name == ":help":
        print(HELP)
    else:
        print(f"unknown command {name}; type :help")
    return True


def open_output(path: str) -> IO[str]:
    try:
        return open(path, "w", encoding="utf-8")
    except OSError as error:
        raise NMTError(f"translate.output={path}: cannot write there ({error.strerror}). Give a file path whose "
                       f"directory exists and that you can write to.") from None


def translate(cfg: TranslateConfig, cfg_dict: dict | None = None) -> None:
    setup_logging()
    keep_freed_memory()  # as nmt-train does (trainer.keep_freed_memory): the search reuses mapped pages
    device = pick_device(cfg.device, "device")
    options = cfg.translate
    if options.attention_dir is not None:
        make_directory(Path(options.attention_dir), "translate.attention_dir")
    if options.input is not None and not Path(options.input).is_file():  # before the minutes spent loading
        what = "is a directory, not a file" if Path(options.input).is_dir() else "does not exist"
        raise NMTError(f"translate.input={options.input} {what}. Check the path (relative paths start from "
                       f"{Path.cwd()}), or leave translate.input out to translate standard input.")
    session = Session(load_trained(cfg.run, options.checkpoint, device, options.ensemble), options, device)
    if options.input is None and options.output is None and sys.stdin.isatty():
        interactive(session)
        return
    source = sys.stdin.buffer
    if options.input is not None:
        source = open(Path(options.input), "rb")
    sink = sys.stdout if options.output is None else open_output(options.output)
    try:
        count = translate_stream(session, source, sink)
    finally:
        if source is not sys.stdin.buffer:
            source.close()
        if sink is not sys.stdout:
            sink.close()
    if options.output is not None:
        log.info("translated %d lines into %s", count, options.output)
