"""Scale-out on a real local multi-node Ray cluster: search trials per hour on 1 and 2 worker
nodes, the per-trial scheduling overhead, and Ray Train throughput with 1 and 2 workers.

Usage::

    python benchmarks/scale.py [--out benchmarks/results/scale.json] [--trials 6] [--steps 20]

* Each configuration gets its own cluster (``timfusion.platform.local_cluster``: a head with
  no CPUs and N worker nodes of ``--node-cpus`` CPUs, each its own ``ray start``).
* The search is fixed: the ``small`` space, ``--trials`` trials of ``--steps`` steps (crop 32,
  batch 2, synthetic IR/VIS 48x48), no ASHA, no retraining, one CPU per trial, as many trials at
  once as the cluster has CPUs. Trials per hour = trials / wall time of ``timfusion search``.
* Per-trial overhead = (wall time x trial slots - the trials' own compute seconds) / trials:
  the slot time a trial costs beyond its steps (actor start, checkpoints, MLflow, Tune).
* Ray Train throughput: the last logged ``patches_per_s`` of benchmarks/train.py's compact
  training, 1 worker on the 1-node cluster and 2 workers (one per node) on the 2-node one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import throughput  # noqa: E402  (benchmarks/train.py)

from timfusion.platform.report import text_table, write_json  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SEARCH = [
    "search_space=small", "data=synthetic", "data.synthetic.n=8", "data.synthetic.size=[48,48]", "crop=32",
    "batch_size=2", "search.cost_size=[32,32]", "search.warmup_steps=1", "tune.asha.enabled=false",
    "retrain.enabled=false", "report_every=5", "cluster.trial_cpus=1",
]


def measure(nodes: int, node_cpus: int, trials: int, steps: int, train_steps: int, workdir: Path) -> dict:
    import ray
    from mlflow.tracking import MlflowClient

    from timfusion.platform import local_cluster
    from timfusion.platform.config import compose
    from timfusion.platform.jobs.search import search

    state = workdir / f"cluster-{nodes}"
    started = time.perf_counter()
    local_cluster.up(state, workers=nodes, cpus_per_worker=node_cpus)
    up_s = time.perf_counter() - started
    cluster = ["cluster=local_multinode", f"cluster.state_dir={state}"]
    slots = nodes * node_cpus
    try:
        started = time.perf_counter()
        result = search(compose("search", [*cluster, *SEARCH, f"trials={trials}", f"steps={steps}",
                                           f"cluster.max_concurrent_trials={slots}", f"name=scale-{nodes}n"]))
        wall = time.perf_counter() - started
        client = MlflowClient(result["tracking_uri"])
        compute = sum(max(client.get_metric_history(r["mlflow_run_id"], "seconds"),
                          key=lambda m: m.step).value
                      for r in result["rows"])
        rate = throughput(nodes, train_steps, (*cluster, "cluster.cpus_per_worker=1"))
    finally:
        ray.shutdown()
        local_cluster.down(state)
    return {"nodes": nodes, "cpus/node": node_cpus, "trial slots": slots, "cluster up s": up_s,
            "search wall s": wall, "trials/hour": trials / wall * 3600,
            "trial compute s": compute / trials, "overhead s/trial": (wall * slots - compute) / trials,
            "train workers": nodes, "train patches/s": rate}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scale.json"))
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--node-cpus", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=30)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    workdir = Path(tempfile.mkdtemp(prefix="timfusion-scale-"))
    os.chdir(workdir)
    rows = [measure(nodes, args.node_cpus, args.trials, args.steps, args.train_steps, workdir)
            for nodes in (1, 2)]
    import torch

    result = {
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, "
                   "Ray local multi-node (ray start per node)",
        "load_average": os.getloadavg(),
        "search": {"trials": args.trials, "steps": args.steps, "space": "small"},
        "rows": rows,
        "speedup_trials_per_hour": rows[1]["trials/hour"] / rows[0]["trials/hour"],
        "speedup_train": rows[1]["train patches/s"] / rows[0]["train patches/s"],
    }
    print(text_table(rows, list(rows[0])))
    print(f"2 nodes / 1 node: trials/hour x{result['speedup_trials_per_hour']:.2f}, "
          f"train patches/s x{result['speedup_train']:.2f}")
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
