"""Errors a user can fix, and the exit codes of the `simpo` command.

Exit codes (documented in the README):
  0    success
  1    an unexpected failure (a bug, or a crash in a library): a traceback is printed
  2    a problem in what the user gave (recipe, data, paths, flags): one line per problem
  3    training stopped on a non-finite loss or gradient norm (training.on_nonfinite: stop);
       the last good checkpoint is kept
  75   stopped on a signal (SIGTERM, SIGUSR1, a first Ctrl-C) after saving a checkpoint; the same
       command resumes (75 is EX_TEMPFAIL: try again later)
  130  aborted by a second Ctrl-C; nothing more was saved
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USER_ERROR = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75
EXIT_ABORTED = 130


class UserError(Exception):
    """A problem in what the user gave (recipe, data, flags); `messages` holds one line each."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, messages: list[str] | str):
        self.messages = [messages] if isinstance(messages, str) else list(messages)
        super().__init__("\n".join(self.messages))


class RecipeError(UserError):
    """The recipe file or its overrides are invalid."""


class DataError(UserError):
    """A data source cannot be read or a row does not fit the expected format."""


class NonFiniteError(UserError):
    """Training met a non-finite loss or gradient norm (training.on_nonfinite: stop): one line
    naming the step and its rows, like a user error, but its own exit code."""

    exit_code = EXIT_NONFINITE


class Preempted(Exception):
    """Stopped on a signal after saving a checkpoint; the same command resumes."""

    exit_code = EXIT_PREEMPTED
