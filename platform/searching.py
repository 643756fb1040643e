"""One architecture-search trial: a bilevel implicit search run, as a Ray Tune function trainable.

A trial gets the job's plain-data config plus the hyperparameters Optuna sampled for it
(``config["params"]``: keys of ``search.*``, ``width``, ``cells``, ``loss.<term>``), builds
the supernet of the (overridden) search space, and runs
:class:`~timfusion.search_spaces.bilevel.BilevelSearch` on patches of the training split
(lower level) and of the validation split (upper level). Every ``report_every`` steps it
reports ``score`` (the validation objective plus ``tune.cost_penalty`` x the normalised
expected MACs, so trials with different lambdas compare on one scale), ``val_loss``,
``cost`` and ``macs`` (of the genotype derived at that point) with a checkpoint, so ASHA
can stop it and a restored search continues it. Each trial is an MLflow run, child of the
search's run: its hyperparameters, metrics, alpha heatmap and derived genotype. A trial that runs
out of memory ends at once (not restarted), its run FAILED with the tag ``out_of_memory``, and
reports once more with that key and NaN scores, so neither Optuna nor ASHA takes its last score
for a result (:class:`~timfusion.platform.samplers.TrialSearcher`, ``TrialScheduler``).
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from timfusion.platform.errors import OUT_OF_MEMORY, cause_line, out_of_memory_errors
from timfusion.tasks import build_task
from timfusion.tasks.datasets import PairedDataset, PairRecord

TRIAL_STATE = "search_state.pt"


def trial_space(config: dict[str, Any]):
    """The search space of a trial: the configured one with the sampled width and cell count."""
    from timfusion.search_spaces.supernet import load_search_space, resize_search_space

    params = config.get("params") or {}
    space = load_search_space(config["search_space"])
    return resize_search_space(space, width=params.get("width"), cells=params.get("cells"))


def trial_settings(config: dict[str, Any]):
    """The :class:`SearchSettings` of a trial: the job's ``search`` block with the samples over
    it, and the options of the trial's hypergradient (:meth:`SearchSettings.for_run`)."""
    from timfusion.search_spaces.bilevel import SearchSettings

    params = config.get("params") or {}
    return SearchSettings.for_run(
        config["search"], {k: v for k, v in params.items() if k in SearchSettings.__dataclass_fields__})


def trial_task_config(config: dict[str, Any]) -> dict[str, Any]:
    task = copy.deepcopy(config["task"])
    for key, value in (config.get("params") or {}).items():
        if key.startswith("loss."):
            task.setdefault("loss", {})[key.split(".", 1)[1]] = float(value)
    return task


def patch_batches(records: list[PairRecord], config: dict[str, Any], labels: bool, num_classes: int,
                  seed: int):
    """Seeded batches of random ``config["crop"]`` patches, forever (an epoch after another)."""
    dataset = PairedDataset(
        records, crop=int(config["crop"]), seed=seed, labels=labels, num_classes=num_classes, cache=True
    )
    batch = min(int(config["batch_size"]), len(dataset))
    loader = DataLoader(
        dataset, batch_size=batch, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(seed)
    )
    epoch = 0
    while True:
        dataset.set_epoch(epoch)
        yield from loader
        epoch += 1


def _metric_name(key: str) -> str:
    """``loss/val`` -> ``val_loss``: flat names for Tune's metric columns."""
    kind, _, name = key.partition("/")
    return f"{name}_{kind}" if name else kind


def search_trial(config: dict[str, Any]) -> None:
    """The Tune function trainable (see the module docstring)."""
    import ray.tune

    from timfusion.platform.tracking import Tracker
    from timfusion.search_spaces.bilevel import BilevelSearch, alpha_heatmap, derive_genotype
    from timfusion.search_spaces.network import FusionNetwork, count_macs
    from timfusion.search_spaces.supernet import CostTable, Supernet
    from timfusion.tasks.heads import SegmentationHead

    torch.set_num_threads(max(1, int(config.get("threads_per_trial", 1))))
    seed = int(config["seed"])
    torch.manual_seed(seed)
    task = build_task(trial_task_config(config))
    space = trial_space(config)
    settings = trial_settings(config)
    supernet = Supernet(space, seed=seed)
    guided = settings.guidance_weight > 0
    head = SegmentationHead(len(task.classes), width=int(config["head_width"])) if guided else None
    search = BilevelSearch(supernet, task.build_loss(), settings, head=head)
    macs_table = CostTable(supernet, "macs", tuple(settings.cost_size))
    macs_max = float(sum(c.max() for c in macs_table.costs.values()))

    checkpoint = ray.tune.get_checkpoint()
    info: dict[str, Any] = {}
    logged_until = -1
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = torch.load(Path(folder) / TRIAL_STATE, weights_only=False)
            search.load_state_dict(state["search"])
            info = state["info"]
    context = ray.tune.get_context()
    if info.get("mlflow_run_id"):
        tracker = Tracker(config["tracking_uri"], info["mlflow_run_id"])
        logged_until = tracker.restored(search.step_count, "val_loss")
    else:
        trial = context.get_trial_name() or "trial"
        tracker = Tracker.start(
            {**config["tracking"], "uri": config["tracking_uri"]},
            trial,
            {
                "job": "search-trial",
                "task": task.name,
                "search_space": space.name,
                "hypergrad": settings.hypergrad,
                "trial_id": context.get_trial_id(),
            },
            config["mlflow_run_id"],
        )
        tracker.log_config({"params": config.get("params") or {}, "search": vars(settings)})
        info = {"mlflow_run_id": tracker.run_id}

    classes = len(task.classes)
    train_records = [PairRecord(**r) for r in config["train_records"]]
    val_records = [PairRecord(**r) for r in config["val_records"]]
    train_batches = patch_batches(train_records, config, guided, classes, seed)
    val_batches = patch_batches(val_records, config, guided, classes, seed + 1)
    positions = [f"{place}:{pos}" for place, pos in space.positions()]
    steps, every = int(config["steps"]), int(config["report_every"])
    penalty = float(config["cost_penalty"])
    started = time.perf_counter()
    window: dict[str, list[float]] = {}
    try:
        while search.step_count < steps:
            logged = search.step(next(train_batches), next(val_batches))
            for key, value in logged.items():
                window.setdefault(key, []).append(value)
            if search.step_count % every and search.step_count < steps:
                continue
            metrics = {_metric_name(k): float(np.mean(v)) for k, v in window.items()}
            window.clear()
            if "val_loss" not in metrics:  # no upper step in this window (the warm-up)
                metrics["val_loss"] = search.validate(next(val_batches))
            expected_macs = float(supernet.expected_cost(macs_table).detach()) / macs_max
            genotype = derive_genotype(supernet, settings, name=f"{space.name}-trial")
            macs = count_macs(FusionNetwork(genotype), *settings.cost_size, full=False)
            metrics.update(
                score=metrics["val_loss"] + penalty * expected_macs,
                expected_macs=expected_macs,
                macs=float(macs),
                step=search.step_count,
                seconds=time.perf_counter() - started,
            )
            if search.step_count > logged_until:  # logged before the restore: the first values stay
                tracker.log_metrics(metrics, step=search.step_count)
            done = search.step_count >= steps
            if done:
                tracker.log_text(genotype.to_json(), "genotype/genotype.json")
                heatmap = alpha_heatmap(search.history, space.candidates, positions)
                tracker.log_bytes(heatmap, "search/alphas.png")
                tracker.log_text(json.dumps(search.supernet.alpha_matrix().tolist()), "search/alphas.json")
                tracker.finish()
            with tempfile.TemporaryDirectory() as folder:
                torch.save({"search": search.state_dict(), "info": info}, Path(folder) / TRIAL_STATE)
                ray.tune.report(
                    {**metrics, "genotype": genotype.to_json(), "mlflow_run_id": tracker.run_id},
                    checkpoint=ray.tune.Checkpoint.from_directory(folder),
                )
    except out_of_memory_errors() as err:
        # Tune restarts a trial that raises, and a restart runs out again: the trial ends here, its
        # MLflow run says why (the search leaves it out of the choice), and its last result too
        cause = cause_line(err)
        tracker.set_tags({OUT_OF_MEMORY: cause})
        tracker.finish("FAILED")
        unscored = {key: float("nan") for key in ("score", "val_loss", "macs")}
        ray.tune.report(
            {**unscored, OUT_OF_MEMORY: cause, "step": search.step_count, "mlflow_run_id": tracker.run_id}
        )
