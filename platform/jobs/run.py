"""``timfusion run``: the main job on embedded defaults, chaining the other commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from timfusion.platform.config import compose
from timfusion.platform.jobs import command
from timfusion.platform.jobs.data import synth
from timfusion.platform.jobs.evaluate import evaluate
from timfusion.platform.jobs.fuse import fuse


def _list(values: Any) -> str:
    return "[" + ",".join(str(v) for v in values) + "]"


@command("run", config="run", summary="the main job: synthetic data -> baselines -> evaluation and ranking")
def run(cfg: DictConfig) -> dict[str, Any]:
    workdir = Path(str(cfg.workdir)).resolve()
    data_dir, fused_dir, eval_dir = workdir / "data", workdir / "fused", workdir / "evaluate"
    task = f"task={OmegaConf.select(cfg, 'task.name')}"
    print(f"[1/3] synthetic {cfg.task.name} data -> {data_dir}")
    height, width = cfg.size
    synth(compose("data_synth", [task, f"out={data_dir}", f"n={cfg.n}", f"size=[{height},{width}]",
                                 f"seed={cfg.seed}", "overwrite=true"]))
    print(f"[2/3] fusing with baselines {', '.join(cfg.baselines)}")
    for name in cfg.baselines:
        fuse(compose("fuse", [task, f"model=baseline:{name}", f"data.root={data_dir}",
                              f"out={fused_dir / name}", "overwrite=true"]))
    print(f"[3/3] scoring with the {cfg.definition} metrics")
    result = evaluate(compose("evaluate", [task, f"data.root={data_dir}", f"fused={fused_dir}",
                                           f"definition={cfg.definition}", f"metrics={_list(cfg.metrics)}",
                                           f"out={eval_dir}", f"methods={_list(cfg.baselines)}"]))
    print(f"\ndone. results under {workdir}:\n  rank table  {eval_dir / 'ranks.md'}\n"
          f"  rank chart  {eval_dir / 'ranks.png'}\n  fused images {fused_dir}/<baseline>/")
    return result
