"""Runnable jobs behind the CLI's subcommands (library code lives in the area packages).

Each job is a function taking its composed config, registered with ``@command`` under
the name users type (``fuse``, ``evaluate``, ``data synth``, ...) and the config it
composes (``platform/conf/<config>.yaml``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from omegaconf import DictConfig

from timfusion.platform.registry import Registry


@dataclass(frozen=True)
class Command:
    name: str
    config: str
    run: Callable[[DictConfig], object]
    summary: str


COMMANDS: Registry[Command] = Registry("command")


def command(name: str, config: str, summary: str) -> Callable[[Callable], Callable]:
    """Register a job function as the CLI subcommand ``name`` composing ``config``."""

    def decorate(fn: Callable) -> Callable:
        COMMANDS.register(name)(Command(name, config, fn, summary))
        return fn

    return decorate


def load_all() -> None:
    """Import every job module so that their commands are registered."""
    from timfusion.platform.jobs import (  # noqa: F401
        arch,
        cluster,
        data,
        evaluate,
        export,
        fuse,
        meta,
        registry,
        run,
        search,
        train,
    )
