"""``timfusion evaluate``: score fused images (one folder, or many methods) with a metric definition."""

from __future__ import annotations

import math
import posixpath
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from timfusion.platform.errors import UserError, check_bounds
from timfusion.platform.jobs import command
from timfusion.platform.jobs.common import check_places, device_from, records_from, task_from
from timfusion.platform.report import bar_chart_grid, markdown_table, text_table, write_csv, write_json
from timfusion.tasks.datasets import PairRecord
from timfusion.tasks.imageio import IMAGE_SUFFIXES, atomic_write_text, read_image
from timfusion.tasks.metrics import MetricSpec, resolve_metrics, score_batch


def _image_files(fs: Any, folder: str) -> dict[str, str]:
    found = {}
    for entry in sorted(fs.ls(folder, detail=False)):
        stem, suffix = posixpath.splitext(posixpath.basename(entry))
        if suffix.lower() in IMAGE_SUFFIXES and not fs.isdir(entry):
            found[stem] = entry
    return found


def discover_methods(fused: str) -> dict[str, dict[str, str]]:
    """``{method: {pair name: fused path}}``; a folder of images is the single method ''."""
    fs, base = fsspec.core.url_to_fs(str(fused))
    if not fs.isdir(base):
        raise UserError(f"fused={fused}: no such folder")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    unstrip = (lambda p: p) if protocol in ("file", "local") else (lambda p: f"{protocol}://{p}")
    direct = _image_files(fs, base)
    if direct:
        return {"": {k: unstrip(v) for k, v in direct.items()}}
    methods = {}
    for entry in sorted(fs.ls(base, detail=False)):
        if fs.isdir(entry):
            images = _image_files(fs, entry)
            if images:
                methods[posixpath.basename(entry.rstrip("/"))] = {k: unstrip(v) for k, v in images.items()}
    if not methods:
        raise UserError(f"fused={fused}: no images, and no method folders holding images")
    return methods


def score_method(
    records: list[PairRecord],
    fused: dict[str, str],
    specs: list[MetricSpec],
    batch: int,
    device: str,
    label: str = "",
) -> list[dict[str, Any]]:
    """One row per pair: ``name`` then one value per metric."""
    keep_colour = any(spec.colour for spec in specs)
    rows: list[dict[str, Any]] = []
    pending: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []

    def flush() -> None:
        if not pending:
            return
        names, a, b, f = zip(*pending, strict=True)
        values = score_batch(list(a), list(b), list(f), specs, device)
        for i, name in enumerate(names):
            rows.append({"name": name, **{s.name: float(values[s.name][i]) for s in specs}})
        pending.clear()

    for record in tqdm(records, desc=f"evaluate {label}".strip(), unit="pair", leave=False):
        a = read_image(record.a, keep_rgb_gray=keep_colour)
        b = read_image(record.b, keep_rgb_gray=keep_colour)
        f = read_image(fused[record.name], keep_rgb_gray=keep_colour)
        if not (a.shape[:2] == b.shape[:2] == f.shape[:2]):
            raise UserError(
                f"{fused[record.name]}: size {f.shape[1]}x{f.shape[0]} does not match its sources "
                f"({a.shape[1]}x{a.shape[0]}, {b.shape[1]}x{b.shape[0]})"
            )
        if pending and (pending[0][1].shape[:2] != a.shape[:2] or len(pending) >= batch):
            flush()
        pending.append((record.name, a, b, f))
    flush()
    return rows


def summarize(rows: list[dict[str, Any]], specs: list[MetricSpec]) -> dict[str, dict[str, float]]:
    summary = {}
    for spec in specs:
        values = np.array([row[spec.name] for row in rows], dtype=np.float64)
        summary[spec.name] = {"mean": float(values.mean()), "std": float(values.std(ddof=0))}
    return summary


def rank_tables(summaries: dict[str, dict[str, dict[str, float]]],
                specs: list[MetricSpec]) -> tuple[str, list[dict]]:
    """Markdown: an overall table (mean per metric with its rank) and one rank table per metric."""
    ranks: dict[str, dict[str, int]] = {}
    for spec in specs:
        ordered = sorted(summaries, key=lambda m: summaries[m][spec.name]["mean"],
                         reverse=spec.higher_is_better)
        ranks[spec.name] = {m: i + 1 for i, m in enumerate(ordered)}
    overall = []
    for method in summaries:
        row: dict[str, Any] = {"method": method}
        for spec in specs:
            row[spec.name] = f"{summaries[method][spec.name]['mean']:.4f} ({ranks[spec.name][method]})"
        row["mean rank"] = float(np.mean([ranks[s.name][method] for s in specs]))
        overall.append(row)
    overall.sort(key=lambda r: r["mean rank"])
    columns = ["method", *[s.name for s in specs], "mean rank"]
    parts = ["## All metrics (mean over pairs, rank in parentheses)", "",
             markdown_table(overall, columns, 2), ""]
    for spec in specs:
        arrow = "higher is better" if spec.higher_is_better else "lower is better"
        per = sorted(summaries, key=lambda m: ranks[spec.name][m])
        table = [
            {"rank": ranks[spec.name][m], "method": m, "mean": summaries[m][spec.name]["mean"],
             "std": summaries[m][spec.name]["std"]}
            for m in per
        ]
        parts += [f"## {spec.name} ({arrow})", "",
                  markdown_table(table, ["rank", "method", "mean", "std"]), ""]
    return "\n".join(parts), overall


@command("evaluate", config="evaluate", summary="score fused images with the tang or vifb metric definition")
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    task = task_from(cfg)
    device = device_from(cfg)
    check_bounds("", cfg, at_least_one=("batch",))
    check_places(cfg, "data.root", "fused")
    specs = resolve_metrics(cfg.definition, list(cfg.metrics) if cfg.metrics else None)
    records = records_from(cfg, task)
    methods = discover_methods(str(cfg.fused))
    if cfg.methods:
        unknown = sorted(set(cfg.methods) - set(methods))
        if unknown:
            raise UserError(f"methods: no folder for {', '.join(unknown)}; "
                            f"found {', '.join(sorted(methods))}")
        methods = {m: methods[m] for m in cfg.methods}
    plans = {}
    for method, fused in methods.items():
        missing = [r.name for r in records if r.name not in fused]
        if missing and not cfg.skip_missing:
            where = posixpath.join(str(cfg.fused), method) if method else str(cfg.fused)
            raise UserError(
                f"{where}: no fused image for {len(missing)} of {len(records)} pair(s), e.g. {missing[0]}; "
                "pass skip_missing=true to score the others"
            )
        present = [r for r in records if r.name in fused]
        if not present:
            raise UserError(f"fused={cfg.fused}: no fused image matches any pair name")
        plans[method] = present
    out = Path(str(cfg.out))
    columns = ["name", *[s.name for s in specs]]
    summaries: dict[str, dict[str, dict[str, float]]] = {}
    for method, present in plans.items():
        rows = score_method(present, methods[method], specs, int(cfg.batch), device, method)
        summary = summarize(rows, specs)
        summaries[method or "fused"] = summary
        target = out / method if method else out
        write_csv(target / "metrics.csv", rows, columns)
        write_json(target / "metrics.json", {
            "definition": cfg.definition, "task": task.name, "method": method or None,
            "pairs": len(rows), "summary": summary, "images": rows,
        })
        if not method:
            stats = [{"name": "mean", **{k: v["mean"] for k, v in summary.items()}},
                     {"name": "std", **{k: v["std"] for k, v in summary.items()}}]
            print(text_table(rows + stats, columns))
    result: dict[str, Any] = {"out": str(out), "summaries": summaries}
    if len(plans) > 1 or next(iter(plans)):
        markdown, overall = rank_tables(summaries, specs)
        atomic_write_text(out / "ranks.md",
                          f"# Rank table ({cfg.definition} metrics, {len(records)} pairs)\n\n{markdown}")
        write_csv(out / "summary.csv", [
            {"method": m, **{s.name: summaries[m][s.name]["mean"] for s in specs}} for m in summaries
        ], ["method", *[s.name for s in specs]])
        chart_values = {s.name: {m: summaries[m][s.name]["mean"] for m in summaries} for s in specs}
        chart_values = {k: v for k, v in chart_values.items() if all(math.isfinite(x) for x in v.values())}
        bar_chart_grid(out / "ranks.png", chart_values, {s.name: s.higher_is_better for s in specs},
                       f"{cfg.definition} metrics over {len(records)} pairs")
        print(text_table(overall, ["method", *[s.name for s in specs], "mean rank"], 2))
        print(f"rank table: {out / 'ranks.md'}\nrank chart: {out / 'ranks.png'}")
        result["overall"] = overall
    print(f"metrics: {out}")
    return result
