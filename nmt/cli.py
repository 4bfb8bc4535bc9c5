"""The console scripts nmt-train, nmt-evaluate, nmt-translate and nmt-embeddings.

Each composes its Hydra config (`configs/<name>.yaml` against the schemas in nmt.config) from
`key=value` overrides, turns it into dataclasses, and calls one function. A user's mistake (a bad
key, value, file or directory) ends with one paragraph on stderr and exit status 2, no traceback.
Under torchrun every rank composes the same config and agrees on most errors, so rank 0 alone
prints them; an error of one rank's own is printed by that rank, naming it.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import re
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from nmt import cpuload
from nmt.errors import NMTError

EXIT_USER_ERROR = 2
INTERRUPTED = {"train": " before training started, so there is nothing to resume. Run the same command again: what "
                        "the data preparation finished (SentencePiece models, the encoded training data) is cached "
                        "and reused."}

USAGE = """usage: nmt-{name} [key=value ...] [--cfg] [--help]

Settings are Hydra overrides, e.g.
  nmt-train experiment=debug paths.data_dir=../shared/data paths.run_dir=runs/debug
  nmt-train model.hidden_size=256 trainer.max_time=30m
  nmt-evaluate run=runs/debug eval.beam_size=5
  nmt-translate run=runs/debug < input.txt > output.txt
  nmt-embeddings run=runs/debug query=Hund side=src k=10 checkpoint=step0
--cfg prints the composed config and exits. Config groups: {groups}
"""


def torchrun_rank() -> int:
    """This process's rank under torchrun (RANK), 0 otherwise."""
    rank = os.environ.get("RANK", "0")
    return int(rank) if rank.isdigit() else 0


def print_error(message: str, label: str = "error") -> None:
    """Print the message as one paragraph, and keep it in the run's log file (train.log) when there is one."""
    text = " ".join(line.strip() for line in str(message).strip().splitlines() if line.strip())
    print(f"nmt: {label}: {text}", file=sys.stderr)
    _to_log_file(f"{label}: {text}", logging.ERROR if label == "error" else logging.WARNING)


def _to_log_file(text: str, level: int) -> None:
    from nmt.console import log_to_file  # here, not with the module: it loads tqdm

    log_to_file(text, level)


def fail(message: str, exit_code: int = EXIT_USER_ERROR, label: str = "error") -> None:
    """Print a user-facing error as one paragraph (on rank 0 only: the others hit the same error) and exit."""
    if torchrun_rank() == 0:
        print_error(message, label)
    sys.exit(exit_code)


def _describe_config_error(error: Exception) -> str:
    """Hydra/OmegaConf's multi-line message -> one sentence that names the key and what to do."""
    text = " ".join(str(e) for e in (error, error.__cause__) if e is not None)
    full_key = re.search(r"full_key: (\S+)", text)
    key = full_key.group(1) if full_key else None
    if "not in" in text and key and re.search(r"Key '[^']+' not in", text):
        return (f"Unknown setting {key}: there is no such key. Check its spelling; "
                f"nmt-{{name}} --cfg prints every setting with its current value.")
    converted = re.search(r"Value '([^']*)' of type '\w+' could not be converted to (\w+)", text) or \
        re.search(r"Value '([^']*)' is not a valid (\w+)", text)
    if converted and key:
        return f"Wrong type for {key}: {converted.group(1)!r} is not a valid {converted.group(2).lower()}."
    if "is not a ListConfig, list or tuple" in text and key:
        given = re.search(r"override \S+?=(\S+)", text)
        example = f"{key}=[{given.group(1)}]" if given else f"{key}=[a,b]"
        return f"{key} takes a list: put the value in brackets, e.g. {example}, with commas between items."
    if "is not Optional" in text and key:
        return f"{key} cannot be null: give it a value (nmt-{{name}} --cfg shows its default)."
    group = re.search(r"Config group override must be a string or a list\. Got (\w+)", text)
    if group:
        given = "null" if group.group(1) == "NoneType" else f"a value of type {group.group(1)}"
        return (f"A config group takes the name of one of its options, not {given}; nmt-{{name}} --help "
                f"lists the groups and their options.")
    unparsed = re.search(r"LexerNoViableAltException: (\S+)|Error parsing override '([^']*)'", text)
    if unparsed:
        override = unparsed.group(1) or unparsed.group(2)
        key = override.split("=", 1)[0]
        return (f"Could not read the override {override!r}: quote a value that holds characters such as \u2581, "
                f"brackets or signs, e.g. {key}='...' inside double quotes on the shell.")
    missing_option = re.search(r"Could not find '([^']+)'\s+Available options in '([^']+)':\s*(.*?)\s*Config search path", text, re.S)
    if missing_option:
        options = ", ".join(missing_option.group(3).split())
        return f"There is no {missing_option.group(2)} called {missing_option.group(1).split('/')[-1]!r}; choose one of: {options}."
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.strip().startswith(("object_type", "reference_type", "To append"))]
    return " ".join(lines) + " See --help for usage."


def unknown_keys(typed: object, plain: dict, prefix: str = "") -> list[str]:
    """Keys of the composed config that its dataclass does not have (Hydra's +key=value adds any key)."""
    if not dataclasses.is_dataclass(typed) or not isinstance(plain, dict):
        return []  # a free mapping or a value: any key goes
    fields = {field.name for field in dataclasses.fields(typed)}
    unknown = []
    for key, value in plain.items():
        if key not in fields:
            unknown.append(prefix + str(key))
        else:
            unknown += unknown_keys(getattr(typed, key), value, f"{prefix}{key}.")
    return unknown


def compose_config(name: str, overrides: list[str], show: bool = False):
    """Compose configs/<name>.yaml with overrides -> (dataclass config, plain dict). show: print the
    composed config first, before any check, so that --cfg shows even a config that is not complete yet
    (experiment=files before its data keys are set) and what to fill in."""
    # imported here, not with the module, so that Ctrl-C in the first second of a command reaches main's handler;
    # held until the import ends: raised inside omegaconf's set-up it surfaced as an unrelated AttributeError
    with ctrl_c_held():
        from hydra import compose, initialize_config_module
        from hydra.core.config_store import ConfigStore
        from hydra.errors import HydraException
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        from nmt.config import EvaluateConfig, InspectConfig, TrainConfig, TranslateConfig

    schemas = {"train": TrainConfig, "evaluate": EvaluateConfig, "translate": TranslateConfig,
               "embeddings": InspectConfig}
    store = ConfigStore.instance()
    for schema_name, schema in schemas.items():
        store.store(name=f"{schema_name}_schema", node=schema)
    try:
        with initialize_config_module(config_module="nmt.configs", version_base=None):
            cfg = compose(config_name=name, overrides=overrides)
        if show:
            print(OmegaConf.to_yaml(cfg))
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            fail(f"Missing required setting(s): {', '.join(missing)}. Add e.g. {missing[0]}=... to the command.")
        typed, plain = OmegaConf.to_object(cfg), OmegaConf.to_container(cfg, resolve=True)
        unknown = unknown_keys(typed, plain)
        if unknown:
            fail(f"Unknown setting {unknown[0]}: there is no such key (an override that starts with + adds a key, "
                 f"but nmt reads only its own). Check its spelling; nmt-{name} --cfg prints every setting with its "
                 f"current value.")
        return typed, plain
    except NMTError as error:
        fail(str(error))
    except ValueError as error:
        if "Config group override" not in str(error):  # Hydra's one ValueError for an override; others are bugs
            raise
        fail(_describe_config_error(error).replace("{name}", name))
    except (HydraException, OmegaConfBaseException) as error:
        cause = error.__cause__ or error.__context__
        if isinstance(cause, NMTError):  # raised by a schema's __post_init__ inside OmegaConf
            fail(str(cause))
        fail(_describe_config_error(error).replace("{name}", name))


def _groups(name: str) -> str:
    if name != "train":
        return "none"
    from importlib import resources

    root = resources.files("nmt.configs")
    groups = []
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.is_dir() and not entry.name.startswith("_"):
            options = sorted(f.name[:-5] for f in entry.iterdir() if f.name.endswith(".yaml"))
            groups.append(f"{entry.name}={{{','.join(options)}}}")
    return " ".join(groups)


# torch's cache of oneDNN matrix-product objects (ideep's) and oneDNN's own cache of compiled kernels
KERNEL_CACHES = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")
# oneDNN kernels that nmt-train keeps: its bf16 products come in few shapes (nmt.precision.row_quantum), and
# each kept kernel spares the 1-20 ms of making it again (docs/speed.md)
TRAIN_KERNELS = 256


def limit_kernel_caches(kernels: int = 8) -> None:
    """Keep torch's oneDNN product objects for the last 8 shapes, and oneDNN's kernels for the last `kernels`
    (both default to 1,024).

    On a CPU, torch runs bf16 matrix products through oneDNN, and for every new combination of shapes
    it builds and caches a kernel, in two caches, each entry with its own memory. Length-bucketed
    batches and a beam that shrinks as sentences finish bring new shapes all the time, so the caches
    only grow: the 60-minute recipe in bf16 reached a peak RSS of 7.7 GB. nmt-train's products now
    come in a few hundred shapes, and it keeps TRAIN_KERNELS kernels (about 4 MB each); decoding's
    shapes are not rounded, and the other commands keep 8 (README, "Memory in bf16 on a CPU"). fp32,
    through MKL, stays flat either way. Both are read when the first such kernel is built, so this runs
    before the task; a value the user has set is left alone.
    """
    for name, capacity in zip(KERNEL_CACHES, (8, kernels)):
        os.environ.setdefault(name, str(capacity))


def main(name: str, task: Callable, argv: list[str] | None = None) -> None:
    """Compose the config from argv and call task(cfg, cfg_dict); a user's mistake, or Ctrl-C at any point
    from here on (importing hydra and torch included), ends with one paragraph and the exit status, never a
    traceback. Before main runs, only this module, nmt.errors and nmt.cpuload load (the standard library
    alone)."""
    try:
        _main(name, task, argv)
    except KeyboardInterrupt:  # in nmt-train, only before training starts: the trainer handles it after
        if torchrun_rank() == 0:
            print(f"nmt: interrupted{INTERRUPTED.get(name, '')}", file=sys.stderr)
            _to_log_file("interrupted", logging.WARNING)
        sys.exit(130)


def _main(name: str, task: Callable, argv: list[str] | None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(USAGE.format(name=name, groups=_groups(name)))
        return
    show = "--cfg" in argv
    overrides = [a for a in argv if a != "--cfg"]
    for arg in overrides:
        if arg.startswith("-"):
            fail(f"Unknown option {arg!r}. Settings are given as key=value; see --help.")
        if "=" not in arg and not arg.startswith("~"):  # ~key deletes a setting; anything else needs a value
            example = "paths.run_dir=runs/x" if name == "train" else f"run={arg if '/' in arg else 'runs/x'}"
            fail(f"{arg!r} is not a setting: give settings as key=value (e.g. {example}); "
                 f"--cfg (alone) prints the composed config, and --help lists the config groups.")
    cfg, cfg_dict = compose_config(name, overrides, show)
    if show:  # printed, and it passed the checks
        return
    limit_kernel_caches(TRAIN_KERNELS if name == "train" else 8)  # before any bf16 work (see there)
    try:
        task(cfg, cfg_dict)
    except NMTError as error:
        rank = torchrun_rank()
        if rank and not error.every_rank:  # this rank's own failure: rank 0 cannot know why
            print_error(f"(rank {rank}) {error}", error.label)
            sys.exit(error.exit_code)
        fail(str(error), error.exit_code, error.label)


def _imported_when_called(module: str, function: str) -> Callable:
    """The task module.function, imported (and torch with it) only once the config is composed, inside main's
    handling of Ctrl-C; --help and --cfg never import torch."""
    def task(cfg, cfg_dict):
        with ctrl_c_held():
            imported = importlib.import_module(module)
        return getattr(imported, function)(cfg, cfg_dict)

    return task


@contextmanager
def ctrl_c_held() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, then raise KeyboardInterrupt. For imports: a KeyboardInterrupt raised
    while torch loads can land inside its C++ start-up, which then aborts the process (status 134, no message),
    and one raised inside a module's own set-up can leave it half made and fail later with another error."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


def train() -> None:
    cpuload.start_at_entry()  # the busy-CPU check at the first batch measures from here, before torch loads
    try:
        main("train", _imported_when_called("nmt.train", "train"))
    finally:
        cpuload.take_entry_probe()  # left by a command that ended before its trainer took it


def evaluate() -> None:
    main("evaluate", _imported_when_called("nmt.evaluate", "evaluate"))


def translate() -> None:
    main("translate", _imported_when_called("nmt.translate", "translate"))


def quote_free_text(argv: list[str], keys: tuple[str, ...]) -> list[str]:
    """key=Männer -> key='Männer' for free-text keys, so that Hydra's override grammar takes any word."""
    quoted = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in keys and not (len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""):
            arg = f"{key}='" + value.replace("'", "\\'") + "'"
        quoted.append(arg)
    return quoted


def embeddings() -> None:
    main("embeddings", _imported_when_called("nmt.inspector", "inspect_embeddings"),
         quote_free_text(sys.argv[1:], ("query", "analogy")))
