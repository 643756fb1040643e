"""``timfusion meta`` (learn a meta-initialization) and ``timfusion adapt`` (fine-tune from one)."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from timfusion.platform.config import compose, task_config, to_container
from timfusion.platform.errors import UserError, check_bounds, naming
from timfusion.platform.jobs import command
from timfusion.platform.jobs.common import task_from
from timfusion.platform.jobs.registry import check_register, register_after
from timfusion.platform.jobs.train import (
    check_train_settings,
    check_val_images,
    prepare_run_dir,
    resolve_workers,
    run_workers,
    train,
    training_records,
)
from timfusion.platform.storage import job_storage
from timfusion.platform.tracking import Tracker, tracking_uri
from timfusion.platform.training import record_run
from timfusion.tasks import build_task
from timfusion.tasks.datasets import fingerprint
from timfusion.tasks.imageio import atomic_write_text

RUN_ID = re.compile(r"[0-9a-f]{32}")


def check_algorithm(name: str) -> None:
    """``meta.algorithm`` names a registered algorithm (the error lists them)."""
    from timfusion.meta.algorithms import META_ALGORITHMS

    with naming("meta.algorithm"):
        META_ALGORITHMS.get(name)


def check_meta_settings(settings: DictConfig) -> None:
    """Every ``meta.*`` problem as a UserError naming the key, before any data or Ray work."""
    check_algorithm(str(settings.algorithm))
    check_bounds("meta", settings,
                 at_least_one=("steps", "meta_batch", "inner_steps", "support", "query", "crop", "log_every",
                               "checkpoint_every"),
                 positive=("inner_lr", "outer_lr", "grad_clip"),
                 non_negative=("fidelity_warmup_steps", "pretrain_steps", "loss_mixture"), seeds=("seed",))
    if not settings.tasks:
        raise UserError("meta.tasks: give at least one task")
    from timfusion.meta.sampler import check_loss_draw

    check_loss_draw(bool(settings.cross_losses), float(settings.loss_mixture))


@command("meta", config="meta", summary="meta-initialization over fusion tasks (learn2learn) on Ray Train")
def meta(cfg: DictConfig) -> dict[str, Any]:
    from timfusion.meta.loop import meta_worker
    from timfusion.meta.sampler import included_tasks
    from timfusion.search_spaces.genotype import load_genotype
    from timfusion.search_spaces.network import FusionNetwork

    settings = cfg.meta
    check_meta_settings(settings)
    check_register(cfg)
    genotype = load_genotype(str(settings.genotype), key="meta.genotype")
    FusionNetwork(genotype)
    tasks = included_tasks([build_task(task_config(str(name), key="meta.tasks")) for name in settings.tasks],
                           [str(name) for name in settings.exclude])
    workers, use_gpu = resolve_workers(cfg.cluster)
    if cfg.cluster.backend == "local":
        workers = 1
    if int(settings.meta_batch) < workers:
        raise UserError(f"meta.meta_batch={settings.meta_batch}: fewer tasks than the {workers} workers "
                        "(raise it or lower cluster.num_workers)")
    storage = job_storage(cfg)
    name = cfg.name or f"meta-{settings.algorithm}-{time.strftime('%Y%m%d-%H%M%S')}"
    identity = {"genotype": genotype.to_dict(), "meta.algorithm": str(settings.algorithm)}
    run_dir, info = prepare_run_dir(cfg, name, storage, identity)
    workdir = Path(str(cfg.workdir)).resolve()
    pools = {task.name: (task, training_records(cfg, task, workdir)) for task in tasks}
    resolved = to_container(cfg)
    if info is not None:
        tracker = Tracker(info["tracking_uri"], info["mlflow_run_id"])
    else:
        every = [r for _, (train_records, val_records) in pools.values() for r in train_records + val_records]
        tags = {"job": "meta", "algorithm": str(settings.algorithm), "genotype": genotype.name,
                "pretrain_steps": str(settings.pretrain_steps),
                "cross_losses": str(settings.cross_losses).lower(),
                "loss_mixture": str(settings.loss_mixture),
                "tasks": ",".join(sorted(pools)), "exclude": ",".join(str(e) for e in settings.exclude),
                "dataset_fingerprint": fingerprint(every)}
        tracker = Tracker.start({**resolved["tracking"], "uri": tracking_uri(cfg.tracking.uri)}, name, tags,
                                cfg.parent_run_id)
        tracker.log_config(resolved)
        tracker.log_text(genotype.to_json(), "genotype/genotype.json")
        tracker.log_text(json.dumps({n: {"train": [r.name for r in tr], "val": [r.name for r in va]}
                                     for n, (_, (tr, va)) in pools.items()}, indent=1), "data/split.json")
        record_run(run_dir, tracker, name, identity)
    loop_config = {
        "backend": cfg.cluster.backend, "run_dir": str(run_dir), "meta": resolved["meta"],
        "genotype": genotype.to_dict(),
        "tasks": {n: {"task": task_config(n), "records": [dataclasses.asdict(r) for r in train_records]}
                  for n, (_, (train_records, _)) in pools.items()},
        "tracking_uri": tracker.uri, "mlflow_run_id": tracker.run_id,
        "threads_per_worker": int(cfg.cluster.cpus_per_worker),
    }
    print(f"meta-training {genotype.name} with {settings.algorithm} on {', '.join(sorted(pools))}: "
          f"{settings.pretrain_steps} joint then {settings.steps} outer steps of {settings.meta_batch} "
          f"tasks, {workers} worker(s), run {name} (MLflow {tracker.run_id})")
    run_workers(cfg, meta_worker, loop_config, name, storage, workers, use_gpu, tracker,
                memory_knobs="meta.crop, meta.support or meta.query")
    tracker.finish()
    metrics = tracker.client.get_run(tracker.run_id).data.metrics
    print(f"done: MLflow run {tracker.run_id}; adapt with: timfusion adapt task=... init={tracker.run_id}")
    result = {"run_id": tracker.run_id, "name": name, "metrics": metrics, "tracking_uri": tracker.uri}
    return register_after(cfg, result, tracker.run_id, None)


def multitask_config(cfg: DictConfig) -> DictConfig:
    """The ``meta`` job config of the multitask baseline for an adapt run: the same tasks, data and
    cluster as ``cfg.meta`` names, joint training, as many forward/backward passes as ``cfg.meta``'s
    algorithm would spend (and the same share of them in the fidelity warm-up)."""
    from timfusion.meta.algorithms import META_ALGORITHMS

    settings = cfg.meta
    passes = META_ALGORITHMS.get(str(settings.algorithm)).passes_per_task(int(settings.inner_steps))
    pretrain = int(settings.pretrain_steps)

    def joint_steps(outer: int) -> int:  # the first `outer` steps: pre-training's take one pass per task
        return min(outer, pretrain) + max(0, outer - pretrain) * passes

    base = compose("meta", [])
    with open_dict(base):
        for key in ("paths", "tracking", "cluster", "data", "meta"):
            base[key] = OmegaConf.create(to_container(cfg[key]))
        base.meta.algorithm = "multitask"
        base.meta.steps = joint_steps(pretrain + int(settings.steps))
        base.meta.pretrain_steps = 0
        # the warm-up covers the passes of the same outer steps
        base.meta.fidelity_warmup_steps = joint_steps(int(settings.fidelity_warmup_steps))
        base.workdir = str(cfg.workdir)
        base.name = None
    return base


@command("adapt", config="adapt",
         summary="fine-tune from a meta-initialization (or random, multitask) with the trainer")
def adapt(cfg: DictConfig) -> dict[str, Any]:
    from timfusion.platform.models import NETWORK_FORMS, load_network
    from timfusion.search_spaces.genotype import load_genotype

    check_bounds("", cfg, at_least_one=("steps",))  # adapt's own name for train.steps
    check_train_settings(cfg)  # before init=multitask's meta-training, not after it
    check_register(cfg)
    init = str(cfg.init)
    tags = {"job": "adapt", "init": init}
    if init == "random":
        reference = None
    elif init == "multitask":
        check_meta_settings(cfg.meta)
        _, val_records = training_records(cfg, task_from(cfg), Path(str(cfg.workdir)).resolve())
        check_val_images(cfg, val_records)  # the adaptation's validation, before the baseline's meta-training
        baseline = meta(multitask_config(cfg))
        reference, tags["init_run_id"] = f"runs:/{baseline['run_id']}", baseline["run_id"]
    elif RUN_ID.fullmatch(init):
        reference, tags["init_run_id"] = f"runs:/{init}", init
    else:
        reference = init
        if not init.startswith(("runs:/", "models:/")) and not Path(init).exists():
            raise UserError(f"init={init}: no such run or model file; expected random, multitask, a meta "
                            f"run id, or one of {', '.join(NETWORK_FORMS)}")
        if init.startswith("runs:/"):
            tags["init_run_id"] = init[len("runs:/"):].split("/")[0]
        elif init.startswith("models:/"):  # lineage: the run the registered version came from
            from timfusion.platform.model_registry import get_version, parse_model_uri
            from timfusion.platform.tracking import mlflow_client, tracking_uri

            name, alias, number = parse_model_uri(init)
            version = get_version(mlflow_client(tracking_uri(cfg.tracking.uri)), name, number, alias)
            tags["init_run_id"] = version.run_id
            tags["init_model_version"] = f"{name}/{version.version}"
    with open_dict(cfg):
        if reference is None:
            cfg.genotype = cfg.genotype or cfg.meta.genotype
        else:
            cfg.init_weights = reference
            if not cfg.init_warmup:
                cfg.train.warmup_steps = 0
                cfg.train.fidelity_warmup_steps = 0
            if not cfg.genotype:
                _, stored, _ = load_network(reference, cfg.tracking.uri)
                path = Path(str(cfg.workdir)).resolve() / "genotypes" / f"{stored.name}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, stored.to_json())  # concurrent adapts may read it
                cfg.genotype = str(path)
        load_genotype(str(cfg.genotype))
        cfg.tags = {**to_container(cfg.tags), **tags}
        if init != "multitask":  # only that init is built from meta.*: recorded, it would misdescribe the run
            del cfg["meta"]
    return train(cfg)
