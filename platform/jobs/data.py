"""``timfusion data synth`` and ``timfusion data inspect``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from tqdm import tqdm

from timfusion.platform.jobs import command
from timfusion.platform.jobs.common import check_places, data_root, records_from, task_from
from timfusion.platform.report import text_table
from timfusion.tasks.datasets import fingerprint, load_pair
from timfusion.tasks.synthetic import synthesize


@command("data synth", config="data_synth", summary="write synthetic paired data of a task family")
def synth(cfg: DictConfig) -> Path:
    task = task_from(cfg)
    manifest = synthesize(task.synthetic, cfg.out, n=int(cfg.n), seed=int(cfg.seed), size=tuple(cfg.size),
                          overwrite=bool(cfg.overwrite))  # synthesize checks the size's form and bounds
    print(f"wrote {cfg.n} synthetic {task.synthetic} pair(s): {manifest}")
    return manifest


@command("data inspect", config="data_inspect", summary="list and check a dataset's pairs")
def inspect(cfg: DictConfig) -> dict[str, Any]:
    task = task_from(cfg)
    check_places(cfg, "data.root")
    root, _ = data_root(cfg, task)
    records = records_from(cfg, task)
    sizes: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    if cfg.check:
        for record in tqdm(records, desc="inspect", unit="pair", leave=False):
            a, b = load_pair(record)
            sizes[f"{a.shape[1]}x{a.shape[0]}"] += 1
            modes[f"{'colour' if a.ndim == 3 else 'gray'}/{'colour' if b.ndim == 3 else 'gray'}"] += 1
    labelled = sum(r.label is not None for r in records)
    splits = Counter(r.fields.get("split", "-") for r in records)
    summary = {
        "root": root, "pairs": len(records), "labelled": labelled, "fingerprint": fingerprint(records),
        "splits": dict(splits), "sizes": dict(sizes.most_common(5)), "colour (a/b)": dict(modes),
    }
    print(text_table([{"key": k, "value": v} for k, v in summary.items()], ["key", "value"]))
    return summary
