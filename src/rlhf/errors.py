"""Errors that are the user's to fix: the `rlhf` command prints them as one line, without a traceback.

Raise a `UserError` subclass for anything a user can correct (a bad config value, an unreadable data row, a
missing file); let programming errors propagate as ordinary exceptions so they keep their traceback.
This module imports nothing, so any part of the package can raise these without pulling in the rest.
"""

from __future__ import annotations

EXIT_INTERRUPTED = 75
"""Exit status after SIGTERM/SIGINT stopped a run cleanly (EX_TEMPFAIL: "try again", i.e. resume)."""


class UserError(Exception):
    """An error the user can fix. The command line prints `rlhf: error: <message>` and exits `exit_code`."""

    exit_code: int = 1
    """Process exit status: 1 for data and runtime errors, 2 for usage and config errors."""


class ConfigError(UserError, ValueError):
    """An invalid config: unknown key, wrong type, value out of range. Exit status 2.

    `key` is the dotted path of the offending field relative to where the error was raised; a `validate()`
    method raises `ConfigError("must be > 0, got -1.0", key="lr")` and the loader prefixes the section
    path, so the user sees `optim.lr: must be > 0, got -1.0`.
    """

    exit_code = 2

    def __init__(self, message: str, *, key: str | None = None) -> None:
        self.message = message
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)
