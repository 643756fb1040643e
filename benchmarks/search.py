"""Architecture search on IR/VIS: each hypergradient method and a black-box baseline, one wall budget.

Usage::

    python benchmarks/search.py [--budget 240] [--retrain 180] [--retrain-seeds 2] [--space compact]
                                [--methods first_order darts implicit tim darts@4]
                                [--seeds 0 1 2] [--threads N] [--out benchmarks/results/search.json]
    python benchmarks/search.py --step-cost [--space small] [--threads 1] [--rounds 3] [--steps 5]
                                [--out benchmarks/results/search_step_cost.json]

Data: the IR/VIS training data of ``timfusion train`` (../shared/data roadscene + msrs,
the same seeded validation split); objective: the ir_vis task with the loss of
:data:`TASK_OVERRIDES` (intensity towards the brighter source + 10 x gradient), on the
``compact`` space (regression head). Every search gets ``--budget`` seconds of wall time
on this machine (``--threads`` torch threads, default all, in this process; evaluation
pauses the clock):

* one bilevel search per hypergradient method on the ``--space`` supernet, with the
  settings of ``timfusion search`` (platform/conf/search.yaml ``search:``) and
  ``hypergrad=`` the method, with that method's ``search.hypergrad_options``; ``implicit``
  takes ``upper_every`` lower steps per hyperstep as its algorithm prescribes (Lorraine et
  al. 2020), the others alternate one and one as theirs do (:data:`METHOD_SETTINGS`, printed
  in the table); ``darts@4`` is DARTS on
  implicit's schedule, to tell the schedule's share from the hypergradient's. Every
  ``--eval-every`` seconds the supernet's fusion loss on fixed validation patches (4
  seeded crops of each validation pair) is recorded; "final" and "reached" use the mean
  of the last :data:`SMOOTH` evaluations;
* the black-box baseline: Optuna (TPE) samples a discrete genotype (one candidate per
  position) per trial, trains it from scratch for ``--budget / --bb-trials`` seconds and
  scores it as the upper level does (fixed-patch validation fusion loss + cost_weight x
  normalised MACs), until the same budget is spent; its genotype is the best trial's.

The black box runs first; each gradient search then derives its genotype within the
black box's MACs (``search.max_macs``, the budgeted derivation of
:func:`~timfusion.search_spaces.bilevel.derive_genotype`; ``--no-match-macs`` turns it
off), so the comparison is at equal or lower cost. Each derived genotype is retrained
with ``timfusion train`` ``--retrain-seeds`` times (in-process, ``--retrain`` seconds,
``train.seed`` 0, 1, ..., the training defaults but :data:`RETRAIN_OVERRIDES`) and fuses
the 21 VIFB pairs, scored with the tang metrics and averaged over its retrainings.
``--seeds`` repeats the whole comparison (black box included) per seed and counts the
seeds that meet each target and both. Targets: ``implicit`` reaches ``darts``'s final
validation loss in at most half ``darts``'s time, and the implicit genotype beats the
black-box one (higher on at least two of VIFB's MI, Qabf, VIF) at equal or fewer MACs.
They are decided pooled over the seeds (the mean time fraction; VIFB means over every
seed and retraining, no more MACs in any seed): one seed's verdict is within the noise.
Prints the table, writes the JSON and a PNG of the validation-loss curves beside it.

``--step-cost`` searches nothing: the seconds of one bilevel step (alpha every step) of
``implicit`` with ``search.yaml``'s options against the class's own defaults, on seeded
random patches of the search's crop and batch (the cost does not depend on the content),
``--rounds`` rounds of ``--steps`` steps interleaved, each the median of its rounds; :func:`step_cost`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from timfusion.platform.report import text_table, write_json

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TIMFUSION_SHARED", REPO.parent / "shared"))
METHODS = ["first_order", "darts", "implicit", "tim", "darts@4"]
# implicit: 8 weight steps per hyperstep (the IFT assumes weights near their optimum) and
# alpha's rate doubled: with an eighth as many alpha steps per weight step it would otherwise
# travel a third of darts' distance. Its hypergradient options (one damped CG term on
# finite-difference products) are search.yaml's. The schedule is the benchmark's, not the
# job's: within the same seconds implicit takes 3-4x darts' steps, while a job's trial
# counts steps (`steps`), in which alpha every 8 would leave it about 4 hypersteps by default.
METHOD_SETTINGS: dict[str, dict[str, Any]] = {"implicit": {"upper_every": 8, "alpha_lr": 0.006}}
# The search objective: the classic unsupervised IR/VIS loss (towards the brighter source's
# intensity and the stronger gradient) on a regression head. Under the default ir_vis loss
# the compact layout's activity head *is* that loss's target rule, so a supernet starts at
# the loss's optimum and the search has nothing to find (RESULTS.md, search section).
TASK_OVERRIDES = ["task.loss.activity=0", "task.loss.selection=0", "task.loss.intensity=1",
                  "task.loss.gradient=10"]
# Retraining: 150 pixel-only steps first, not the trainer's 50. Under TASK_OVERRIDES' loss
# (gradient x 10, which an inverted image satisfies as well) some genotypes retrained into
# the contrast-inverted minimum after 50 (SSIM 0.109 and 0.115 in runs A and B, -0.173 in
# run E's first try; the last one 0.450 with 150), which scored the retraining, not the search.
RETRAIN_OVERRIDES = ["train.fidelity_warmup_steps=150"]
# Evaluations averaged for "final" and "reached": with ``--eval-every 5`` a 40-s window. The
# curves jump by up to 0.6 between evaluations (the supernet's weights, not the fixed
# patches), and a 3-evaluation window decided run E's seed 0 by 0.0006 (RESULTS.md).
SMOOTH = 8
VIFB_METRICS = ["MI", "Qabf", "VIF", "SSIM"]
TARGET_METRICS = ["MI", "Qabf", "VIF"]
MACS_SIZE = (256, 256)


def fixed_patches(records, crop: int, epochs: int, seed: int) -> dict[str, torch.Tensor]:
    """The same validation patches for every method: ``epochs`` seeded crops of each pair."""
    from timfusion.tasks.datasets import PairedDataset

    dataset = PairedDataset(records, crop=crop, seed=seed, cache=True)
    items = []
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        items += [dataset[i] for i in range(len(dataset))]
    return {key: torch.stack([item[key] for item in items]) for key in ("a", "b")}


def validation_loss(network, loss_fn, patches: dict[str, torch.Tensor], chunk: int = 16) -> float:
    """Mean fusion loss of ``network.fuse`` (unclipped, as trained) over the fixed patches."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(patches["a"]), chunk):
            a, b = patches["a"][start:start + chunk], patches["b"][start:start + chunk]
            loss, _ = loss_fn(a, b, network.fuse(a, b))
            total, count = total + float(loss) * len(a), count + len(a)
    return total / count


def search_method(
    label: str, ctx: dict[str, Any], budget: float, eval_every: float, max_macs: float | None
) -> dict[str, Any]:
    """One bilevel search for ``budget`` seconds; its curve and genotype (within ``max_macs``
    at the search's cost size). ``label`` is a method name, or ``METHOD@K`` for that method
    with ``upper_every=K``."""
    from timfusion.platform.searching import patch_batches
    from timfusion.search_spaces.bilevel import BilevelSearch, SearchSettings, derive_genotype
    from timfusion.search_spaces.supernet import Supernet

    torch.manual_seed(ctx["seed"])
    method, _, every = label.partition("@")
    drawn = {"hypergrad": method, **METHOD_SETTINGS.get(method, {}), "max_macs": max_macs}
    if every:
        drawn["upper_every"] = int(every)
    settings = SearchSettings.for_run(ctx["search"], drawn)
    supernet = Supernet(ctx["space"], seed=ctx["seed"])
    search = BilevelSearch(supernet, ctx["task"].build_loss(), settings)
    train = patch_batches(ctx["train"], ctx["loader"], False, 2, ctx["seed"])
    val = patch_batches(ctx["val"], ctx["loader"], False, 2, ctx["seed"] + 1)
    clock, next_eval = 0.0, 0.0
    curve = [(0.0, 0, validation_loss(supernet, search.loss_fn, ctx["patches"]))]
    while clock < budget:
        started = time.perf_counter()
        search.step(next(train), next(val))
        clock += time.perf_counter() - started
        if clock >= next_eval + eval_every or clock >= budget:
            next_eval = clock
            curve.append((clock, search.step_count,
                          validation_loss(supernet, search.loss_fn, ctx["patches"])))
    unbounded = supernet.derive(max_skips=settings.max_skips)
    genotype = derive_genotype(supernet, settings, name=f"searched-{method}")
    return {"label": label, "settings": {"upper_every": settings.upper_every, "alpha_lr": settings.alpha_lr,
                                          "hypergrad_options": settings.hypergrad_options},
            "unbounded_ops": _ops(unbounded), "max_macs": max_macs,
            "seconds": clock, "steps": search.step_count, "curve": curve,
            "final_val_loss": smoothed(curve)[-1][1], "genotype": genotype.to_dict(), "ops": _ops(genotype)}


def black_box(ctx: dict[str, Any], budget: float, trials: int) -> dict[str, Any]:
    """Optuna TPE over discrete genotypes, each trained briefly from scratch, for ``budget`` seconds."""
    import optuna

    from timfusion.platform.searching import patch_batches
    from timfusion.search_spaces.network import FusionNetwork
    from timfusion.search_spaces.supernet import CostTable, Supernet

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space, search = ctx["space"], ctx["search"]
    table = CostTable(Supernet(space), str(search["cost"]), tuple(search["cost_size"]))
    cost_max = float(sum(c.max() for c in table.costs.values()))
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=ctx["seed"]))
    per_trial = budget / trials
    loss_fn = ctx["task"].build_loss()
    clock, best, curve, records = 0.0, None, [], []
    while clock < budget:
        trial = study.ask()
        choice = {(place, pos): trial.suggest_categorical(f"{place}:{pos}", list(space.candidates))
                  for place, pos in space.positions()}
        cost = table.cost_of(choice, space.candidates)
        genotype = space.genotype(choice, name="searched-black_box")
        torch.manual_seed(ctx["seed"] + trial.number)
        network = FusionNetwork(genotype)
        optimizer = torch.optim.Adam(network.parameters(), lr=float(search["weight_lr"]))
        batches = patch_batches(ctx["train"], ctx["loader"], False, 2, ctx["seed"] + trial.number)
        spent = 0.0
        while spent < per_trial and clock + spent < budget:
            started = time.perf_counter()
            batch = next(batches)
            loss, _ = loss_fn(batch["a"], batch["b"], network.fuse(batch["a"], batch["b"]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), float(search["grad_clip"]))
            optimizer.step()
            spent += time.perf_counter() - started
        clock += spent
        val = validation_loss(network, loss_fn, ctx["patches"])
        score = val + float(search["cost_weight"]) * cost / cost_max
        study.tell(trial, score)
        records.append({"trial": trial.number, "ops": _ops(genotype), "val_loss": val, "score": score})
        if best is None or score < best["score"]:
            best = {"score": score, "val_loss": val, "genotype": genotype}
        curve.append((clock, trial.number + 1, best["val_loss"]))
    return {"label": "black_box", "settings": {"trials": len(records), "seconds_per_trial": per_trial},
            "seconds": clock, "steps": len(records), "curve": curve, "final_val_loss": best["val_loss"],
            "genotype": best["genotype"].to_dict(), "ops": _ops(best["genotype"]), "trials": records}


def _ops(genotype) -> str:
    return " ".join(op for _, cell in genotype.cells() for op in cell.ops)


def smoothed(curve: list[tuple[float, int, float]]) -> list[tuple[float, float]]:
    """(time, mean of the last ``SMOOTH`` evaluations up to it), from the ``SMOOTH``-th on (a
    curve shorter than that: the mean of all of it, at its end)."""
    losses = [loss for _, _, loss in curve]
    window = min(SMOOTH, len(curve))
    return [(curve[i][0], float(np.mean(losses[i + 1 - window:i + 1])))
            for i in range(window - 1, len(curve))]


def time_to_reach(curve: list[tuple[float, int, float]], target: float) -> float | None:
    """The first time the smoothed validation loss is at or below ``target``."""
    return next((t for t, loss in smoothed(curve) if loss <= target), None)


def retrain_and_score(
    results: list[dict[str, Any]], ctx: dict[str, Any], seconds: float, retrain_seeds: int, workdir: Path
) -> None:
    """Retrain every distinct derived genotype ``retrain_seeds`` times (``train.seed`` 0, 1, ...),
    fuse VIFB, score; adds the figures, averaged over the retrainings, to ``results``."""
    from mlflow.tracking import MlflowClient

    from timfusion.platform.config import compose
    from timfusion.platform.jobs.evaluate import evaluate
    from timfusion.platform.jobs.fuse import fuse
    from timfusion.platform.jobs.train import train
    from timfusion.platform.models import load_fuser
    from timfusion.search_spaces.genotype import Genotype
    from timfusion.search_spaces.network import FusionNetwork, count_macs

    fused_root = workdir / "fused"
    trained: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        genotype = Genotype.from_dict(result["genotype"])
        result["macs"] = count_macs(FusionNetwork(genotype), *MACS_SIZE, full=False)
        if result["ops"] in trained:
            result["retrain"] = trained[result["ops"]]
            continue
        path = workdir / f"{result['label']}.json"
        path.write_text(genotype.to_json())
        retrainings = []
        for train_seed in range(retrain_seeds):
            folder_name = f"{result['label']}-r{train_seed}"
            run = train(compose("train", [
                *ctx["task_overrides"], *RETRAIN_OVERRIDES, f"genotype={path}", "cluster=none",
                f"cluster.cpus_per_worker={ctx['threads']}", f"train.seed={train_seed}",
                "train.steps=100000", f"train.time_budget_s={seconds}", "train.checkpoint_every=1000",
                "train.log_every=20", f"name=search-bench-{folder_name}-{int(time.time())}",
            ]))
            fuse(compose("fuse", [f"model=runs:/{run['run_id']}", "data.dataset=vifb",
                                  f"out={fused_root / folder_name}", "overwrite=true"]))
            network = load_fuser(f"runs:/{run['run_id']}", ctx["task"])
            final_step = MlflowClient(run["tracking_uri"]).get_run(run["run_id"]).data.tags["final_step"]
            retrainings.append({
                "run_id": run["run_id"], "train_seed": train_seed, "steps": int(final_step),
                "val_loss": validation_loss(network, ctx["task"].build_loss(), ctx["patches"]),
                "method_folder": folder_name,
            })
        trained[result["ops"]] = result["retrain"] = retrainings
    metrics_list = "[" + ",".join(VIFB_METRICS) + "]"
    scored = evaluate(compose("evaluate", ["data.dataset=vifb", f"fused={fused_root}",
                                           f"metrics={metrics_list}", f"out={workdir / 'evaluate'}"]))
    for result in results:
        for retraining in result["retrain"]:
            summary = scored["summaries"][retraining["method_folder"]]
            retraining["vifb"] = {metric: summary[metric]["mean"] for metric in VIFB_METRICS}
        result["vifb"] = {metric: float(np.mean([r["vifb"][metric] for r in result["retrain"]]))
                          for metric in VIFB_METRICS}
        result["retrained_val_loss"] = float(np.mean([r["val_loss"] for r in result["retrain"]]))


def plot_curves(runs: list[dict[str, Any]], path: Path) -> None:
    """The validation-loss curves of every method, one panel per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(6.5 * len(runs), 4.5), squeeze=False, sharey=True)
    for ax, run in zip(axes[0], runs, strict=True):
        for result in run["results"]:
            times, _, losses = zip(*result["curve"], strict=True)
            ax.plot(times, losses, label=result["label"],
                    drawstyle="steps-post" if result["label"] == "black_box" else None)
        ax.set_xlabel("search wall time (s)")
        ax.set_title(f"seed {run['seed']} (black_box: best trial so far)")
        ax.legend()
    axes[0][0].set_ylabel("validation fusion loss (fixed patches)")
    fig.suptitle("architecture search on IR/VIS")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_seed(ctx: dict[str, Any], args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The black box, every method's search, retraining and VIFB scores for ``ctx["seed"]``;
    the results, the targets' verdicts and the table rows of that seed."""
    from timfusion.search_spaces.genotype import Genotype
    from timfusion.search_spaces.network import FusionNetwork, count_macs

    workdir.mkdir(parents=True, exist_ok=True)
    print(f"seed {ctx['seed']}:", flush=True)
    baseline = black_box(ctx, args.budget, args.bb_trials)
    print(f"  black_box: {baseline['steps']} trials, best val loss {baseline['final_val_loss']:.5f}, "
          f"{baseline['ops']}", flush=True)
    # Equal-cost comparison: every gradient search derives within the black box's MACs.
    max_macs = float(count_macs(FusionNetwork(Genotype.from_dict(baseline["genotype"])),
                                *ctx["search"]["cost_size"], full=False)) if args.match_macs else None
    results = []
    for method in args.methods:
        results.append(search_method(method, ctx, args.budget, args.eval_every, max_macs))
        print(f"  {method}: {results[-1]['steps']} steps, val loss {results[-1]['final_val_loss']:.5f}, "
              f"{results[-1]['ops']} (unbounded {results[-1]['unbounded_ops']})", flush=True)
    results.append(baseline)
    retrain_and_score(results, ctx, args.retrain, args.retrain_seeds, workdir)

    by_label = {r["label"]: r for r in results}
    targets: dict[str, Any] = {}
    if "darts" in by_label:
        darts = by_label["darts"]
        for result in results:
            result["time_to_darts_final"] = time_to_reach(result["curve"], darts["final_val_loss"])
        if "implicit" in by_label:
            reached = by_label["implicit"]["time_to_darts_final"]
            targets["implicit_time_fraction_of_darts"] = (
                None if reached is None else reached / darts["seconds"]
            )
            targets["implicit_reaches_darts_final_in_half_time"] = (
                reached is not None and reached <= 0.5 * darts["seconds"]
            )
    if "implicit" in by_label:
        ours, theirs = by_label["implicit"], by_label["black_box"]
        wins, beats = beats_black_box(ours["vifb"], theirs["vifb"], ours["macs"] <= theirs["macs"])
        targets["implicit_beats_black_box_at_no_more_macs"] = beats
        targets["implicit_wins_on"] = wins
    rows = [{
        "method": r["label"],
        "schedule": (f"upper every {r['settings']['upper_every']}, alpha lr {r['settings']['alpha_lr']}, "
                     f"{r['settings']['hypergrad_options'] or 'defaults'}"
                     if "upper_every" in r["settings"] else f"{r['settings']['trials']} trials"),
        "steps": r["steps"], "search s": r["seconds"], "final val loss": r["final_val_loss"],
        "s to darts final": r.get("time_to_darts_final"), "genotype": r["ops"], "MMACs@256": r["macs"] / 1e6,
        "retrained val loss": r["retrained_val_loss"], **{f"VIFB {m}": r["vifb"][m] for m in VIFB_METRICS},
    } for r in results]
    print(f"  targets: {json.dumps(targets)}", flush=True)
    return {"seed": ctx["seed"], "results": results, "targets": targets, "rows": rows}


def beats_black_box(implicit: dict[str, float], black_box: dict[str, float],
                    cheaper: bool) -> tuple[list[str], bool]:
    """The VIFB target metrics where the implicit search's genotype scores higher, and the target's
    verdict: higher on at least two of them, at no more MACs (``cheaper``)."""
    wins = [m for m in TARGET_METRICS if implicit[m] > black_box[m]]
    return wins, len(wins) >= 2 and cheaper


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Over the seeds: how many meet each target, both in the same seed, and the pooled
    verdicts (the mean time fraction; VIFB means over every seed and retraining, at no more
    MACs in any seed), which decide the targets because single seeds are within the noise."""
    keys = ("implicit_reaches_darts_final_in_half_time", "implicit_beats_black_box_at_no_more_macs")
    verdicts = [run["targets"] for run in runs]
    summary: dict[str, Any] = {"seeds": [run["seed"] for run in runs]}
    for key in keys:
        summary[key] = sum(bool(v.get(key)) for v in verdicts)
    summary["both_in_the_same_seed"] = sum(all(v.get(key) for key in keys) for v in verdicts)
    fractions = [v.get("implicit_time_fraction_of_darts") for v in verdicts]
    summary["implicit_time_fraction_of_darts"] = fractions
    reached = [f for f in fractions if f is not None]
    complete = bool(fractions) and len(reached) == len(fractions)
    summary["median_time_fraction_of_darts"] = float(np.median(reached)) if complete else None
    summary["mean_time_fraction_of_darts"] = float(np.mean(reached)) if complete else None
    summary["pooled_reaches_darts_final_in_half_time"] = complete and float(np.mean(reached)) <= 0.5
    pairs = [{r["label"]: r for r in run["results"]} for run in runs]
    if pairs and all("implicit" in p and "black_box" in p for p in pairs):
        means = {label: {m: float(np.mean([p[label]["vifb"][m] for p in pairs])) for m in TARGET_METRICS}
                 for label in ("implicit", "black_box")}
        cheaper = all(p["implicit"]["macs"] <= p["black_box"]["macs"] for p in pairs)
        wins, beats = beats_black_box(means["implicit"], means["black_box"], cheaper)
        summary["pooled_vifb"] = means
        summary["pooled_implicit_wins_on"] = wins
        summary["pooled_beats_black_box_at_no_more_macs"] = beats
    return summary


def merge(paths: list[str], out: Path) -> int:
    """One result file of several runs' seeds (same settings), its summary pooled over them all."""
    payloads = [json.loads(Path(path).read_text()) for path in paths]
    runs = sorted((run for payload in payloads for run in payload["runs"]), key=lambda run: run["seed"])
    seeds = [run["seed"] for run in runs]
    if len(set(seeds)) != len(seeds):
        print(f"--merge: seed repeated across {paths}: {seeds}", file=sys.stderr)
        return 2
    settings = ("budget_s", "retrain_s", "retrain_seeds", "eval_every_s", "smooth", "space",
                "method_settings", "hypergrad_options")
    differing = [key for key in settings if any(p.get(key) != payloads[0].get(key) for p in payloads)]
    if differing:
        print(f"--merge: {paths} differ in {differing}", file=sys.stderr)
        return 2
    summary = summarise(runs)
    write_json(out, {**payloads[0], "summary": summary, "runs": runs, "merged_from": [str(p) for p in paths],
                     "load_average": [p["load_average"] for p in payloads]})
    plot_curves(runs, out.with_suffix(".png"))
    print(json.dumps(summary))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def step_cost(space_name: str, rounds: int = 3, steps: int = 5) -> list[dict[str, Any]]:
    """Seconds per bilevel step of ``implicit`` under search.yaml's options and the class defaults."""
    from timfusion.platform.config import compose, task_config, to_container
    from timfusion.search_spaces.bilevel import BilevelSearch, SearchSettings
    from timfusion.search_spaces.supernet import Supernet, load_search_space
    from timfusion.tasks import build_task

    search_cfg = compose("search", [])
    block = to_container(search_cfg)["search"]
    variants = {"search.yaml": block, "class defaults": {**block, "hypergrad_options": {}}}
    shape = (int(search_cfg.batch_size), 1, int(search_cfg.crop), int(search_cfg.crop))
    generator = torch.Generator().manual_seed(0)
    batches = [{"a": torch.rand(shape, generator=generator), "b": torch.rand(shape, generator=generator)}
               for _ in range(4)]
    loss_fn = build_task(task_config("ir_vis")).build_loss()
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    options: dict[str, dict[str, Any]] = {}
    for _ in range(rounds):
        for name, variant in variants.items():
            settings = SearchSettings.for_run(
                variant, {"hypergrad": "implicit", "warmup_steps": 0, "upper_every": 1, "cost_weight": 0.0})
            options[name] = settings.hypergrad_options
            search = BilevelSearch(Supernet(load_search_space(space_name), seed=0), loss_fn, settings)
            search.step(batches[0], batches[1])  # the first step allocates
            started = time.perf_counter()
            for step in range(steps):
                search.step(batches[step % 4], batches[(step + 1) % 4])
            seconds[name].append((time.perf_counter() - started) / steps)
    return [{"options": name, "hypergrad_options": options[name] or "Implicit's defaults",
             "s_per_step": sorted(times)[len(times) // 2], "rounds": times}
            for name, times in seconds.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=240.0, help="search wall seconds per method")
    parser.add_argument("--retrain", type=float, default=180.0, help="training seconds per derived genotype")
    parser.add_argument("--retrain-seeds", type=int, default=2,
                        help="retrainings (train.seed 0, 1, ...) per derived genotype; "
                             "VIFB scores are their mean")
    parser.add_argument("--methods", nargs="+", default=METHODS)
    parser.add_argument("--space", default="compact", help="search space name or YAML path")
    parser.add_argument("--bb-trials", type=int, default=10, help="black-box trials in the budget")
    parser.add_argument("--eval-every", type=float, default=5.0, help="seconds of search between evaluations")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one whole comparison (black box, searches, retraining) per seed")
    parser.add_argument("--no-match-macs", dest="match_macs", action="store_false",
                        help="derive the searched genotypes without the black box's MACs as their budget")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads for the searches and the retraining (these small networks run"
                             " about as fast on one: see RESULTS.md)")
    parser.add_argument("--out", default=None,
                        help="default benchmarks/results/search.json "
                             "(search_step_cost.json with --step-cost)")
    parser.add_argument("--step-cost", action="store_true",
                        help="no search: seconds per bilevel step of implicit's options (module docstring)")
    parser.add_argument("--rounds", type=int, default=3, help="--step-cost: rounds per option set")
    parser.add_argument("--steps", type=int, default=5, help="--step-cost: timed steps per round")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--task-overrides", nargs="*", default=TASK_OVERRIDES,
                        help="train-config overrides of the task (its loss) for the searches and retraining")
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="no search: the runs of these result files (seeds run as parallel processes)"
                             " with their pooled summary, written to --out")
    args = parser.parse_args(argv)
    results = REPO / "benchmarks" / "results"
    args.out = args.out or str(results / ("search_step_cost.json" if args.step_cost else "search.json"))
    if args.merge:
        return merge(args.merge, Path(args.out).resolve())
    if args.step_cost:
        torch.set_num_threads(args.threads)
        rows = step_cost(args.space, rounds=args.rounds, steps=args.steps)
        print(text_table(rows, ["options", "hypergrad_options", "s_per_step"]))
        write_json(Path(args.out), {"space": args.space, "threads": args.threads, "rounds": args.rounds,
                                    "steps": args.steps, "rows": rows,
                                    "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}",
                                    "load_average": os.getloadavg()})
        print(f"wrote {args.out}")
        return 0
    if not (SHARED / "data" / "vifb").exists():
        print(f"{SHARED / 'data' / 'vifb'} is absent: set TIMFUSION_SHARED", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    out = Path(args.out).resolve()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="timfusion-search-bench-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    torch.set_num_threads(args.threads)
    from timfusion.platform.config import compose, to_container
    from timfusion.platform.jobs.common import task_from
    from timfusion.platform.jobs.train import training_records
    from timfusion.search_spaces.supernet import load_search_space

    search_cfg = compose("search", [])
    train_cfg = compose("train", list(args.task_overrides))
    task = task_from(train_cfg)
    train_records, val_records = training_records(train_cfg, task, workdir)
    ctx = {
        "task": task, "space": load_search_space(args.space),
        "search": to_container(search_cfg)["search"], "train": train_records, "val": val_records,
        "loader": {"crop": int(search_cfg.crop), "batch_size": int(search_cfg.batch_size)},
        "patches": fixed_patches(val_records, crop=int(search_cfg.crop), epochs=4, seed=12345),
        "task_overrides": list(args.task_overrides), "threads": args.threads,
    }
    print(f"{len(train_records)} train / {len(val_records)} val pairs; space {ctx['space'].name}; "
          f"{args.budget:.0f} s per search, {args.retrain:.0f} s retraining; seeds {args.seeds}; "
          f"workdir {workdir}")
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        runs.append(run_seed({**ctx, "seed": seed}, args, workdir / f"seed{seed}"))
        summary = summarise(runs)
        write_json(out, {  # after every seed, so a long run keeps what it has measured
            "task_overrides": list(args.task_overrides), "retrain_overrides": RETRAIN_OVERRIDES,
            "threads": args.threads, "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}",
            "load_average": os.getloadavg(), "budget_s": args.budget, "retrain_s": args.retrain,
            "retrain_seeds": args.retrain_seeds, "eval_every_s": args.eval_every, "smooth": SMOOTH,
            "space": ctx["space"].name, "method_settings": METHOD_SETTINGS,
            "hypergrad_options": ctx["search"]["hypergrad_options"], "summary": summary,
            "runs": [{key: run[key] for key in ("seed", "results", "targets")} for run in runs],
            "workdir": str(workdir),
        })
        plot_curves(runs, out.with_suffix(".png"))
    rows = [{"seed": run["seed"], **row} for run in runs for row in run["rows"]]
    print(text_table(rows, list(rows[0])))
    print(json.dumps(summary))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
