"""Optuna samplers in the form Ray Tune can store.

Tune pickles its searcher (``OptunaSearch`` and the sampler inside it) into the experiment
state when a search starts, and unpickles it on ``resume=true``. Optuna 5.1's genetic
samplers (NSGA-II) keep a ``threading.Lock``, which cannot be pickled, so a multi-objective
search failed before its first trial. The subclass here drops the lock when pickled and
makes a new one when unpickled. The lock only guards one process's threads, so nothing
is lost.
"""

from __future__ import annotations

import threading
from typing import Any

import optuna


class NSGAIISampler(optuna.samplers.NSGAIISampler):
    """``optuna.samplers.NSGAIISampler`` that pickles (its thread lock is made anew)."""

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if "_thread_lock" in state:
            state["_thread_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "_thread_lock" in state:
            self._thread_lock = threading.Lock()
