"""Fusion quality on VIFB: trained genotypes vs the 25 published methods and the 4 baselines.

Usage::

    python benchmarks/quality.py [--budget 1800] [--genotypes compact tim_ivif]
                                 [--out benchmarks/results/quality.json]

Each genotype is trained with ``timfusion train`` on the IR/VIS training data
(../shared/data roadscene + msrs, seeded validation split) for at most ``--budget``
seconds of wall time on this machine (local Ray, one worker with all CPU threads), then
fuses the 21 VIFB pairs. Those outputs, the baselines' and the 25 published methods' in
../shared/data/vifb/fused are scored with the tang metrics and ranked. Target: the
trained compact default beats all four baselines on MI, Qabf and VIF.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TIMFUSION_SHARED", REPO.parent / "shared"))
METRICS = ["MI", "Qabf", "VIF", "SSIM", "SF", "EN", "SD", "AG"]
BASELINES = ["average", "maximum", "lp", "gff"]
TARGET = ["MI", "Qabf", "VIF"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=1800.0, help="training seconds per genotype")
    parser.add_argument("--genotypes", nargs="+", default=["compact", "tim_ivif"])
    parser.add_argument("--steps", type=int, default=100000, help="step cap (the budget usually stops first)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality.json"))
    parser.add_argument("--workdir", default=None)
    parser.add_argument("overrides", nargs="*", help="extra train overrides, e.g. train.lr=0.001")
    args = parser.parse_args(argv)
    if not (SHARED / "data" / "vifb").exists():
        print(f"{SHARED / 'data' / 'vifb'} is absent: set TIMFUSION_SHARED", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    out = Path(args.out).resolve()  # before the chdir: a relative --out is the caller's
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="timfusion-quality-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    from timfusion.platform.config import compose
    from timfusion.platform.jobs.evaluate import evaluate
    from timfusion.platform.jobs.fuse import fuse
    from timfusion.platform.jobs.train import train
    from timfusion.platform.report import write_json
    from timfusion.tasks.imageio import atomic_write_text

    fused_root = workdir / "fused"
    fused_root.mkdir(exist_ok=True)
    for method in sorted(p.name for p in (SHARED / "data" / "vifb" / "fused").iterdir() if p.is_dir()):
        link = fused_root / method
        if not link.exists():
            link.symlink_to(SHARED / "data" / "vifb" / "fused" / method)
    for name in BASELINES:
        fuse(compose("fuse", [f"model=baseline:{name}", "data.dataset=vifb",
                              f"out={fused_root / ('baseline_' + name)}", "overwrite=true"]))
    trained = {}
    for genotype in args.genotypes:
        started = time.perf_counter()
        result = train(compose("train", [
            f"genotype={genotype}", "cluster.num_workers=1", f"cluster.cpus_per_worker={os.cpu_count()}",
            f"train.steps={args.steps}", f"train.time_budget_s={args.budget}", "train.checkpoint_every=500",
            "train.log_every=20", f"name=quality-{genotype}-{int(time.time())}", *args.overrides,
        ]))
        trained[genotype] = {"run_id": result["run_id"], "train_seconds": time.perf_counter() - started}
        fuse(compose("fuse", [f"model=runs:/{result['run_id']}", "data.dataset=vifb",
                              f"out={fused_root / ('timfusion_' + genotype)}", "overwrite=true"]))
    metrics_list = "[" + ",".join(METRICS) + "]"
    scored = evaluate(compose("evaluate", ["data.dataset=vifb", f"fused={fused_root}",
                                           f"metrics={metrics_list}", f"out={workdir / 'evaluate'}"]))
    summaries = scored["summaries"]
    targets = {}
    for genotype in args.genotypes:
        ours = summaries[f"timfusion_{genotype}"]
        targets[genotype] = {
            metric: all(ours[metric]["mean"] > summaries[f"baseline_{b}"][metric]["mean"] for b in BASELINES)
            for metric in TARGET
        }
    ranks = (workdir / "evaluate" / "ranks.md").read_text()
    result = {"budget_s": args.budget, "trained": trained, "beats_all_baselines": targets,
              "means": {m: {k: v["mean"] for k, v in s.items()} for m, s in summaries.items()},
              "overall": scored["overall"], "workdir": str(workdir)}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    atomic_write_text(out.with_suffix(".md"), ranks)
    print(json.dumps(targets, indent=1))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
