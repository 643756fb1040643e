"""Optuna and ASHA through Ray Tune: samplers in the form Tune can store, and the searcher and
scheduler the search uses.

Tune pickles its searcher (``OptunaSearch`` and the sampler inside it) into the experiment
state when a search starts, and unpickles it on ``resume=true``. Optuna 5.1's genetic
samplers (NSGA-II) keep a ``threading.Lock``, which cannot be pickled, so a multi-objective
search failed before its first trial. The subclass here drops the lock when pickled and
makes a new one when unpickled. The lock only guards one process's threads, so nothing
is lost.

A search trial that runs out of memory ends with one last result carrying
:data:`~timfusion.platform.errors.OUT_OF_MEMORY` (its scores NaN: Tune wants the metric in every
result). Plain ``OptunaSearch`` would tell Optuna that trial COMPLETE with its last reported score,
or PRUNED (ranked as if merely stopped early); :class:`TrialSearcher` marks it infeasible, the
constraint Optuna's samplers rank below every feasible trial, so TPE draws fewer configurations
that do not fit. :class:`TrialScheduler` keeps that result out of ASHA's rungs, whose cutoffs
decide which of the trials that do fit go on.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import optuna
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from timfusion.platform.errors import OUT_OF_MEMORY

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController
    from ray.tune.experiment import Trial


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


class TrialSearcher(OptunaSearch):
    """``OptunaSearch`` that tells Optuna a trial which ran out of memory is infeasible (the
    constraint ``out_of_memory`` > 0, state PRUNED), not a result."""

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if OUT_OF_MEMORY not in result:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if result and OUT_OF_MEMORY in result and trial_id not in self._completed_trials:
            self._ot_trials[trial_id].set_constraint(OUT_OF_MEMORY, 1.0)
            result = None
        super().on_trial_complete(trial_id, result, error)


class TrialScheduler(ASHAScheduler):
    """``ASHAScheduler`` whose rungs take no result of a trial that ran out of memory."""

    def on_trial_result(self, tune_controller: TuneController, trial: Trial, result: dict[str, Any]) -> str:
        if OUT_OF_MEMORY in result:
            return self.CONTINUE  # the trial is ending by itself
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(
        self, tune_controller: TuneController, trial: Trial, result: dict[str, Any]
    ) -> None:
        if OUT_OF_MEMORY not in result:
            super().on_trial_complete(tune_controller, trial, result)
