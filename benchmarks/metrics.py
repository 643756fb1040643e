"""Throughput of the ``tang`` metrics on 640x480 pairs (float64, CPU by default).

Usage::

    python benchmarks/metrics.py [--out benchmarks/results/metrics.json] [--repeats 10]
                                 [--batch 8] [--device cpu] [--all]

Loads a real 640x480 pair from ``$TIMFUSION_SHARED/data/msrs`` (ir/*.png, vi/*.png with the
visible image converted by MATLAB ``rgb2gray`` and rounded; fused = the mean of the two),
or synthetic random images when the shared data is absent. Times the core set
(EN SD SF AG MI SCD VIF Qabf SSIM) after a warm-up, for single pairs and for batches,
then every metric separately; prints a table and writes JSON.

The intra-op thread count is left at torch's default unless ``--threads`` is given. On a
shared machine the wall-clock figures depend on the load: torch's parallel regions stall
whenever another process holds one of the cores, by up to a scheduler time slice per
operation. As ``timeit`` recommends, the headline figure is therefore the best of the
repeated runs (the least disturbed one); medians, process CPU time and the load average
are recorded alongside. Single-pair and batched runs are interleaved so that they see
the same load.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from timfusion.platform.report import write_json
from timfusion.tasks.colour import rgb_to_gray
from timfusion.tasks.imageio import read_image
from timfusion.tasks.metrics import METRICS
from timfusion.tasks.metrics import tang as _tang  # noqa: F401  (registers the metrics)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TIMFUSION_SHARED", REPO.parent / "shared"))
CORE = ["EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM"]
TARGET_PAIRS_PER_S = 8.0
SIZE = (480, 640)


def load_pairs(count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """``count`` real 640x480 MSRS pairs (N, 1, H, W) float64, or synthetic ones."""
    msrs = SHARED / "data" / "msrs"
    names = sorted(p.name for p in (msrs / "ir").glob("*.png")) if (msrs / "ir").is_dir() else []
    irs, vis = [], []
    for name in names:
        if not (msrs / "vi" / name).is_file():
            continue
        ir = rgb_to_gray(read_image(msrs / "ir" / name), round_uint8=True)
        vi = rgb_to_gray(read_image(msrs / "vi" / name), round_uint8=True)
        if ir.shape != SIZE or vi.shape != SIZE:
            continue
        irs.append(torch.from_numpy(ir))
        vis.append(torch.from_numpy(vi))
        if len(irs) == count:
            break
    if irs:
        loaded = len(irs)
        while len(irs) < count:  # fewer real pairs than asked: cycle through them
            irs.append(irs[len(irs) % loaded])
            vis.append(vis[len(vis) % loaded])
        a = torch.stack(irs)[:, None]
        b = torch.stack(vis)[:, None]
        source = f"{msrs} ({loaded} pairs, first {names[0]})"
    else:
        gen = torch.Generator().manual_seed(0)
        a = torch.randint(0, 256, (count, 1, *SIZE), generator=gen).to(torch.float64)
        b = torch.randint(0, 256, (count, 1, *SIZE), generator=gen).to(torch.float64)
        source = f"synthetic uniform random images ({msrs} absent)"
    return a, b, (a + b) / 2, source


def summarise(runs: list[tuple[float, float]]) -> dict[str, float]:
    """Best and median of (wall, process CPU) seconds per call."""
    wall = [w for w, _ in runs]
    cpu = [c for _, c in runs]
    return {
        "wall_best_s": min(wall),
        "wall_median_s": statistics.median(wall),
        "cpu_best_s": min(cpu),
        "cpu_median_s": statistics.median(cpu),
        "runs": len(runs),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "metrics.json"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave)")
    parser.add_argument("--all", action="store_true", help="also time every other tang metric (slow: FMI)")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a_all, b_all, f_all, source = load_pairs(args.batch)
    a_all, b_all, f_all = (x.to(device) for x in (a_all, b_all, f_all))
    a1, b1, f1 = a_all[:1], b_all[:1], f_all[:1]
    fns = {name: METRICS.get(f"tang.{name}").fn for name in CORE}

    def run_core(a, b, f):
        def call():
            for fn in fns.values():
                fn(a, b, f)
            sync()

        return call

    load_before = os.getloadavg()
    single_call, batched_call = run_core(a1, b1, f1), run_core(a_all, b_all, f_all)
    for _ in range(2):  # warm-up
        single_call()
        batched_call()
    single_runs: list[tuple[float, float]] = []
    batched_runs: list[tuple[float, float]] = []
    for _ in range(args.repeats):
        for call, runs in ((single_call, single_runs), (batched_call, batched_runs)):
            t0, c0 = time.perf_counter(), time.process_time()
            call()
            runs.append((time.perf_counter() - t0, time.process_time() - c0))
    single, batched = summarise(single_runs), summarise(batched_runs)

    names = CORE + (
        [n.split(".", 1)[1] for n in METRICS.names() if n.startswith("tang.")] if args.all else []
    )
    names = list(dict.fromkeys(names))
    # Each metric separately on one pair, in interleaved rounds (every round times every
    # metric once) so that a burst of load does not fall on a single metric.
    calls = {}
    for name in names:
        fn = METRICS.get(f"tang.{name}").fn

        def call(fn=fn):
            fn(a1, b1, f1)
            sync()

        call()  # warm-up
        calls[name] = call
    metric_runs: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for round_index in range(args.repeats):
        for name, call in calls.items():
            if round_index >= 2 and (name.startswith("FMI") or name == "MS_SSIM"):
                continue  # seconds per call at 640x480: two runs are enough
            t0, c0 = time.perf_counter(), time.process_time()
            call()
            metric_runs[name].append((time.perf_counter() - t0, time.process_time() - c0))
    per_metric = {name: summarise(runs) for name, runs in metric_runs.items()}
    load_after = os.getloadavg()

    def rate(stats: dict[str, float], n: int, key: str) -> float:
        return n / stats[key]

    def per_pair_ms(stats: dict[str, float], n: int) -> dict[str, float]:
        return {k.replace("_s", "_ms_per_pair"): v * 1e3 / n for k, v in stats.items() if k.endswith("_s")}

    result = {
        "benchmark": "tang metrics, core set " + " ".join(CORE),
        "image_size": list(SIZE),
        "source": source,
        "device": str(device),
        "dtype": "float64",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "target_pairs_per_s": TARGET_PAIRS_PER_S,
        "single": {
            "batch": 1,
            "pairs_per_s": rate(single, 1, "wall_best_s"),
            "pairs_per_s_median": rate(single, 1, "wall_median_s"),
            "pairs_per_cpu_s": rate(single, 1, "cpu_best_s"),
            **per_pair_ms(single, 1),
            "runs": single["runs"],
        },
        "batched": {
            "batch": args.batch,
            "pairs_per_s": rate(batched, args.batch, "wall_best_s"),
            "pairs_per_s_median": rate(batched, args.batch, "wall_median_s"),
            "pairs_per_cpu_s": rate(batched, args.batch, "cpu_best_s"),
            **per_pair_ms(batched, args.batch),
            "runs": batched["runs"],
        },
        "per_metric_ms": {
            name: {k.replace("_s", "_ms"): v * 1e3 for k, v in stats.items() if k.endswith("_s")}
            for name, stats in per_metric.items()
        },
    }
    result["meets_target"] = min(result["single"]["pairs_per_s"], result["batched"]["pairs_per_s"]) >= (
        TARGET_PAIRS_PER_S
    )

    print(f"tang metrics on {SIZE[1]}x{SIZE[0]} float64, {device}, {torch.get_num_threads()} threads")
    print(f"source: {source}")
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} ({os.cpu_count()} CPUs)")
    print(f"{'metric (1 pair)':<18}{'best ms':>10}{'median ms':>11}{'cpu ms':>10}")
    for name, stats in per_metric.items():
        print(
            f"{name:<18}{stats['wall_best_s'] * 1e3:>10.2f}{stats['wall_median_s'] * 1e3:>11.2f}"
            f"{stats['cpu_best_s'] * 1e3:>10.2f}"
        )
    for label, key in (("single", "single"), (f"batch {args.batch}", "batched")):
        r = result[key]
        print(
            f"core set, {label:<8}: {r['pairs_per_s']:6.2f} pairs/s (best run, "
            f"{r['wall_best_ms_per_pair']:.1f} ms/pair), {r['pairs_per_s_median']:6.2f} median, "
            f"{r['pairs_per_cpu_s']:6.2f} per CPU-second"
        )
    print(f"target {TARGET_PAIRS_PER_S:g} pairs/s: {'met' if result['meets_target'] else 'NOT met'}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
