"""Adaptation to a held-out fusion family: meta-init vs random init vs multitask init.

Usage::

    python benchmarks/meta.py [--families ir_vis medical multi_exposure multi_focus]
                              [--algorithm maml] [--meta-steps 100] [--inner-steps 3]
                              [--pretrain-steps 0] [--cross-losses | --loss-mixture A]
                              [--adapt-steps 200] [--adapt-seeds 1]
                              [--random-steps 1000] [--reference-points 200 300 500]
                              [--data task] [--threads N] [--out benchmarks/results/meta.json]
    python benchmarks/meta.py --from-json benchmarks/results/meta.json [--reference-points ...]

For each family held out in turn (``meta.exclude=[FAMILY]``), on the real data of
../shared/data (``--data task``; ``synthetic`` for a quick look):

The network is ``--genotype`` (default ``compact_regression``: the compact default starts
as the activity rule, near the optimum of every family's loss, so no initialization could
help it).

1. ``timfusion meta`` learns the initialization on the other families (``--algorithm``,
   ``--meta-steps`` outer steps, ``--cross-losses`` or ``--loss-mixture`` for task augmentation;
   the meta defaults otherwise), in-process on all threads;
2. the multitask baseline: ``timfusion meta meta.algorithm=multitask`` on the same
   families with as many forward/backward passes (``adapt init=multitask``'s rule);
3. ``timfusion adapt`` to the held-out family from each: meta-init and multitask for
   ``--adapt-steps``, random for ``--random-steps``, validating every ``--val-every`` steps
   (random init: every ``--random-val-every``)
   on the family's validation pairs (fusion loss, VIF, Qabf); step 0 is the
   initialization itself, validated the same way. With ``--adapt-seeds N`` every init is
   adapted N times (training seeds ``--seed`` onwards: other crops, batches and, for random
   init, other weights) and its curve is the mean of theirs: from one init, the steps to a
   reference move by tens of steps from one seed to the next.

Reported: the loss, VIF and Qabf after 0, 10, 50 and 200 steps, and the steps each
initialization needs to reach the validation loss random init reaches after
``--random-steps`` (">N" when not within its run), both smoothed: the reference is the mean
of random init's last :data:`SMOOTH` validations, and a curve reaches it at the first step
whose centred mean of :data:`SMOOTH` validations is at or below it (a single validation
swings by 0.1-0.3 with BatchNorm's running statistics, even with the weights frozen).
Each seed's own count is reported beside the mean curve's.
Target: meta-init needs at least 10x fewer steps than random init on every held-out
family, and fewer than multitask init.

The same count against random init's loss after each of ``--reference-points`` steps of its
own run (the mean of its :data:`SMOOTH` validations ending there, the rule of its final loss)
shows how the picture changes with the depth of the loss asked for.

Prints the tables, writes the JSON and a PNG of the adaptation curves beside it.
``--from-json`` reprints an earlier run's tables from its JSON and rewrites the JSON (the
derived figures of this version added) and the PNG; it trains nothing.
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
            f"meta.inner_steps={args.inner_steps}", f"meta.pretrain_steps={args.pretrain_steps}",
            f"meta.cross_losses={str(args.cross_losses).lower()}", f"meta.loss_mixture={args.loss_mixture}"]


def _adapt_overrides(args: argparse.Namespace, steps: int, val_every: int | None = None,
                     seed: int | None = None) -> list[str]:
    val_every = val_every or args.val_every
    seed = args.seed if seed is None else seed
    return [f"steps={steps}", f"train.val_every={val_every}", "train.val_max_pairs=4",
            "val_metrics=[VIF,Qabf]", "guidance.weight=0", f"train.crop={args.crop}",
            f"train.batch_size={args.batch}", f"train.checkpoint_every={steps}",
            f"train.log_every={val_every}", f"train.seed={seed}"]


def curve(run: dict[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """The run's validation curves from MLflow: ``{metric: [(step, value), ...]}``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(run["tracking_uri"])
    return {m: sorted((h.step, h.value) for h in client.get_metric_history(run["run_id"], f"val/{m}"))
            for m in VAL}


def step_zero(reference: str | None, family: str, args: argparse.Namespace,
              workdir: Path, seed: int | None = None) -> dict[str, float]:
    """The initialization itself on the family's validation pairs (the adapt run's step 0;
    random init's depends on the adaptation's ``seed``)."""
    from timfusion.platform.config import compose, to_container
    from timfusion.platform.jobs.common import task_from
    from timfusion.platform.jobs.train import training_records
    from timfusion.platform.models import model_file
    from timfusion.platform.training import validate
    from timfusion.search_spaces.network import FusionNetwork, load_model

    cfg = compose("adapt", [*_common(args, workdir), f"task={family}", f"meta.genotype={args.genotype}",
                            *_adapt_overrides(args, 1, seed=seed)])
    task = task_from(cfg)
    _, val_records = training_records(cfg, task, Path(str(cfg.workdir)).resolve())
    if reference is None:
        torch.manual_seed(int(cfg.train.seed))
        network = FusionNetwork(str(cfg.meta.genotype))
    else:
        network, _, _ = load_model(model_file(reference, str(cfg.tracking.uri)))
    metrics, _ = validate(network, None, val_records, task, torch.device("cpu"), to_container(cfg))
    return {m: metrics[m] for m in VAL}


def mean_curve(curves: list[dict[str, list[tuple[int, float]]]]) -> dict[str, list[tuple[int, float]]]:
    """Per metric, the mean over the seeds' curves at each step all of them validated at."""
    averaged = {}
    for metric in curves[0]:
        values: dict[int, list[float]] = {}
        for points in curves:
            for step, value in points[metric]:
                values.setdefault(step, []).append(value)
        averaged[metric] = [(step, fmean(vals)) for step, vals in sorted(values.items())
                            if len(vals) == len(curves)]
    return averaged


def smoothed(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """(step, mean of the :data:`SMOOTH` validations centred on it, fewer at the ends)."""
    half = SMOOTH // 2
    losses = [loss for _, loss in points]
    return [(step, fmean(losses[max(0, i - half):i + half + 1])) for i, (step, _) in enumerate(points)]


def reference_loss(points: list[tuple[int, float]], step: int | None = None) -> float:
    """Random init's loss after ``step`` steps (default: its whole run): the mean of its
    :data:`SMOOTH` validations ending there."""
    end = len(points) if step is None else next(
        (i + 1 for i, (s, _) in enumerate(points) if s == step), None)
    if end is None:
        raise ValueError(f"no validation at step {step} (validated at {[s for s, _ in points]})")
    return fmean(loss for _, loss in points[max(0, end - SMOOTH):end])


def steps_to_reach(points: list[tuple[int, float]], target: float) -> int | None:
    """The first step whose smoothed validation loss is at or below ``target``."""
    return next((step for step, loss in smoothed(points) if loss <= target), None)


def _shown(steps: int | None, run: int) -> int | str:
    """A step count as the tables print it: ``>N`` when not reached within the run's N steps."""
    return steps if steps is not None else f">{run}"


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
        run_ids, seed_curves = [], []
        # a learned init's step 0 does not depend on the seed: validated once
        learned_zero = step_zero(f"runs:/{run_id}", family, args, workdir) if run_id else None
        for seed in range(args.seed, args.seed + args.adapt_seeds):
            suffix = f"-s{seed}" if seed != args.seed else ""
            run = adapt(compose("adapt", [*common, f"task={family}", f"init={run_id or 'random'}",
                                          f"meta.genotype={args.genotype}",
                                          *_adapt_overrides(args, steps, val_every, seed),
                                          f"name=adapt-{family}-{label}{suffix}"]))
            points = curve(run)
            zero = learned_zero or step_zero(None, family, args, workdir, seed)
            for metric in VAL:
                points[metric] = [(0, zero[metric]), *points[metric]]
            run_ids.append(run["run_id"])
            seed_curves.append(points)
        result["inits"][label] = {"run_id": run_ids[0], "run_ids": run_ids, "steps": steps,
                                  "curve": mean_curve(seed_curves), "seed_curves": seed_curves}
    return result


def reach(result: dict[str, Any], reference_points: list[int]) -> None:
    """Add to ``result`` each init's steps to random init's final loss and to its loss after
    each of ``reference_points`` steps (``result["reach"]``, keyed by step)."""
    random_curve = result["inits"]["random"]["curve"]["loss"]
    target = reference_loss(random_curve)
    result["random_final_loss"] = target
    for entry in result["inits"].values():
        entry["steps_to_random_final"] = steps_to_reach(entry["curve"]["loss"], target)
        entry["steps_to_random_final_per_seed"] = [  # the spread the seeds' mean hides
            steps_to_reach(points["loss"], target) for points in entry.get("seed_curves", [entry["curve"]])]
    final = random_curve[-1][0]
    result["reach"] = {}
    for step in sorted({*(s for s in reference_points if s < final), final}):
        loss = reference_loss(random_curve, step)
        result["reach"][str(step)] = {"reference": loss, **{
            label: steps_to_reach(entry["curve"]["loss"], loss) for label, entry in result["inits"].items()}}


def meets_target(meta_steps: int | None, random_steps: int | None, multitask_steps: int | None,
                 random_run: int) -> dict[str, bool]:
    """The issue's target for one reference: meta-init reaches it in at most a tenth of random
    init's steps (its run's length when it never does) and in fewer than multitask init's."""
    random_steps = random_run if random_steps is None else random_steps
    return {"meta_10x_fewer_than_random": meta_steps is not None and meta_steps * 10 <= random_steps,
            "meta_fewer_than_multitask": (
                meta_steps is not None and (multitask_steps is None or meta_steps < multitask_steps))}


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
    parser.add_argument("--pretrain-steps", type=int, default=0,
                        help="meta.pretrain_steps: joint steps before the meta steps (multitask counts them)")
    parser.add_argument("--cross-losses", action="store_true",
                        help="meta.cross_losses: each meta-task's loss from a family drawn apart from its "
                             "patches' (the multitask baseline gets the same draws)")
    parser.add_argument("--loss-mixture", type=float, default=0.0,
                        help="meta.loss_mixture: each meta-task's loss a Dirichlet mixture of the included "
                             "families' (the multitask baseline gets the same draws); 0: off")
    parser.add_argument("--adapt-steps", type=int, default=200)
    parser.add_argument("--random-steps", type=int, default=1000)
    parser.add_argument("--adapt-seeds", type=int, default=1,
                        help="adapt every init with this many training seeds (from --seed); the curves "
                             "are their mean, random init's reference included")
    parser.add_argument("--val-every", type=int, default=10,
                        help="validation interval of meta/multitask adaptation")
    parser.add_argument("--random-val-every", type=int, default=10, help="validation interval of random init")
    parser.add_argument("--reference-points", type=int, nargs="*", default=[200, 300, 500],
                        help="also count the steps to random init's loss after these steps of its run")
    parser.add_argument("--crop", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--data", default="task", choices=["task", "synthetic"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of every run")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "meta.json"))
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--from-json", default=None,
                        help="reprint an earlier run's tables from its JSON and rewrite it; trains nothing")
    args = parser.parse_args(argv)
    if args.from_json:
        return rereport(Path(args.from_json).resolve(), args.reference_points)
    unvalidated = [step for step in args.reference_points
                   if step % args.random_val_every or not 0 < step <= args.random_steps]
    if args.adapt_seeds < 1:
        parser.error(f"--adapt-seeds {args.adapt_seeds}: expected at least 1")
    if unvalidated:
        parser.error(f"--reference-points {unvalidated}: expected steps random init validates at "
                     f"(multiples of --random-val-every {args.random_val_every} up to {args.random_steps})")
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


def rereport(path: Path, reference_points: list[int]) -> int:
    """``--from-json``: the tables of an earlier run, recomputed from its curves."""
    try:
        payload = json.loads(path.read_text())
        stored = argparse.Namespace(**payload["args"])
        results = payload["results"]
        random_curves = [result["inits"]["random"]["curve"]["loss"] for result in results]
        validated = set.intersection(*({step for step, _ in curve if step > 0} for curve in random_curves))
        if not validated:
            raise ValueError("random init's curves share no validated step")
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"{path}: expected a JSON written by benchmarks/meta.py ({error})", file=sys.stderr)
        return 2
    unvalidated = [step for step in reference_points if step not in validated]
    if unvalidated:
        print(f"{path}: --reference-points {unvalidated}: expected steps random init validated at "
              f"in every family of the run ({min(validated)}-{max(validated)})", file=sys.stderr)
        return 2
    stored.reference_points = reference_points
    report(results, stored, path, Path(payload.get("workdir", "")), payload.get("machine"))
    return 0


def report(results: list[dict[str, Any]], args: argparse.Namespace, out: Path, workdir: Path,
           machine: str | None = None) -> None:
    """Print the tables and (re)write the JSON and the PNG for the families done so far
    (``machine``: where the runs ran, when not here)."""
    rows, depth_rows = [], []
    for result in results:
        reach(result, args.reference_points)
        for label, entry in result["inits"].items():
            row: dict[str, Any] = {"held out": result["family"], "init": label}
            for step in CHECKPOINTS:
                for metric in VAL:
                    row[f"{metric}@{step}"] = at(entry["curve"][metric], step)
            row["steps to random's final, per seed"] = " ".join(
                str(_shown(n, entry["steps"])) for n in entry["steps_to_random_final_per_seed"])
            rows.append(row)
        for step, counts in result["reach"].items():
            inits = result["inits"]
            met = meets_target(counts["meta"], counts["random"], counts["multitask"], int(step))
            depth_rows.append({"held out": result["family"], "random's step": int(step),
                               "reference": counts["reference"],
                               **{label: _shown(counts[label], inits[label]["steps"]) for label in inits},
                               "meta 10x random": met["meta_10x_fewer_than_random"],
                               "meta < multitask": met["meta_fewer_than_multitask"]})
    targets = {result["family"]: meets_target(
        result["inits"]["meta"]["steps_to_random_final"], result["inits"]["random"]["steps_to_random_final"],
        result["inits"]["multitask"]["steps_to_random_final"], args.random_steps) for result in results}
    print(text_table(rows, list(rows[0])))
    print(text_table(depth_rows, list(depth_rows[0]), digits=3))
    print(json.dumps(targets, indent=1))
    plot(results, out.with_suffix(".png"))
    payload = {"machine": machine or f"{os.cpu_count()} CPUs, torch {torch.__version__}", "args": vars(args),
               "results": results, "targets": targets, "workdir": str(workdir)}
    write_json(out, payload)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    sys.exit(main())
