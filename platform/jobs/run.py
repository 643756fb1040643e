"""``timfusion run``: the main job on embedded defaults, chaining the other commands."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from timfusion.platform.config import compose
from timfusion.platform.errors import UserError, check_bounds, naming
from timfusion.platform.jobs import command
from timfusion.platform.jobs.data import synth
from timfusion.platform.jobs.evaluate import evaluate
from timfusion.platform.jobs.fuse import fuse


def _list(values: Any) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


def _train_compact(cfg: DictConfig, task: str, workdir: Path, tracking: str) -> dict[str, Any]:
    """Train the configured genotype briefly on fresh synthetic pairs (another seed than the evaluation's)."""
    from timfusion.platform.jobs.train import train

    spec = cfg.train
    height, width = spec.size
    return train(compose("train", [
        task, "cluster=local", f"cluster.num_workers={spec.workers}",
        f"cluster.storage_path={workdir / 'runs' / 'ray'}",
        f"tracking.uri={tracking}", f"workdir={workdir / 'train'}", f"genotype={spec.genotype}",
        "data=synthetic", f"data.synthetic.n={spec.n}", f"data.synthetic.size=[{height},{width}]",
        f"data.synthetic.seed={int(cfg.seed) + 1}", f"train.steps={spec.steps}",
        f"train.time_budget_s={spec.time_budget_s}", f"train.checkpoint_every={spec.steps}",
        f"guidance.weight={spec.guidance_weight}",
        f"name=run-{spec.genotype}-{time.strftime('%Y%m%d-%H%M%S')}",
    ]))


def _search_and_train(cfg: DictConfig, task: str, workdir: Path, tracking: str) -> dict[str, Any]:
    """A small architecture search on synthetic pairs; its chosen genotype is trained by the search job."""
    from timfusion.platform.jobs.search import search

    spec, train_spec = cfg.search, cfg.train
    height, width = train_spec.size
    retrain = [f"train.steps={train_spec.steps}", f"train.time_budget_s={spec.time_budget_s}",
               f"train.checkpoint_every={train_spec.steps}", f"guidance.weight={train_spec.guidance_weight}",
               f"cluster.num_workers={train_spec.workers}"]
    return search(compose("search", [
        task, f"search_space={spec.space}", "cluster=local",
        f"cluster.storage_path={workdir / 'runs' / 'ray'}",
        f"tracking.uri={tracking}", f"workdir={workdir / 'search'}", "data=synthetic",
        f"data.synthetic.n={train_spec.n}", f"data.synthetic.size=[{height},{width}]",
        f"data.synthetic.seed={int(cfg.seed) + 1}", f"trials={spec.trials}", f"steps={spec.steps}",
        f"report_every={max(1, int(spec.steps) // 4)}", "search.warmup_steps=4", "search.cost_size=[64,64]",
        "retrain.overrides=[" + ",".join(f'"{o}"' for o in retrain) + "]",
        f"name=run-search-{time.strftime('%Y%m%d-%H%M%S')}",
    ]))


def _meta_and_adapt(cfg: DictConfig, workdir: Path, tracking: str) -> dict[str, Any]:
    """A short meta-initialization on synthetic data of the other families, then adaptation to
    the held-out one from it and from random init: their validation-loss curves side by side."""
    from mlflow.tracking import MlflowClient

    from timfusion.platform.jobs.meta import adapt, meta
    from timfusion.platform.report import text_table

    spec = cfg.meta
    height, width = spec.size
    data = ["data=synthetic", f"data.synthetic.n={spec.n}", f"data.synthetic.size=[{height},{width}]",
            f"data.synthetic.seed={int(cfg.seed) + 2}", f"tracking.uri={tracking}",
            f"cluster.storage_path={workdir / 'runs' / 'ray'}"]
    stamp = time.strftime('%Y%m%d-%H%M%S')
    meta_run = meta(compose("meta", [
        *data, "cluster=local", f"cluster.num_workers={spec.workers}", f"workdir={workdir / 'meta'}",
        f"meta.genotype={spec.genotype}", f"meta.algorithm={spec.algorithm}",
        f"meta.tasks={_list(spec.tasks)}", f"meta.exclude=[{spec.held_out}]",
        f"meta.steps={spec.steps}", f"meta.fidelity_warmup_steps={spec.fidelity_warmup_steps}",
        f"meta.meta_batch={spec.meta_batch}", f"meta.crop={spec.crop}",
        f"name=run-meta-{stamp}",
    ]))
    curves = {}
    for label, init in (("meta-init", meta_run["run_id"]), ("random init", "random")):
        run = adapt(compose("adapt", [
            *data, "cluster=none", f"workdir={workdir / 'adapt'}", f"task={spec.held_out}", f"init={init}",
            f"meta.genotype={spec.genotype}",
            f"steps={spec.adapt_steps}", f"train.val_every={spec.val_every}",
            f"train.log_every={spec.val_every}", f"train.checkpoint_every={spec.adapt_steps}",
            f"train.crop={spec.crop}", "train.batch_size=4",
            "train.val_max_pairs=2", "val_metrics=[VIF,Qabf]", "guidance.weight=0",
            f"name=run-adapt-{label.split()[0]}-{stamp}",
        ]))
        history = MlflowClient(tracking).get_metric_history(run["run_id"], "val/loss")
        curves[label] = {m.step: m.value for m in history}
    rows = [{"step": step, **{label: values.get(step) for label, values in curves.items()}}
            for step in sorted(set().union(*curves.values()))]
    print(f"adaptation to {spec.held_out} (validation fusion loss; meta-trained on "
          f"{', '.join(t for t in spec.tasks if t != spec.held_out)} with {spec.algorithm}):")
    print(text_table(rows, ["step", *curves]))
    return {"meta_run_id": meta_run["run_id"], "curves": curves}


def _register_and_promote(cfg: DictConfig, run_id: str, workdir: Path, tracking: str) -> str:
    """Register the trained run, promote it to @champion through the gate (a refusal keeps the
    earlier champion of this store), and return the champion's ``models:/`` URI."""
    from timfusion.platform.jobs.registry import promote, register
    from timfusion.platform.model_registry import GateFailed

    registered = register(compose("register", [f"run={run_id}", f"tracking.uri={tracking}"]))
    name, version = registered["name"], registered["version"]
    try:
        promote(compose("promote", [f"name={name}", f"version={version}", f"gate={cfg.registry.gate}",
                                    f"tracking.uri={tracking}", f"workdir={workdir / 'promote'}"]))
    except GateFailed as refused:
        print(f"  {refused}; the earlier champion stays")
    return f"models:/{name}@champion"


def check_run_settings(cfg: DictConfig) -> None:
    """The names and counts each stage takes from ``run.*``, before the first stage: a typo in a
    late one (``metrics``, ``meta.algorithm``) would otherwise end the job after minutes of work."""
    from timfusion.platform.config import check_option, task_config
    from timfusion.platform.jobs.meta import check_algorithm
    from timfusion.search_spaces.genotype import load_genotype
    from timfusion.tasks.fusers import BASELINES
    from timfusion.tasks.metrics import resolve_metrics

    check_bounds("", cfg, at_least_one=("n",), seeds=("seed",))
    resolve_metrics(str(cfg.definition), list(cfg.metrics), key="metrics")
    for name in cfg.baselines:
        with naming("baselines"):
            BASELINES.get(str(name))
    if cfg.train.enabled or cfg.search.enabled:  # the search's retraining takes train.*'s counts
        check_bounds("train", cfg.train, at_least_one=("steps", "n", "workers"), positive=("time_budget_s",))
    if cfg.train.enabled:
        load_genotype(str(cfg.train.genotype), key="train.genotype")
    if cfg.search.enabled:
        check_bounds("search", cfg.search, at_least_one=("trials", "steps"), positive=("time_budget_s",))
        check_option("search_space", str(cfg.search.space), "search.space")
    if cfg.train.enabled and cfg.registry.enabled:
        check_option("gate", str(cfg.registry.gate), "registry.gate")
    if cfg.meta.enabled:
        spec = cfg.meta
        check_bounds("meta", spec, at_least_one=("steps", "meta_batch", "workers", "crop", "n", "adapt_steps",
                                                 "val_every"), non_negative=("fidelity_warmup_steps",))
        check_algorithm(str(spec.algorithm))
        load_genotype(str(spec.genotype), key="meta.genotype")
        for name in spec.tasks:
            task_config(str(name), key="meta.tasks")
        if spec.held_out not in spec.tasks:
            raise UserError(f"meta.held_out={spec.held_out}: not among meta.tasks ({', '.join(spec.tasks)})")


@command("run", config="run",
         summary="the main job: synthetic data -> baselines + trained network -> ranking")
def run(cfg: DictConfig) -> dict[str, Any]:
    check_run_settings(cfg)
    workdir = Path(str(cfg.workdir)).resolve()
    data_dir, fused_dir, eval_dir = workdir / "data", workdir / "fused", workdir / "evaluate"
    task = f"task={OmegaConf.select(cfg, 'task.name')}"
    tracking = f"sqlite:///{workdir / 'runs' / 'mlflow.db'}"
    steps = 3 + bool(cfg.train.enabled) + bool(cfg.search.enabled) + bool(cfg.meta.enabled)
    print(f"[1/{steps}] synthetic {cfg.task.name} data -> {data_dir}")
    height, width = cfg.size
    synth(compose("data_synth", [task, f"out={data_dir}", f"n={cfg.n}", f"size=[{height},{width}]",
                                 f"seed={cfg.seed}", "overwrite=true"]))
    print(f"[2/{steps}] fusing with baselines {', '.join(cfg.baselines)}")
    for name in cfg.baselines:
        fuse(compose("fuse", [task, f"model=baseline:{name}", f"data.root={data_dir}",
                              f"out={fused_dir / name}", "overwrite=true"]))
    methods = list(cfg.baselines)

    def fuse_trained(method: str, model: str) -> str:
        """Fuse the evaluation pairs with a tracked model (runs:/ or models:/) into fused/<method>."""
        fuse(compose("fuse", [task, f"model={model}", f"tracking.uri={tracking}",
                              f"data.root={data_dir}", f"out={fused_dir / method}", "overwrite=true"]))
        return method

    trained = searched = None
    stage = 3
    if cfg.search.enabled:
        print(f"[{stage}/{steps}] architecture search ({cfg.search.trials} trials on Ray Tune + Optuna, "
              f"space {cfg.search.space}), then training its genotype")
        (workdir / "runs").mkdir(parents=True, exist_ok=True)
        searched = _search_and_train(cfg, task, workdir, tracking)
        methods.append(fuse_trained("timfusion_searched", f"runs:/{searched['retrain']['run_id']}"))
        stage += 1
    if cfg.train.enabled:
        registry = (", then registering it and promoting it to @champion behind the gate"
                    if cfg.registry.enabled else "")
        print(f"[{stage}/{steps}] training {cfg.train.genotype} on Ray Train (synthetic {cfg.task.name}, "
              f"at most {cfg.train.time_budget_s} s){registry}")
        (workdir / "runs").mkdir(parents=True, exist_ok=True)
        trained = _train_compact(cfg, task, workdir, tracking)
        model = f"runs:/{trained['run_id']}"
        if cfg.registry.enabled:
            model = trained["champion"] = _register_and_promote(cfg, trained["run_id"], workdir, tracking)
        methods.append(fuse_trained(f"timfusion_{cfg.train.genotype}", model))
        stage += 1
    adapted = None
    if cfg.meta.enabled:
        print(f"[{stage}/{steps}] meta-initialization ({cfg.meta.algorithm}, learn2learn on Ray Train) on "
              f"synthetic data of three families, then adaptation to {cfg.meta.held_out}")
        (workdir / "runs").mkdir(parents=True, exist_ok=True)
        adapted = _meta_and_adapt(cfg, workdir, tracking)
    print(f"[{steps}/{steps}] scoring with the {cfg.definition} metrics")
    result = evaluate(compose("evaluate", [task, f"data.root={data_dir}", f"fused={fused_dir}",
                                           f"definition={cfg.definition}", f"metrics={_list(cfg.metrics)}",
                                           f"out={eval_dir}", f"methods={_list(methods)}"]))
    print(f"\ndone. results under {workdir}:\n  rank table  {eval_dir / 'ranks.md'}\n"
          f"  rank chart  {eval_dir / 'ranks.png'}\n  fused images {fused_dir}/<method>/")
    if searched is not None:
        print(f"  search      {searched['genotype_path']} (MLflow run {searched['run_id']})")
    if trained is not None or searched is not None:
        run_id = (trained or searched)["run_id"]
        print(f"  MLflow store {tracking} (run {run_id})\n"
              f"  open its UI: mlflow ui --backend-store-uri {tracking}")
    return {**result, "train": trained, "search": searched, "meta": adapted}
