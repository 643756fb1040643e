"""Training throughput with 1 and 2 Ray Train workers; inference time, parameters and MACs.

Usage::

    python benchmarks/train.py [--out benchmarks/results/train.json] [--steps 40] [--threads 2]

* Ray Train throughput (patches/s, crop 96, batch 8 per worker, synthetic IR/VIS, no
  guidance) of the compact default with 1 and 2 workers on a local Ray cluster; the
  figure is the last logged ``patches_per_s`` (steady state, after start-up).
* Inference time of a 640x480 pair (eval, no_grad, float32, ``--threads`` CPU threads;
  median of 7 after 2 warm-ups) for ``compact`` and ``tim_ivif``.
* Parameters and MACs at 256x256. Target: compact <= 0.2 s and <= 150 K parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from timfusion.platform.report import text_table, write_json

REPO = Path(__file__).resolve().parents[1]
GENOTYPES = ["compact", "tim_light", "tim_ivif"]


def inference_seconds(name: str, threads: int, height: int = 480, width: int = 640) -> float:
    from timfusion.search_spaces.network import FusionNetwork

    torch.set_num_threads(threads)
    model = FusionNetwork(name).eval()
    a, b = torch.rand(1, 1, height, width), torch.rand(1, 1, height, width)
    times = []
    with torch.no_grad():
        for i in range(9):
            started = time.perf_counter()
            model(a, b)
            if i >= 2:
                times.append(time.perf_counter() - started)
    return statistics.median(times)


def throughput(workers: int, steps: int, overrides: tuple[str, ...] = ()) -> float:
    """Steady-state patches/s of a short compact training with ``workers`` Ray Train workers
    (``overrides``: e.g. the cluster to run on)."""
    from timfusion.platform.config import compose
    from timfusion.platform.jobs.train import train

    result = train(compose("train", [
        *overrides, "data=synthetic", "data.synthetic.n=32", "data.synthetic.size=[128,128]",
        "genotype=compact", f"cluster.num_workers={workers}", f"train.steps={steps}",
        f"train.checkpoint_every={steps}", "train.log_every=5", "train.crop=96", "train.batch_size=8",
        "guidance.weight=0", "train.val_max_pairs=1",
        f"name=bench-{workers}w-{int(time.time())}",
    ]))
    from mlflow.tracking import MlflowClient

    history = MlflowClient(result["tracking_uri"]).get_metric_history(result["run_id"], "patches_per_s")
    return max(history, key=lambda m: m.step).value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train.json"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    from timfusion.search_spaces.network import FusionNetwork, count_macs, count_parameters

    rows = []
    for name in GENOTYPES:
        model = FusionNetwork(name).eval()
        rows.append({
            "genotype": name, "params": count_parameters(model),
            "GMACs@256": count_macs(model, 256, 256) / 1e9,
            "s/640x480": inference_seconds(name, args.threads),
        })
    workdir = Path(tempfile.mkdtemp(prefix="timfusion-bench-"))
    os.chdir(workdir)
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    rates = {w: throughput(w, args.steps) for w in (1, 2)}
    ray.shutdown()
    compact = next(r for r in rows if r["genotype"] == "compact")
    result = {
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}, threads {args.threads}",
        "load_average": os.getloadavg(),
        "models": rows,
        "ray_train_patches_per_s": {f"{w} worker(s)": v for w, v in rates.items()},
        "targets": {"compact_params<=150K": compact["params"] <= 150_000,
                    "compact_640x480<=0.2s": compact["s/640x480"] <= 0.2},
    }
    print(text_table(rows, ["genotype", "params", "GMACs@256", "s/640x480"]))
    print(text_table([{"workers": w, "patches/s": v} for w, v in rates.items()], ["workers", "patches/s"]))
    print(json.dumps(result["targets"]))
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
