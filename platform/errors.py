"""The one error type that reaches users as a one-line message and a non-zero exit."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or configuration: the message names the file or key and what was expected."""

    exit_code = 2
