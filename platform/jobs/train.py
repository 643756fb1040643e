"""``timfusion train``: prepare data, start the MLflow run, run the Ray Train job, log the results."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from timfusion.platform.config import shared_root, to_container
from timfusion.platform.errors import (
    JobFailed,
    UserError,
    cause_line,
    check_bounds,
    is_integer,
    naming,
    out_of_memory_errors,
)
from timfusion.platform.jobs import command
from timfusion.platform.jobs.common import task_from
from timfusion.platform.jobs.registry import check_register, register_after
from timfusion.platform.storage import job_storage, ray_storage, redact
from timfusion.platform.tracking import Tracker, tracking_uri
from timfusion.platform.training import read_run_info, record_run, scored_pairs, train_worker
from timfusion.tasks import FusionTask
from timfusion.tasks.datasets import PairRecord, fingerprint, load_records


def training_records(cfg: DictConfig, task: FusionTask,
                     workdir: Path) -> tuple[list[PairRecord], list[PairRecord]]:
    """The seeded train/validation split of the configured data (names prefixed by dataset)."""
    data = cfg.data
    check_bounds("data", data, seeds=("val_seed",))
    if not 0 < data.val_fraction < 1:  # a share: 0 or 1 would leave one side a single pair
        raise UserError(f"data.val_fraction must be > 0 and < 1, got {data.val_fraction}")
    if data.source == "synthetic":
        from timfusion.tasks.synthetic import synthesized_once

        root = synthesized_once(task.synthetic, workdir, data.synthetic.n, data.synthetic.seed,
                                data.synthetic.size, prefix="data.synthetic.")
        pools = {"synthetic": load_records(str(root), task)}
    elif data.source == "root":
        pools = {"data": load_records(str(data.root), task, filters=dict(data.filter))}
    elif data.source == "task":
        names = list(data.datasets) if data.datasets else [
            k for k, spec in task.datasets.items() if spec.role in ("train", "val")
        ]
        unknown = [n for n in names if n not in task.datasets]
        if unknown:
            raise UserError(f"data.datasets: {', '.join(unknown)} not datasets of task {task.name}; "
                            f"valid choices: {', '.join(sorted(task.datasets))}")
        base = shared_root(cfg.paths.shared) / "data"
        pools = {}
        for name in names:
            spec = task.datasets[name]
            if not (base / spec.path).exists():
                raise UserError(f"data.datasets: {base / spec.path} does not exist "
                                "(set paths.shared or $TIMFUSION_SHARED, or use data=synthetic)")
            pools[name] = load_records(str(base / spec.path), task,
                                       filters={**spec.filter, **dict(data.filter)})
    else:
        raise UserError(f"data.source={data.source}: expected task, synthetic or root")
    records = [dataclasses.replace(r, name=f"{pool}/{r.name}") for pool, rs in pools.items() for r in rs]
    if len(records) < 2:
        raise UserError(f"training data: {len(records)} pair(s); need at least 2 (train and validation)")
    order = np.random.default_rng(int(data.val_seed)).permutation(len(records))
    n_val = min(len(records) - 1, max(1, round(float(data.val_fraction) * len(records))))
    val = sorted((records[i] for i in order[:n_val]), key=lambda r: r.name)
    train = sorted((records[i] for i in order[n_val:]), key=lambda r: r.name)
    return train, val


def resolve_workers(cluster: DictConfig) -> tuple[int, bool]:
    """The number of training workers and whether they use GPUs, from the cluster config."""
    import torch

    if cluster.use_gpu not in ("auto", True, False):
        raise UserError(f"cluster.use_gpu={cluster.use_gpu}: expected auto, true or false")
    gpus = torch.cuda.device_count()
    use_gpu = gpus > 0 if cluster.use_gpu == "auto" else bool(cluster.use_gpu)
    if cluster.num_workers == "auto":
        workers = gpus if use_gpu and gpus > 0 else 2
    elif is_integer(cluster.num_workers) and cluster.num_workers >= 1:
        workers = cluster.num_workers
    else:
        raise UserError(f"cluster.num_workers={cluster.num_workers}: expected auto or an integer >= 1")
    check_bounds("cluster", cluster, positive=("cpus_per_worker",))
    check_placeable(cluster, workers, float(cluster.cpus_per_worker), 1.0 if use_gpu else 0.0,
                    f"cluster.num_workers={workers} x cluster.cpus_per_worker={cluster.cpus_per_worker}"
                    + (" with a GPU each" if use_gpu else ""))
    return workers, use_gpu


def node_capacity(cluster: DictConfig) -> list[tuple[float, float]] | None:
    """(CPUs, GPUs) of each node that can take work, for a cluster of fixed size: the one this
    process has joined already, else the embedded one (``cluster.num_cpus``, this machine's GPUs)
    or ``cluster up``'s worker nodes. None for a cluster joined by address, which may autoscale."""
    import torch

    if cluster.backend != "ray" or cluster.address:
        return None
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return [(float(node["Resources"].get("CPU", 0)), float(node["Resources"].get("GPU", 0)))
                for node in ray.nodes() if node["Alive"]]
    if "state_dir" in cluster:  # cluster=local_multinode: the nodes `cluster up` started
        from timfusion.platform.local_cluster import ClusterState

        state = ClusterState.read(str(cluster.state_dir))
        return [(float(node.cpus), float(node.gpus)) for node in state.nodes] if state else None
    return [(float(cluster.num_cpus or os.cpu_count() or 1), float(torch.cuda.device_count()))]


def check_placeable(cluster: DictConfig, count: int, cpus: float, gpus: float, what: str) -> None:
    """Refuse ``count`` actors of ``cpus``/``gpus`` each that a fixed-size cluster can never hold
    at once: Ray would wait for them forever."""
    nodes = node_capacity(cluster)
    if nodes is None:
        return
    fits = sum(min(int(node_cpus // cpus) if cpus else count, int(node_gpus // gpus) if gpus else count)
               for node_cpus, node_gpus in nodes)
    if fits < count:
        have = ", ".join(f"{c:g} CPU(s)" + (f" and {g:g} GPU(s)" if g else "") for c, g in nodes)
        raise UserError(f"{what}: the cluster (cluster={cluster.name}: nodes of {have}) holds {fits} at "
                        "once; Ray would wait for the rest forever")


def init_ray(cluster: DictConfig) -> None:
    """Start (or join) the Ray cluster the config names; idempotent."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if cluster.address:
        kwargs["address"] = str(cluster.address)
    elif "state_dir" in cluster:  # cluster=local_multinode: the address `cluster up` wrote
        from timfusion.platform.local_cluster import address_of

        kwargs["address"] = address_of(str(cluster.state_dir))
    else:
        kwargs["num_cpus"] = int(cluster.num_cpus) if cluster.num_cpus else os.cpu_count()
        if cluster.temp_dir:
            kwargs["_temp_dir"] = str(Path(str(cluster.temp_dir)).resolve())
    ray.init(**kwargs)


def check_train_settings(cfg: DictConfig) -> None:
    """Every ``train.*`` and ``guidance.*`` value within its range, before any data or Ray work."""
    check_bounds("train", cfg.train,
                 at_least_one=("steps", "batch_size", "crop", "checkpoint_every", "log_every",
                               "val_max_pairs"),
                 non_negative=("weight_decay", "warmup_steps", "fidelity_warmup_steps", "val_every",
                               "loader_workers"),
                 positive=("lr", "grad_clip", "time_budget_s"), seeds=("seed",),
                 optional=("time_budget_s", "val_max_pairs"))
    check_bounds("guidance", cfg.guidance, at_least_one=("head_width",),
                 non_negative=("weight", "warmup_steps"), positive=("head_lr",))
    from timfusion.tasks.metrics import resolve_metrics

    resolve_metrics("tang", list(cfg.val_metrics), key="val_metrics")


def check_val_images(cfg: DictConfig, val_records: list[PairRecord]) -> None:
    """Every ``val_metrics`` metric can score the validation pairs training will score, checked
    before training: otherwise the run fails at its first validation (VIF needs 41 px)."""
    from timfusion.tasks.imageio import image_size
    from timfusion.tasks.metrics import check_scorable, resolve_metrics

    scored = scored_pairs(val_records, cfg.train.val_max_pairs)
    if not scored:
        return
    sizes = {record.name: image_size(record.a) for record in scored}
    smallest = min(sizes, key=lambda name: min(sizes[name]))
    specs = resolve_metrics("tang", list(cfg.val_metrics), key="val_metrics")
    with naming(f"val_metrics, validation pair {smallest}"):
        check_scorable(specs, *sizes[smallest], key="val_metrics")


@command("train", config="train", summary="task-guided fusion training on Ray Train, tracked in MLflow")
def train(cfg: DictConfig) -> dict[str, Any]:
    from timfusion.search_spaces.genotype import load_genotype
    from timfusion.search_spaces.network import FusionNetwork, count_parameters

    task = task_from(cfg)
    genotype = load_genotype(str(cfg.genotype))
    FusionNetwork(genotype)  # an unbuildable genotype fails here, before any data or Ray work
    check_train_settings(cfg)
    check_register(cfg)
    init_state = initial_weights(cfg.init_weights, genotype, cfg.tracking.uri) if cfg.init_weights else None
    workers, use_gpu = resolve_workers(cfg.cluster)
    storage = job_storage(cfg)
    name = cfg.name or f"{task.name}-{genotype.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    guided = float(cfg.guidance.weight) > 0
    identity = {"task": task.name, "genotype": genotype.to_dict(),
                "guidance.head_width": int(cfg.guidance.head_width) if guided else None}
    run_dir, info = prepare_run_dir(cfg, name, storage, identity)
    workdir = Path(str(cfg.workdir)).resolve()
    train_records, val_records = training_records(cfg, task, workdir)
    check_val_images(cfg, val_records)
    resolved = to_container(cfg)
    uri = tracking_uri(cfg.tracking.uri)
    if info is not None:
        tracker = Tracker(info["tracking_uri"], info["mlflow_run_id"])
        tracker.set_tags({"resumed_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
    else:
        tags = {
            "task": task.name, "genotype": genotype.name, "job": "train",
            "dataset_fingerprint": fingerprint(train_records + val_records),
            "train_fingerprint": fingerprint(train_records), "val_fingerprint": fingerprint(val_records),
            "parameters": str(count_parameters(FusionNetwork(genotype))),
            **({"init_weights": str(cfg.init_weights)} if cfg.init_weights else {}),
            **{str(k): str(v) for k, v in (cfg.tags or {}).items()},
        }
        tracker = Tracker.start({**resolved["tracking"], "uri": uri}, name, tags, cfg.parent_run_id)
        tracker.log_config(resolved)
        tracker.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config/config.yaml")
        tracker.log_text(genotype.to_json(), "genotype/genotype.json")
        tracker.log_text(json.dumps({"train": [r.name for r in train_records],
                                     "val": [r.name for r in val_records],
                                     "val_seed": int(cfg.data.val_seed)}, indent=1), "data/split.json")
        record_run(run_dir, tracker, name, identity)
    loop_config = {
        "backend": cfg.cluster.backend, "run_dir": str(run_dir), "task": resolved["task"],
        "genotype": genotype.to_dict(), "train": resolved["train"], "guidance": resolved["guidance"],
        "val_metrics": resolved["val_metrics"], "faults": resolved["faults"],
        "train_records": [dataclasses.asdict(r) for r in train_records],
        "val_records": [dataclasses.asdict(r) for r in val_records],
        "tracking_uri": tracker.uri, "mlflow_run_id": tracker.run_id,
        "threads_per_worker": int(cfg.cluster.cpus_per_worker), "init_state": init_state,
    }
    print(f"training {genotype.name} for {task.name}: {len(train_records)} train / "
          f"{len(val_records)} val pairs, "
          f"{workers if cfg.cluster.backend == 'ray' else 1} worker(s), run {name} (MLflow {tracker.run_id})")
    started = time.perf_counter()
    run_workers(cfg, train_worker, loop_config, name, storage, workers, use_gpu, tracker,
                memory_knobs="train.crop or train.batch_size")
    tracker.set_tags({"wall_seconds": f"{time.perf_counter() - started:.1f}"})
    tracker.finish()
    metrics = tracker.client.get_run(tracker.run_id).data.metrics
    print(f"done: MLflow run {tracker.run_id}; model runs:/{tracker.run_id}/model/model.pt\n"
          f"  fuse with: timfusion fuse model=runs:/{tracker.run_id} a=... b=... out=...\n"
          f"  browse:    mlflow ui --backend-store-uri {tracker.uri}")
    result = {"run_id": tracker.run_id, "name": name, "metrics": metrics, "tracking_uri": tracker.uri}
    return register_after(cfg, result, tracker.run_id, task.name)


def prepare_run_dir(cfg: DictConfig, name: str, storage: str, identity: dict[str, Any],
                    kind: str = "run") -> tuple[Path, dict[str, Any] | None]:
    """The run's folder under ``storage``, where runs of its kind keep theirs (train and meta: the
    job storage, in the workdir when that is remote; search: its workdir), and its run info when
    it exists; errors for a bad ``resume``/``name`` pair, for a folder of that name not a run's,
    or for a resumed run whose ``identity`` (see :func:`check_resumed`) has changed. ``kind``
    names the run in the errors (``search``)."""
    run_dir = (Path(storage) / name if "://" not in storage
               else Path(str(cfg.workdir)).resolve() / "runs" / name)
    info = read_run_info(run_dir)
    if cfg.resume and info is None:
        raise UserError(f"resume=true: no {kind} {name!r} under {storage} to resume (pass its name=)")
    if not cfg.resume and (info is not None or (run_dir.exists() and any(run_dir.iterdir()))):
        raise UserError(f"name={name}: a {kind} of that name exists under {storage}; "
                        "pass resume=true to continue it or choose another name")
    check_resumed(info, identity, name)
    return run_dir, info


def check_resumed(info: dict[str, Any] | None, identity: dict[str, Any], name: str) -> None:
    """resume=true continues ``name``'s checkpoints: what their shapes depend on (``identity``,
    recorded in the run info: task, genotype, head, ...) must be the run's own, or loading them
    fails in a worker after its restarts. Values None on either side (no head) are not compared;
    runs recorded before identities were are not checked."""
    stored = (info or {}).get("identity") or {}
    asked = json.loads(json.dumps(identity))  # as the run info holds it: lists, not tuples

    def shown(value: Any) -> str:
        return str(value.get("name", "another mapping")) if isinstance(value, dict) else str(value)

    changed = [f"{key} is {shown(value)} where the run has {shown(stored[key])}"
               for key, value in asked.items()
               if stored.get(key) is not None and value is not None and stored[key] != value]
    if changed:
        raise UserError(f"resume=true name={name}: {'; '.join(changed)}; resume with the run's settings "
                        "or choose another name")


def initial_weights(reference: str, genotype: Any, tracking: str | None) -> bytes:
    """The weights training starts from (``init_weights=``: a model file, folder, ``runs:/`` or
    ``models:/``), as the bytes of a state dict; the file's genotype must be the run's."""
    import io

    import torch

    from timfusion.platform.models import load_network

    network, stored, _ = load_network(str(reference), tracking)
    if stored.to_dict() | {"name": None} != genotype.to_dict() | {"name": None}:
        raise UserError(f"init_weights={reference}: its genotype {stored.name!r} is not the requested "
                        f"genotype {genotype.name!r} (pass genotype= matching the initialization)")
    buffer = io.BytesIO()
    torch.save(network.state_dict(), buffer)
    return buffer.getvalue()


def run_workers(cfg: DictConfig, loop: Any, loop_config: dict, name: str, storage: str, workers: int,
                use_gpu: bool, tracker: Tracker, memory_knobs: str) -> None:
    """Run ``loop`` in this process (``cluster.backend=local``) or on Ray Train workers; a failure
    marks the MLflow run FAILED before it propagates. Out of memory, the error names
    ``memory_knobs``: the settings that size the loop's step."""
    try:
        if cfg.cluster.backend == "local":
            loop(loop_config)
        else:
            fit_with_ray(cfg, loop, loop_config, name, storage, workers, use_gpu)
    except out_of_memory_errors() as err:
        tracker.finish("FAILED")
        raise JobFailed(f"run {name}: out of memory ({cause_line(err)}); lower {memory_knobs}") from err
    except BaseException:
        tracker.finish("FAILED")
        raise


def out_of_memory_stop() -> Any:
    """A Ray Train callback that ends the run at a worker's out-of-memory error: a restart runs
    the same step with the same crop and batch on the same machine and runs out again, so the
    ``cluster.max_failures`` restarts would only be spent (minutes each) before the same error."""
    import ray.train

    class OutOfMemoryStop(ray.train.UserCallback):
        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            for error in worker_exceptions.values():
                if isinstance(error, out_of_memory_errors()):
                    raise error  # a controller error: Ray Train raises it without a restart

    return OutOfMemoryStop()


def fit_with_ray(cfg: DictConfig, loop: Any, loop_config: dict, name: str, storage: str, workers: int,
                 use_gpu: bool) -> None:
    """Run ``loop`` on a Ray Train worker group (DDP), checkpoints under ``storage``/``name``."""
    import ray.train
    from ray.train.torch import TorchTrainer

    init_ray(cfg.cluster)
    storage_path, filesystem = ray_storage(storage)
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers, use_gpu=use_gpu,
            resources_per_worker={"CPU": float(cfg.cluster.cpus_per_worker)},
        ),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=int(cfg.cluster.max_failures)),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[out_of_memory_stop()],
        ),
    )
    try:
        result = trainer.fit()
    except Exception as err:  # Ray Train's TrainingFailedError after the worker-group restarts
        stopped = getattr(err, "controller_failure", None)
        if isinstance(stopped, out_of_memory_errors()):
            raise stopped from None  # out_of_memory_stop's: run_workers names the knobs to lower
        raise JobFailed(f"training run {name} failed after {int(cfg.cluster.max_failures)} restart(s) "
                        f"allowed: {redact(cause_line(err))}") from err
    if result.error is not None:
        raise JobFailed(f"training run {name} failed: {redact(cause_line(result.error))}")
