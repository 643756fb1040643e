"""Adaptation to a held-out fusion family: meta-init vs random init vs multitask init.

Usage::

    python benchmarks/meta.py [--families ir_vis medical multi_exposure multi_focus]
                              [--algorithm maml] [--meta-steps 100] [--inner-steps 3]
                              [--adapt-steps 200]
                              [--random-steps 1000] [--data task] [--threads N]
                              [--out benchmarks/results/meta.json]

For each family held out in turn (``meta.exclude=[FAMILY]``), on the real data of
../shared/data (``--data task``; ``synthetic`` for a quick look):

The network is ``--genotype`` (default ``compact_regression``: the compact default starts
as the activity rule, near the optimum of every family's loss, so no initialization could
help it).

1. ``timfusion meta`` learns the initialization on the other families (``--algorithm``,
   ``--meta-steps`` outer steps; the meta defaults otherwise), in-process on all threads;
2. the multitask baseline: ``timfusion meta meta.algorithm=multitask`` on the same
   families with as many forward/backward passes (``adapt init=multitask``'s rule);
3. ``timfusion adapt`` to the held-out family from each: meta-init and multitask for
   ``--adapt-steps``, random for ``--random-steps``, validating every ``--val-every`` steps
   (random init: every ``--random-val-every``)
   on the family's validation pairs (fusion loss, VIF, Qabf); step 0 is the
   initialization itself, validated the same way.

Reported: the loss, VIF and Qabf after 0, 10, 50 and 200 steps, and the steps each
initialization needs to reach the validation loss random init reaches after
``--random-steps`` (">N" when not within its run), both smoothed: the reference is the mean
of random init's last :data:`SMOOTH` validations, and a curve reaches it at the first step
whose centred mean of :data:`SMOOTH` validations is at or below it (a single validation
swings by 0.1-0.3 with BatchNorm's running statistics, even with the weights frozen).
Target: meta-init needs at least 10x fewer steps than random init on every held-out
family, and fewer than multitask init.
Prints the tables, writes the JSON and a PNG of the adaptation curves beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import fmean
from typing import Any

import torch

from timfusion.platform.report import text_table, write_json

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["ir_vis", "medical", "multi_exposure", "multi_focus"]
GENOTYPE = "compact_regression"  # the compact default starts as the activity rule: nothing to adapt
META_TASKS = ["ir_vis", "mri_ct", "mri_pet", "mri_spect", "multi_exposure", "multi_focus"]
CHECKPOINTS = [0, 10, 50, 200]
VAL = ["loss", "VIF", "Qabf"]
SMOOTH = 5  # validations per smoothing window (50 steps at --val-every 10)


def _common(args: argparse.Namespace, workdir: Path) -> list[str]:
    return ["cluster=none", f"cluster.cpus_per_worker={args.threads}", f"data={args.data}",
            f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}", f"cluster.storage_path={workdir / 'ray'}",
            f"workdir={workdir / 'work'}"]


def _meta_overrides(args: argparse.Namespace, family: str) -> list[str]:
    return [f"meta.genotype={args.genotype}", f"meta.algorithm={args.algorithm}",
            f"meta.steps={args.meta_steps}", f"meta.exclude=[{family}]",
            f"meta.tasks=[{','.join(META_TASKS)}]", f"meta.seed={args.seed}",
            f"meta.inner_steps={args.inner_steps}"]


def _adapt_overrides(args: argparse.Namespace, steps: int, val_every: int | None = None) -> list[str]:
    val_every = val_every or args.val_every
    return [f"steps={steps}", f"train.val_every={val_every}", "train.val_max_pairs=4",
            "val_metrics=[VIF,Qabf]", "guidance.weight=0", f"train.crop={args.crop}",
            f"train.batch_size={args.batch}", f"train.checkpoint_every={steps}",
            f"train.log_every={val_every}", f"train.seed={args.seed}"]


def curve(run: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """The run's validation curves from MLflow: ``{metric: [(step, value), ...]}``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(run["tracking_uri"])
    return {m: sorted((h.step, h.value) for h in client.get_metric_history(run["run_id"], f"val/{m}"))
            for m in VAL}


def step_zero(reference: str | None, family: str, args: argparse.Namespace,
              workdir: Path) -> dict[str, float]:
    """The initialization itself on the family's validation pairs (the adapt run's step 0)."""
    from timfusion.platform.config import compose, to_container
    from timfusion.platform.jobs.common import task_from
    from timfusion.platform.jobs.train import training_records
    from timfusion.platform.models import model_file
    from timfusion.platform.training import validate
    from timfusion.search_spaces.network import FusionNetwork, load_model

    cfg = compose("adapt", [*_common(args, workdir), f"task={family}", f"meta.genotype={args.genotype}",
                            *_adapt_overrides(args, 1)])
    task = task_from(cfg)
    _, val_records = training_records(cfg, task, Path(str(cfg.workdir)).resolve())
    if reference is None:
        torch.manual_seed(int(cfg.train.seed))
        network = FusionNetwork(str(cfg.meta.genotype))
    else:
        network, _, _ = load_model(model_file(reference, str(cfg.tracking.uri)))
    metrics, _ = validate(network, None, val_records, task, torch.device("cpu"), to_container(cfg))
    return {m: metrics[m] for m in VAL}


def smoothed(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """(step, mean of the :data:`SMOOTH` validations centred on it, fewer at the ends)."""
    half = SMOOTH // 2
    losses = [loss for _, loss in points]
    return [(step, fmean(losses[max(0, i - half):i + half + 1])) for i, (step, _) in enumerate(points)]


def reference_loss(points: list[tuple[int, float]]) -> float:
    """Random init's loss after its run: the mean of its last :data:`SMOOTH` validations."""
    return fmean(loss for _, loss in points[-SMOOTH:])


def steps_to_reach(points: list[tuple[int, float]], target: float) -> int | None:
    """The first step whose smoothed validation loss is at or below ``target``."""
    return next((step for step, loss in smoothed(points) if loss <= target), None)


def at(points: list[tuple[int, float]], step: int) -> float | None:
    return next((value for s, value in points if s == step), None)


def held_out(family: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from timfusion.platform.config import compose
    from timfusion.platform.jobs.meta import adapt, meta, multitask_config

    common = _common(args, workdir)
    started = time.perf_counter()
    meta_run = meta(compose("meta", [*common, *_meta_overrides(args, family), f"name=meta-{family}"]))
    meta_seconds = time.perf_counter() - started
    started = time.perf_counter()
    multitask_cfg = multitask_config(compose("adapt", [*common, *_meta_overrides(args, family)]))
    multitask_cfg.name = f"multitask-{family}"
    multitask_run = meta(multitask_cfg)
    multitask_seconds = time.perf_counter() - started
    inits = {"meta": meta_run["run_id"], "multitask": multitask_run["run_id"], "random": None}
    result: dict[str, Any] = {"family": family, "meta_run": meta_run["run_id"],
                              "multitask_run": multitask_run["run_id"], "meta_seconds": meta_seconds,
                              "multitask_seconds": multitask_seconds, "inits": {}}
    for label, run_id in inits.items():
        steps = args.random_steps if label == "random" else args.adapt_steps
        val_every = args.random_val_every if label == "random" else args.val_every
        run = adapt(compose("adapt", [*common, f"task={family}", f"init={run_id or 'random'}",
                                      f"meta.genotype={args.genotype}",
                                      *_adapt_overrides(args, steps, val_every),
                                      f"name=adapt-{family}-{label}"]))
        points = curve(run)
        zero = step_zero(f"runs:/{run_id}" if run_id else None, family, args, workdir)
        for metric in VAL:
            points[metric] = [(0, zero[metric]), *points[metric]]
        result["inits"][label] = {"run_id": run["run_id"], "steps": steps, "curve": points}
    target = reference_loss(result["inits"]["random"]["curve"]["loss"])
    result["random_final_loss"] = target
    for entry in result["inits"].values():
        entry["steps_to_random_final"] = steps_to_reach(entry["curve"]["loss"], target)
    return result


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.8), squeeze=False)
    for ax, result in zip(axes[0], results, strict=True):
        for label, entry in result["inits"].items():
            steps, losses = zip(*entry["curve"]["loss"], strict=True)
            ax.plot(steps, losses, label=f"{label} init")
        ax.axhline(result["random_final_loss"], color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(left=0)
        ax.set_title(f"held out: {result['family']}")
        ax.set_xlabel("adaptation steps")
        ax.set_ylabel("validation fusion loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=FAMILIES)
    parser.add_argument("--algorithm", default="maml")
    parser.add_argument("--genotype", default=GENOTYPE, help="the network whose initialization is learned")
    parser.add_argument("--meta-steps", type=int, default=100)
    parser.add_argument("--inner-steps", type=int, default=3,
                        help="meta.inner_steps (the multitask baseline's steps grow with it: equal passes)")
    parser.add_argument("--adapt-steps", type=int, default=200)
    parser.add_argument("--random-steps", type=int, default=1000)
    parser.add_argument("--val-every", type=int, default=10,
                        help="validation interval of meta/multitask adaptation")
    parser.add_argument("--random-val-every", type=int, default=10, help="validation interval of random init")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--data", default="task", choices=["task", "synthetic"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of every run")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "meta.json"))
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()  # before the chdir: a relative --out is the caller's
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="timfusion-meta-bench-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for family in args.families:  # the JSON is rewritten after each family: a long run keeps what it has
        results.append(held_out(family, args, workdir))
        report(results, args, out, workdir)
    return 0


def report(results: list[dict[str, Any]], args: argparse.Namespace, out: Path, workdir: Path) -> None:
    """Print the tables and (re)write the JSON and the PNG for the families done so far."""
    rows, reach = [], []
    for result in results:
        for label, entry in result["inits"].items():
            row: dict[str, Any] = {"held out": result["family"], "init": label}
            for step in CHECKPOINTS:
                for metric in VAL:
                    row[f"{metric}@{step}"] = at(entry["curve"][metric], step)
            rows.append(row)
            found = entry["steps_to_random_final"]
            shown = found if found is not None else f">{entry['steps']}"
            reach.append({"held out": result["family"], "init": label,
                          f"steps to random@{args.random_steps}": shown})
    targets = {}
    for result in results:
        inits = result["inits"]
        meta_steps = inits["meta"]["steps_to_random_final"]
        random_steps = inits["random"]["steps_to_random_final"]
        random_steps = args.random_steps if random_steps is None else random_steps
        multitask_steps = inits["multitask"]["steps_to_random_final"]
        targets[result["family"]] = {
            "meta_10x_fewer_than_random": meta_steps is not None and meta_steps * 10 <= random_steps,
            "meta_fewer_than_multitask": (
                meta_steps is not None and (multitask_steps is None or meta_steps < multitask_steps)
            ),
        }
    print(text_table(rows, list(rows[0])))
    print(text_table(reach, list(reach[0])))
    print(json.dumps(targets, indent=1))
    plot(results, out.with_suffix(".png"))
    payload = {"machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}", "args": vars(args),
               "results": results, "targets": targets, "workdir": str(workdir)}
    write_json(out, payload)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    sys.exit(main())
