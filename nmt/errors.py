"""Errors that are the user's to fix: the CLI prints them as one paragraph, without a traceback."""


class NMTError(Exception):
    """A problem with the user's input, files or settings; the message says what to do."""

    exit_code = 2


class ConfigError(NMTError):
    """A config value that cannot work; the message names the key."""


class Interrupted(NMTError):
    """Training was stopped by SIGINT or SIGTERM after saving its last checkpoint."""

    exit_code = 130
