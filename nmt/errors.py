"""Errors that are the user's to fix: the CLI prints them as one paragraph, without a traceback."""

import signal


class NMTError(Exception):
    """A problem with the user's input, files or settings; the message says what to do."""

    exit_code = 2
    label = "error"  # how the CLI introduces the message: "nmt: error: ..."
    # Under torchrun: True when every rank raises it at the same point (a decision they agreed on),
    # so rank 0 alone prints it and the ranks wait for each other before they exit.
    every_rank = False


class ConfigError(NMTError):
    """A config value that cannot work; the message names the key."""


class Interrupted(NMTError):
    """Training was stopped by SIGINT or SIGTERM after saving its last checkpoint.

    The exit status is the shell's for that signal, 128 + its number: 130 for Ctrl-C, 143 for SIGTERM.
    """

    label = "stopped"  # not a mistake: the run stopped as asked, and its checkpoint is saved
    every_rank = True

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class Diverged(NMTError):
    """Too many updates in a row had a NaN or infinite loss or gradient."""

    every_rank = True
