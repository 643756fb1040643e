"""The one error type that reaches users as a one-line message and a non-zero exit."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or configuration: the message names the file or key and what was expected."""

    exit_code = 2


class JobFailed(UserError):
    """A job that started and failed after its retries (a lost cluster, storage gone during the
    run): one line naming the run and the cause, exit status 1; the run is recorded FAILED."""

    exit_code = 1


def cause_line(err: BaseException) -> str:
    """The last line of the innermost cause's message: what a user needs of a long traceback."""
    while err.__cause__ is not None and err.__cause__ is not err:
        err = err.__cause__
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else 'no message'}"
