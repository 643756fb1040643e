"""Pieces every job needs: building the task, finding the data a config points at."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from timfusion.platform.config import shared_root, to_container
from timfusion.platform.errors import UserError
from timfusion.platform.storage import check_reachable
from timfusion.tasks import FusionTask, build_task
from timfusion.tasks.datasets import PairRecord, load_records


def check_places(cfg: DictConfig, *keys: str) -> None:
    """Each of ``keys`` that holds an S3 URL answers (endpoint, bucket, credentials), before any
    work: a read or write there would otherwise end in botocore's traceback."""
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if value:
            check_reachable(str(value), key)


def task_from(cfg: DictConfig) -> FusionTask:
    return build_task(to_container(cfg.task))


def data_root(cfg: DictConfig, task: FusionTask) -> tuple[str, dict[str, str]]:
    """The root (and manifest filters) that ``data.root`` or ``data.dataset`` points at."""
    data = cfg.data
    filters = dict(data.get("filter") or {})
    if data.root and data.dataset:
        raise UserError("data.root and data.dataset: give one, not both")
    if data.root:
        return str(data.root), filters
    if data.dataset:
        if data.dataset not in task.datasets:
            raise UserError(
                f"data.dataset={data.dataset}: not a dataset of task {task.name}; "
                f"valid choices: {', '.join(sorted(task.datasets))}"
            )
        spec = task.datasets[data.dataset]
        root = shared_root(cfg.paths.shared) / "data" / spec.path
        if not root.exists():
            raise UserError(f"data.dataset={data.dataset}: {root} does not exist "
                            "(set paths.shared or $TIMFUSION_SHARED)")
        return str(root), {**spec.filter, **filters}
    raise UserError("data.root or data.dataset: one is required")


def records_from(cfg: DictConfig, task: FusionTask) -> list[PairRecord]:
    root, filters = data_root(cfg, task)
    return load_records(root, task, split=cfg.data.get("split"), filters=filters)


def device_from(cfg: DictConfig) -> str:
    """``cfg.device``, checked before any work: a device torch knows, present on this machine."""
    import torch

    text = str(cfg.device)
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UserError(f"device={text}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"device={text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text
