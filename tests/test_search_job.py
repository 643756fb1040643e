"""`timfusion search` on a real local Ray cluster: Tune, Optuna, ASHA, MLflow child runs, retraining."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import STARVED

from timfusion.platform.config import compose
from timfusion.platform.errors import UserError
from timfusion.platform.jobs.search import pareto_front, search
from timfusion.search_spaces.genotype import load_genotype
from timfusion.search_spaces.network import FusionNetwork

QUICK = [
    "search_space=small",
    "data=synthetic",
    "data.synthetic.n=8",
    "data.synthetic.size=[48,48]",
    "crop=32",
    "batch_size=2",
    "search.cost_size=[32,32]",
    "search.warmup_steps=1",
    'retrain.overrides=["train.steps=3","train.crop=32","guidance.weight=0","cluster.num_workers=1"]',
]


def run_search(*overrides: str) -> dict:
    return search(compose("search", [*QUICK, *overrides]))


def _children(result: dict) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(result["tracking_uri"])
    experiment = client.get_run(result["run_id"]).info.experiment_id
    return client.search_runs([experiment], f"tags.mlflow.parentRunId = '{result['run_id']}'")


def test_four_trials_two_at_a_time_log_a_child_run_each_and_retrain(ray_cluster, workdir):
    result = run_search(
        "trials=4",
        "steps=4",
        "report_every=2",
        "cluster.max_concurrent_trials=2",
        "tune.asha.enabled=false",
        "name=four",
        "register=true",
    )
    assert len(result["rows"]) == 4 and len({r["trial"] for r in result["rows"]}) == 4
    children = _children(result)
    trials = [r for r in children if r.data.tags.get("job") == "search-trial"]
    retrains = [r for r in children if r.data.tags.get("job") == "train"]
    assert len(trials) == 4 and len(retrains) == 1
    drawn = []
    for run in trials:
        assert run.info.status == "FINISHED"
        assert {"score", "val_loss", "macs"} <= set(run.data.metrics)
        assert any(k.startswith("params.") for k in run.data.params)
        # each trial ran with the options of the method it drew (search.yaml's, by method)
        method = run.data.params["params.hypergrad"]
        options = {key.rsplit(".", 1)[1]: value for key, value in run.data.params.items()
                   if key.startswith("search.hypergrad_options.")}
        assert run.data.params["search.hypergrad"] == method
        implicit = {"solver": "cg", "terms": "1", "damping": "100.0", "hvp": "finite_difference"}
        assert options == (implicit if method == "implicit" else {}), (method, options)
        drawn.append(method)
    assert "implicit" in drawn and set(drawn) - {"implicit"}, drawn  # the seeded draws hold both kinds
    genotype = load_genotype(result["genotype_path"])
    FusionNetwork(genotype)
    assert json.loads(result["chosen"]["genotype"])["stage1"] == json.loads(genotype.to_json())["stage1"]
    assert (workdir / "outputs" / "search" / "four" / "trials.md").exists()
    registered = result["registered"]  # register=true: the retrained model, with the search's lineage
    assert registered["name"] == "timfusion-ir_vis" and registered["run_id"] == result["retrain"]["run_id"]
    assert registered["tags"]["search_run_id"] == result["run_id"]
    assert registered["tags"]["search_trial_run_id"] == result["chosen"]["mlflow_run_id"]


def test_asha_stops_a_trial_that_scores_far_worse(ray_cluster, workdir):
    """An intensity-loss weight of 10 vs 0: those trials score far worse from the first rung."""
    result = run_search(
        "trials=4",
        "steps=9",
        "report_every=3",
        "cluster.max_concurrent_trials=1",
        "~tune.space",
        "+tune.space={loss.intensity: {type: categorical, choices: [0.0, 10.0]}}",
        "tune.asha.grace_period=1",
        "tune.asha.reduction_factor=2",
        "retrain.enabled=false",
        "name=asha",
    )
    stopped = [r for r in result["rows"] if r["stopped_early"]]
    assert stopped and all(r["steps"] < 9 for r in stopped)
    killed = [r for r in _children(result) if r.data.tags.get("stopped_early") == "True"]
    assert len(killed) == len(stopped) and all(r.info.status == "KILLED" for r in killed)
    assert not result["chosen"]["stopped_early"]


def test_multi_objective_search_writes_a_pareto_front(ray_cluster, workdir):
    result = run_search(
        "trials=3",
        "steps=2",
        "report_every=2",
        "tune.multi_objective=true",
        "retrain.enabled=false",
        "name=pareto",
    )
    folder = workdir / "outputs" / "search" / "pareto"
    assert (folder / "pareto.md").exists() and (folder / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert result["chosen"] in result["front"]


def starve_wide_trials(monkeypatch, attempts: Path, from_step: int = 0) -> None:
    """Search trials whose supernet is 16 wide run out of memory at step ``from_step`` + 1 (after
    their reports until then), in the Ray worker (``helpers.STARVED``), and log it to ``attempts``;
    trials 8 wide run as usual."""
    from timfusion.platform.jobs import search as job

    def trainable(params: dict, base: dict) -> None:
        from timfusion.platform.searching import search_trial
        from timfusion.search_spaces.bilevel import BilevelSearch

        step = BilevelSearch.step

        def starved(self, *batches):
            if self.step_count < from_step:
                return step(self, *batches)
            with attempts.open("a") as log:
                log.write(f"{params['width']}\n")
            raise MemoryError(STARVED)

        if params["width"] == 16:
            BilevelSearch.step = starved
        try:
            search_trial({**base, "params": params})
        finally:  # the actor is reused for the next trial
            BilevelSearch.step = step

    monkeypatch.setattr(job, "_trainable", trainable)


def test_a_trial_out_of_memory_is_not_retried_and_left_out_of_the_choice(ray_cluster, workdir, monkeypatch):
    """A restart would run out again: the trial runs once (with restarts allowed), its MLflow run is
    FAILED and kept, Optuna holds it infeasible (not COMPLETE with the score it reported before),
    and the search chooses among the others; when every trial ran out of memory, one line names
    the knobs to lower."""
    from mlflow.tracking import MlflowClient
    from optuna.trial import TrialState

    from timfusion.platform.errors import JobFailed
    from timfusion.platform.samplers import TrialSearcher

    attempts = workdir / "attempts.txt"
    starve_wide_trials(monkeypatch, attempts, from_step=1)
    widths = ["~tune.space", "+tune.space={width: {type: categorical, choices: [8, 16]}}"]
    result = run_search("trials=4", "steps=2", "report_every=1", "cluster.max_failures=2",
                        "retrain.enabled=false", "name=wide", *widths)
    drawn = [json.loads(r["params"])["width"] for r in result["rows"]]
    starved = attempts.read_text().split()
    assert drawn and starved and set(drawn) == {8} and set(starved) == {"16"}
    assert len(drawn) + len(starved) == 4  # each trial once: no restart of a starved one
    trials = [r for r in _children(result) if r.data.tags.get("job") == "search-trial"]
    failed = [r for r in trials if r.info.status == "FAILED"]
    assert len(trials) == 4 and len(failed) == len(starved)
    assert all(r.data.tags["out_of_memory"].startswith("MemoryError: Unable to allocate") for r in failed)
    client = MlflowClient(result["tracking_uri"])
    assert client.get_run(result["run_id"]).data.tags["out_of_memory_trials"] == str(len(starved))
    searcher = TrialSearcher()  # the Optuna study, as Tune saved it with the experiment
    searcher.restore_from_dir(str(next(workdir.rglob("wide/searcher-state-*.pkl")).parent))
    told = {t.number: (t.params["width"], t.state, t.constraints) for t in searcher._ot_study.trials}
    assert sorted(told.values(), key=lambda t: t[0]) == sorted(
        [(8, TrialState.COMPLETE, {})] * len(drawn)
        + [(16, TrialState.PRUNED, {"out_of_memory": 1.0})] * len(starved), key=lambda t: t[0]
    )

    line = (r"search narrow: every trial ran out of memory \(MemoryError: Unable to allocate 37.3 GiB.*\); "
            r"lower crop or batch_size, the width or cells in tune.space, or cluster.max_concurrent_trials")
    with pytest.raises(JobFailed, match=line):
        run_search("trials=1", "steps=2", "report_every=2", "retrain.enabled=false", "name=narrow",
                   "~tune.space", "+tune.space={width: {type: categorical, choices: [16]}}")
    assert attempts.read_text().split().count("16") == len(starved) + 1


def test_pareto_front_keeps_the_undominated_points():
    rows = [
        {"val_loss": 1.0, "macs": 5.0},
        {"val_loss": 2.0, "macs": 1.0},
        {"val_loss": 2.0, "macs": 6.0},
        {"val_loss": 0.5, "macs": 9.0},
    ]
    assert pareto_front(rows) == [rows[3], rows[0], rows[1]]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["+tune.space.depth={type: int, low: 1, high: 3}"], "tune.space: unknown parameter 'depth'"),
        (["tune.space.alpha_lr={type: float, low: 1.0, high: 0.1}"], "low 1.0 must be <= high 0.1"),
        (["tune.space.alpha_lr={type: beta}"], "type must be categorical, float or int"),
        (["search_space=nowhere"], "search_space=nowhere: unknown value; valid choices: compact, small, tim"),
        (["search.alpha_lr=0"], "search.alpha_lr must be > 0"),
        (["cluster=none"], "search runs its trials on Ray Tune"),
        (["trials=0"], "trials must be >= 1, got 0"),
        (["register=true", "retrain.enabled=false"], "register=true: registers the retrained genotype"),
    ],
)
def test_bad_search_configs_fail_before_ray_starts(workdir, overrides, expected):
    with pytest.raises(UserError, match=expected):
        run_search(*overrides)


@pytest.mark.slow  # the SIGKILLed driver drill: tests/test_faults.py
def test_an_interrupted_search_resumes_and_runs_every_trial_once(ray_cluster, workdir):
    """Ctrl-C (SIGINT) after the first trial finished; resume=true keeps it and runs the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    overrides = [
        *QUICK,
        "trials=3",
        "steps=8",
        "report_every=2",
        "cluster.max_concurrent_trials=1",
        "tune.asha.enabled=false",
        "retrain.enabled=false",
        "name=cut",
        "cluster.num_cpus=2",
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "MLFLOW_DISABLE_TELEMETRY": "true"}
    driver = subprocess.Popen(
        [sys.executable, "-m", "timfusion.platform.cli", "search", *overrides],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    experiment = workdir / "runs" / "ray" / "cut"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and driver.poll() is None:
            finished = [p for p in experiment.glob("*/result.json") if '"step": 8' in p.read_text()]
            if finished:
                break
            time.sleep(0.5)
        assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
        driver.send_signal(signal.SIGINT)
        output = driver.communicate(timeout=120)[0].decode()
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode != 0 and "interrupted" in output, output[-3000:]

    result = run_search(*overrides[len(QUICK) : -1], "resume=true")
    rows = result["rows"]
    assert len(rows) == 3 and len({r["trial"] for r in rows}) == 3
    assert all(r["steps"] == 8 and not r["stopped_early"] for r in rows)
    trials = [r for r in _children(result) if r.data.tags.get("job") == "search-trial"]
    assert len({r.info.run_id for r in trials}) == len(trials)
    assert sorted(r.data.metrics["step"] for r in trials if r.info.status == "FINISHED") == [8, 8, 8]


def test_nsga2_sampler_survives_pickling_and_keeps_sampling():
    """Tune pickles its searcher into the experiment state (and unpickles it on resume); Optuna
    5.1's NSGA-II holds a thread lock, which plain pickling refuses."""
    import pickle

    import optuna

    from timfusion.platform.samplers import NSGAIISampler

    sampler = pickle.loads(pickle.dumps(NSGAIISampler(seed=0, population_size=4)))
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=sampler)
    def objective(trial: optuna.Trial) -> tuple[float, float]:
        return trial.suggest_float("x", 0, 1), trial.suggest_float("y", 0, 1)

    study.optimize(objective, n_trials=10)
    assert len(study.trials) == 10 and len(study.best_trials) >= 1
    again = pickle.loads(pickle.dumps(sampler))  # after sampling too, with its caches filled
    assert again.__dict__.keys() == sampler.__dict__.keys()


def test_asha_rungs_take_no_result_of_a_trial_out_of_memory():
    """A starved trial's last result (NaN scores) stays out of the rungs: no NaN-only cutoff (numpy
    warns of an all-NaN slice), and the trials that fit are still cut by each other's scores."""
    import warnings
    from types import SimpleNamespace

    from timfusion.platform.samplers import TrialScheduler

    scheduler = TrialScheduler(time_attr="training_iteration", metric="score", mode="min", max_t=4,
                               grace_period=1, reduction_factor=2)
    starved, best, worse = (SimpleNamespace(trial_id=name) for name in ("starved", "best", "worse"))
    for trial in (starved, best, worse):
        scheduler.on_trial_add(None, trial)
    nan = float("nan")
    starved_result = {"training_iteration": 1, "score": nan, "out_of_memory": f"MemoryError: {STARVED}"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert scheduler.on_trial_result(None, starved, starved_result) == TrialScheduler.CONTINUE
        scheduler.on_trial_complete(None, starved, starved_result)
        assert scheduler.on_trial_result(None, best, {"training_iteration": 1, "score": 0.5}) == "CONTINUE"
        assert scheduler.on_trial_result(None, worse, {"training_iteration": 1, "score": 0.9}) == "STOP"
