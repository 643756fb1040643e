"""``timfusion search``: implicit architecture search trials on Ray Tune, sampled by Optuna.

Each trial is :func:`timfusion.platform.searching.search_trial`; Optuna (TPE, or NSGA-II
with ``tune.multi_objective=true``) samples the hyperparameters listed in ``tune.space``,
ASHA stops weak trials on ``score`` (scalar mode). After the trials the chosen genotype
(the best score; in multi-objective mode the best score on the Pareto front of
validation loss vs MACs) is written as JSON, logged to the search's MLflow run, and
retrained with ``timfusion train`` as a child run of the search.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from timfusion.platform.config import compose, to_container
from timfusion.platform.errors import OUT_OF_MEMORY, JobFailed, UserError, cause_line, check_bounds, naming
from timfusion.platform.jobs import command
from timfusion.platform.jobs.common import task_from
from timfusion.platform.jobs.registry import check_register, register_after
from timfusion.platform.jobs.train import (
    check_placeable,
    check_train_settings,
    check_val_images,
    init_ray,
    prepare_run_dir,
    train,
    training_records,
)
from timfusion.platform.report import markdown_table
from timfusion.platform.storage import job_storage, ray_storage, redact
from timfusion.platform.tracking import Tracker, tracking_uri
from timfusion.platform.training import record_run
from timfusion.tasks.datasets import fingerprint
from timfusion.tasks.imageio import atomic_write_bytes, atomic_write_text


class SearchInterrupted(UserError):
    """The trials stopped before all finished (Ctrl-C, a lost driver): resume=true continues."""

    exit_code = 130


SPACE_EXTRA = ("width", "cells")  # sampled keys besides SearchSettings fields and loss.<term>
COLUMNS = ["trial", "score", "val_loss", "macs", "steps", "stopped_early", "hypergrad", "params"]


def _domain(name: str, spec: Any):
    from ray import tune

    if not isinstance(spec, dict) or "type" not in spec:
        raise UserError(f"tune.space.{name}: expected {{type: categorical|float|int, ...}}, got {spec!r}")
    kind = spec["type"]
    try:
        if kind == "categorical":
            choices = list(spec["choices"])
            if not choices:
                raise UserError(f"tune.space.{name}: choices must not be empty")
            return tune.choice(choices)
        low, high = spec["low"], spec["high"]
        if not low <= high:
            raise UserError(f"tune.space.{name}: low {low} must be <= high {high}")
        if kind == "float":
            return tune.loguniform(low, high) if spec.get("log") else tune.uniform(low, high)
        if kind == "int":
            return tune.lograndint(low, high + 1) if spec.get("log") else tune.randint(low, high + 1)
    except KeyError as err:
        raise UserError(f"tune.space.{name}: missing key {err.args[0]!r}") from None
    raise UserError(f"tune.space.{name}: type must be categorical, float or int, got {kind!r}")


def param_space(cfg: DictConfig, task_loss: dict[str, Any]) -> dict[str, Any]:
    """Tune domains for ``tune.space``; an unknown key is a UserError listing the valid ones."""
    from timfusion.search_spaces.bilevel import SearchSettings

    space = to_container(cfg.tune.space) or {}
    valid = sorted([*SearchSettings.__dataclass_fields__, *SPACE_EXTRA, *(f"loss.{t}" for t in task_loss)])
    domains = {}
    for name, spec in space.items():
        if name not in valid:
            raise UserError(f"tune.space: unknown parameter {name!r}; valid: {', '.join(valid)}")
        domains[name] = _domain(name, spec)
    if not domains:
        raise UserError("tune.space: give at least one parameter to sample")
    return domains


def check_draws(cfg: DictConfig, base_check: dict[str, Any]) -> None:
    """Every choice, and both ends of every range, that Optuna may draw from ``tune.space`` builds
    a trial's space, settings and loss: checked before Ray starts, not in a failing trial."""
    from timfusion.platform.searching import trial_settings, trial_space, trial_task_config
    from timfusion.search_spaces.bilevel import SearchSettings
    from timfusion.search_spaces.supernet import Supernet
    from timfusion.tasks import build_task

    for key, spec in to_container(cfg.tune.space).items():
        for value in spec.get("choices") or [spec["low"], spec["high"]]:
            drawn = {**base_check, "params": {key: value}}
            with naming(f"tune.space.{key} may draw {value}"):
                if key in SPACE_EXTRA:
                    Supernet(trial_space(drawn))
                elif key in SearchSettings.__dataclass_fields__:
                    trial_settings(drawn)
                else:  # loss.<term>
                    build_task(trial_task_config({**drawn, "task": to_container(cfg.task)})).build_loss()


def pareto_front(
    rows: list[dict[str, Any]], keys: tuple[str, str] = ("val_loss", "macs")
) -> list[dict[str, Any]]:
    """The rows no other row beats on both ``keys`` (both minimised), sorted by the first."""
    front = []
    for row in rows:
        dominated = any(
            all(other[k] <= row[k] for k in keys) and any(other[k] < row[k] for k in keys)
            for other in rows
            if other is not row
        )
        if not dominated:
            front.append(row)
    return sorted(front, key=lambda r: r[keys[0]])


def _pareto_png(rows: list[dict[str, Any]], front: list[dict[str, Any]]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["macs"] / 1e6 for r in rows], [r["val_loss"] for r in rows], c="0.6", label="trials")
    ax.plot(
        [r["macs"] / 1e6 for r in front], [r["val_loss"] for r in front], "o-", c="C3", label="Pareto front"
    )
    ax.set_xlabel("MMACs of the derived genotype")
    ax.set_ylabel("validation loss")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _trainable(params: dict[str, Any], base: dict[str, Any] | None = None) -> None:
    from timfusion.platform.searching import search_trial

    search_trial({**(base or {}), "params": params})


def retrain_config(cfg: DictConfig) -> DictConfig:
    """The ``timfusion train`` config that retrains the chosen genotype: ``retrain.overrides`` on the
    search's task, data, cluster, paths and tracking, checked as train checks its own."""
    retrain_cfg = compose("train", [*cfg.retrain.overrides])
    for key in ("task", "data", "cluster", "paths", "tracking"):
        OmegaConf.update(retrain_cfg, key, cfg[key], merge=False)
    check_train_settings(retrain_cfg)
    return retrain_cfg


@command(
    "search", config="search", summary="implicit architecture search on Ray Tune + Optuna, then retraining"
)
def search(cfg: DictConfig) -> dict[str, Any]:
    from timfusion.platform.searching import trial_settings, trial_space
    from timfusion.search_spaces.genotype import Genotype
    from timfusion.search_spaces.network import FusionNetwork
    from timfusion.search_spaces.supernet import Supernet

    task = task_from(cfg)
    check_bounds("", cfg, at_least_one=("trials", "steps", "report_every"), seeds=("seed",))
    check_register(cfg)
    if cfg.register and not cfg.retrain.enabled:
        raise UserError("register=true: registers the retrained genotype's model; set retrain.enabled=true")
    retrain_cfg = retrain_config(cfg) if cfg.retrain.enabled else None  # bad overrides fail before the trials
    check_bounds("cluster", cfg.cluster, at_least_one=("max_concurrent_trials",),
                 non_negative=("trial_cpus", "trial_gpus"))
    trial_cpus, trial_gpus = cfg.cluster.trial_cpus, cfg.cluster.trial_gpus
    check_placeable(cfg.cluster, 1, float(trial_cpus), float(trial_gpus),
                    f"cluster.trial_cpus={trial_cpus}, cluster.trial_gpus={trial_gpus}")
    if cfg.cluster.backend != "ray":
        raise UserError(
            f"cluster={cfg.cluster.name}: search runs its trials on Ray Tune; use a Ray cluster config"
        )
    domains = param_space(cfg, task.loss_weights)
    base_check = {
        "search_space": to_container(cfg.search_space),
        "search": to_container(cfg.search),
        "params": {},
    }
    Supernet(trial_space(base_check))  # an unknown space, op or bad template fails before Ray starts
    trial_settings(base_check)
    check_draws(cfg, base_check)
    storage = job_storage(cfg)
    name = cfg.name or f"{task.name}-search-{time.strftime('%Y%m%d-%H%M%S')}"
    workdir = Path(str(cfg.workdir)).resolve()
    identity = {"task": task.name, "search_space": to_container(cfg.search_space)}  # the trials' supernets
    run_dir, info = prepare_run_dir(cfg, name, str(workdir), identity, kind="search")
    train_records, val_records = training_records(cfg, task, workdir)
    if retrain_cfg is not None:  # the retraining validates on these pairs after the whole search
        check_val_images(retrain_cfg, val_records)
    resolved = to_container(cfg)
    uri = tracking_uri(cfg.tracking.uri)
    if info is not None:
        tracker = Tracker(info["tracking_uri"], info["mlflow_run_id"])
    else:
        tags = {
            "job": "search",
            "task": task.name,
            "search_space": str(cfg.search_space.name),
            "dataset_fingerprint": fingerprint(train_records + val_records),
        }
        tracker = Tracker.start({**resolved["tracking"], "uri": uri}, name, tags)
        tracker.log_config(resolved)
        tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/config.yaml")
        record_run(run_dir, tracker, name, identity)
    base = {
        "search_space": resolved["search_space"],
        "search": resolved["search"],
        "task": resolved["task"],
        "steps": int(cfg.steps),
        "report_every": int(cfg.report_every),
        "crop": int(cfg.crop),
        "batch_size": int(cfg.batch_size),
        "seed": int(cfg.seed),
        "head_width": int(cfg.head_width),
        "cost_penalty": float(cfg.tune.cost_penalty),
        "threads_per_trial": max(1, int(cfg.cluster.trial_cpus)),
        "train_records": [dataclasses.asdict(r) for r in train_records],
        "val_records": [dataclasses.asdict(r) for r in val_records],
        "tracking": resolved["tracking"],
        "tracking_uri": tracker.uri,
        "mlflow_run_id": tracker.run_id,
    }
    print(
        f"searching {cfg.search_space.name} for {task.name}: {int(cfg.trials)} trial(s) of "
        f"{int(cfg.steps)} steps, "
        f"{len(train_records)} train / {len(val_records)} val pairs, search {name} (MLflow {tracker.run_id})"
    )
    try:
        grid = _run_tuner(cfg, base, domains, name, storage)
        if grid.num_errors == 0 and grid.num_terminated < int(cfg.trials):
            raise SearchInterrupted(
                f"search {name} interrupted: {grid.num_terminated} of {int(cfg.trials)} trials finished; "
                f"continue it with resume=true name={name}"
            )
        rows = _trial_results(grid, tracker, int(cfg.steps), name)
        chosen, front = _choose(rows, bool(cfg.tune.multi_objective))
        _write_results(cfg, run_dir, tracker, rows, chosen, front)
    except (SearchInterrupted, KeyboardInterrupt):
        raise  # the search run stays open for resume=true
    except BaseException:
        tracker.finish("FAILED")
        raise
    genotype_path = run_dir / "genotype.json"
    atomic_write_text(genotype_path, chosen["genotype"])
    tracker.log_artifact(genotype_path, "genotype")
    FusionNetwork(Genotype.from_dict(json.loads(chosen["genotype"]), source=str(genotype_path)))
    result: dict[str, Any] = {
        "run_id": tracker.run_id,
        "name": name,
        "rows": rows,
        "chosen": chosen,
        "tracking_uri": tracker.uri,
        "genotype_path": str(genotype_path),
        "front": front,
    }
    if retrain_cfg is not None:
        retrain_cfg.genotype = str(genotype_path)
        retrain_cfg.parent_run_id = tracker.run_id
        retrain_cfg.name = f"{name}-retrain" + (f"-{int(time.time())}" if cfg.resume else "")
        retrain_cfg.workdir = str(workdir / "train")
        trained = train(retrain_cfg)
        tracker.set_tags({"retrain_run_id": trained["run_id"]})
        result["retrain"] = trained
    tracker.finish()
    if cfg.retrain.enabled:  # register=true without retraining was refused before the trials
        register_after(cfg, result, result["retrain"]["run_id"], task.name)
    print(
        f"search done: chosen {chosen['trial']} (score {chosen['score']:.4f}, "
        f"{chosen['macs'] / 1e6:.1f} MMACs); "
        f"genotype {genotype_path}; MLflow run {tracker.run_id}"
    )
    return result


def _run_tuner(cfg: DictConfig, base: dict[str, Any], domains: dict[str, Any], name: str, storage: str):
    from ray import tune

    init_ray(cfg.cluster)
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, base=base),
        {"cpu": max(0.01, float(cfg.cluster.trial_cpus)), "gpu": float(cfg.cluster.trial_gpus)},
    )
    storage_path, filesystem = ray_storage(storage)
    path = f"{storage_path}/{name}"
    if cfg.resume and tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        tuner = tune.Tuner.restore(
            path, trainable=trainable, param_space=domains, resume_unfinished=True, resume_errored=True,
            storage_filesystem=filesystem,
        )
        return tuner.fit()
    import optuna

    from timfusion.platform.samplers import NSGAIISampler, TrialScheduler, TrialSearcher

    seed = int(cfg.seed)
    if cfg.tune.multi_objective:
        searcher = TrialSearcher(
            metric=["val_loss", "macs"], mode=["min", "min"], sampler=NSGAIISampler(seed=seed)
        )
        scheduler, metric, mode = None, None, None
    else:
        searcher = TrialSearcher(metric="score", mode="min", sampler=optuna.samplers.TPESampler(seed=seed))
        asha = cfg.tune.asha
        scheduler = (
            TrialScheduler(
                time_attr="training_iteration",
                max_t=max(1, -(-int(cfg.steps) // int(cfg.report_every))),
                grace_period=int(asha.grace_period),
                reduction_factor=float(asha.reduction_factor),
            )
            if asha.enabled
            else None
        )
        metric, mode = "score", "min"
    tuner = tune.Tuner(
        trainable,
        param_space=domains,
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=int(cfg.trials),
            max_concurrent_trials=int(cfg.cluster.max_concurrent_trials),
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=filesystem,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            # a trial on a lost worker or node restarts from its last checkpoint, elsewhere
            failure_config=tune.FailureConfig(max_failures=int(cfg.cluster.max_failures)),
        ),
    )
    return tuner.fit()


def _rows(grid, uri: str, steps: int) -> list[dict[str, Any]]:
    """The trials' rows, best score first; not those of trials that ran out of memory (a trial
    that cannot run on this machine is left out of the choice)."""
    rows = []
    for result in grid:
        if result.error is not None:
            trial = Path(result.path).name
            raise JobFailed(f"search trial {trial} failed: {redact(cause_line(result.error))}")
        metrics = result.metrics or {}
        if "genotype" not in metrics or OUT_OF_MEMORY in metrics:
            continue
        stopped = int(metrics["step"]) < steps
        if stopped:  # ASHA stopped it: close its MLflow run with the state it reached
            child = Tracker(uri, metrics["mlflow_run_id"])
            child.set_tags({"stopped_early": True})
            child.log_text(metrics["genotype"], "genotype/genotype.json")
            child.finish("KILLED")
        rows.append(
            {
                "trial": metrics.get("trial_id", Path(result.path).name),
                "score": float(metrics["score"]),
                "val_loss": float(metrics["val_loss"]),
                "macs": float(metrics["macs"]),
                "steps": int(metrics["step"]),
                "stopped_early": stopped,
                "hypergrad": result.config.get("hypergrad", ""),
                "params": json.dumps(result.config, sort_keys=True),
                "genotype": metrics["genotype"],
                "mlflow_run_id": metrics["mlflow_run_id"],
            }
        )
    return sorted(rows, key=lambda r: r["score"])


def _trial_results(grid, tracker: Tracker, steps: int, name: str) -> list[dict[str, Any]]:
    """The rows of the trials that can be chosen; the MLflow runs of lost attempts deleted."""
    trials = trial_runs(tracker)
    starved = {r.info.run_id: r.data.tags[OUT_OF_MEMORY] for r in trials if OUT_OF_MEMORY in r.data.tags}
    rows = _rows(grid, tracker.uri, steps)
    tracker.set_tags({"out_of_memory_trials": len(starved)})
    for run in trials:
        if run.info.run_id in starved:
            cause = starved[run.info.run_id]
            print(f"trial {run.info.run_name} ran out of memory ({cause}); left out of the choice")
    if not rows and starved:
        raise JobFailed(
            f"search {name}: every trial ran out of memory ({next(iter(starved.values()))}); lower crop or "
            "batch_size, the width or cells in tune.space, or cluster.max_concurrent_trials"
        )
    if not rows:
        raise RuntimeError("no search trial reported a result")
    discard_lost_attempts(tracker, trials, {row["mlflow_run_id"] for row in rows} | set(starved))
    return rows


def trial_runs(tracker: Tracker) -> list[Any]:
    """The MLflow runs of the search's trials, every attempt's."""
    parent = tracker.client.get_run(tracker.run_id)
    return tracker.client.search_runs(
        [parent.info.experiment_id], f"tags.parent_run_id = '{tracker.run_id}' and tags.job = 'search-trial'"
    )


def discard_lost_attempts(tracker: Tracker, trials: list[Any], kept: set[str]) -> None:
    """Delete the trial runs (of ``trial_runs``) that no result comes from: attempts that died
    before their first checkpoint (a killed driver, a lost node) and started again as a new run.
    The search then lists every trial once."""
    for run in trials:
        if run.info.run_id not in kept and run.info.status != "FINISHED":
            tracker.client.delete_run(run.info.run_id)


def _choose(rows: list[dict[str, Any]], multi: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The best score among the trials that ran to the end (or all, if ASHA stopped every one);
    in multi-objective mode, among the Pareto front's points."""
    front = pareto_front(rows)
    pool = front if multi else ([r for r in rows if not r["stopped_early"]] or rows)
    return min(pool, key=lambda r: r["score"]), front


def _write_results(cfg, run_dir: Path, tracker: Tracker, rows, chosen, front) -> None:
    table = markdown_table(rows, COLUMNS)
    atomic_write_text(run_dir / "trials.md", table)
    atomic_write_text(run_dir / "trials.json", json.dumps(rows, indent=1))
    tracker.log_text(table, "search/trials.md")
    tracker.log_text(json.dumps(rows, indent=1), "search/trials.json")
    tracker.log_metrics(
        {
            "best_score": chosen["score"],
            "best_val_loss": chosen["val_loss"],
            "best_macs": chosen["macs"],
            "trials": len(rows),
            "stopped_early": sum(r["stopped_early"] for r in rows),
        },
        step=0,
    )
    tracker.set_tags({"chosen_trial": chosen["trial"], "chosen_trial_run_id": chosen["mlflow_run_id"]})
    if cfg.tune.multi_objective:
        front_table = markdown_table(front, COLUMNS)
        atomic_write_text(run_dir / "pareto.md", front_table)
        png = _pareto_png(rows, front)
        atomic_write_bytes(run_dir / "pareto.png", png)
        tracker.log_text(front_table, "search/pareto.md")
        tracker.log_bytes(png, "search/pareto.png")
    print(table)
