"""The one error type that reaches users as a one-line message and a non-zero exit."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any


class UserError(Exception):
    """Bad input or configuration: the message names the file or key and what was expected."""

    exit_code = 2


class JobFailed(UserError):
    """A job that started and failed after its retries (a lost cluster, storage gone during the
    run): one line naming the run and the cause, exit status 1; the run is recorded FAILED."""

    exit_code = 1


@contextmanager
def naming(subject: str) -> Iterator[None]:
    """UserErrors raised inside start with ``subject`` (``meta.algorithm: unknown ...``): a
    library's message, with the setting or value it came from."""
    try:
        yield
    except UserError as err:
        err.args = (f"{subject}: {err}", *err.args[1:])
        err.__suppress_context__ = True
        raise


def cause_line(err: BaseException) -> str:
    """The last line of the innermost cause's message: what a user needs of a long traceback."""
    while err.__cause__ is not None and err.__cause__ is not err:
        err = err.__cause__
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else 'no message'}"


OUT_OF_MEMORY = "out_of_memory"
"""The MLflow tag, and the key of a search trial's last Tune result, that says a run ran out of
memory (its value: the cause line)."""


def out_of_memory_errors() -> tuple[type[BaseException], ...]:
    """What a worker raises when the machine cannot hold its step (numpy's ``_ArrayMemoryError``
    is a ``MemoryError``; CUDA's is ``torch.OutOfMemoryError``). A function, so that importing
    this module does not import torch."""
    import torch

    return (MemoryError, torch.OutOfMemoryError)


def is_integer(value: object) -> bool:
    """An int that is not a bool: Python's bool is an int, so YAML's ``true`` would pass as 1."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An int or a float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_size(key: str, value: Any, minimum: int = 1) -> tuple[int, int]:
    """``value`` as (height, width): two integers of at least ``minimum``, else a UserError naming
    ``key``. A float or a bool is refused, not truncated to the size it happens to round to."""
    sequence = isinstance(value, Iterable) and not isinstance(value, str | bytes | Mapping)
    items = list(value) if sequence else None
    if items is None or len(items) != 2 or not all(is_integer(side) and side >= minimum for side in items):
        shown = value if items is None else items
        raise UserError(f"{key}: expected [height, width] of integers >= {minimum}, got {shown}")
    return items[0], items[1]


_BOUNDS = {"at_least_one": (">= 1", lambda v: v >= 1), "non_negative": (">= 0", lambda v: v >= 0),
           "positive": ("> 0", lambda v: v > 0),
           "seeds": (f"an integer in 0..{2**32 - 1}", lambda v: is_integer(v) and 0 <= v < 2**32)}


def check_bounds(section: str, settings: Mapping[str, Any], *, at_least_one: Iterable[str] = (),
                 non_negative: Iterable[str] = (), positive: Iterable[str] = (), seeds: Iterable[str] = (),
                 optional: Iterable[str] = ()) -> None:
    """Each named ``section.key`` of ``settings`` within its bound, else a UserError naming it
    (``optional`` keys may also be null: unset). Jobs call it before any data or Ray work: found
    in a worker, a bad value costs the restarts and ends as a library's traceback. ``seeds``
    take what numpy, torch and Optuna all accept."""
    nullable = set(optional)
    for kind, keys in (("at_least_one", at_least_one), ("non_negative", non_negative),
                       ("positive", positive), ("seeds", seeds)):
        bound, holds = _BOUNDS[kind]
        for key in keys:
            value = settings[key]
            if value is None and key in nullable:
                continue
            number = value if is_number(value) else None
            if number is None or not holds(number):
                name = f"{section}.{key}" if section else key
                raise UserError(f"{name} must be {bound}{' or null' if key in nullable else ''}, got {value}")
