"""``timfusion fuse``: fuse a pair, or every pair of a dataset, with a baseline or a trained model."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from tqdm import tqdm

from timfusion.platform.errors import UserError
from timfusion.platform.jobs import command
from timfusion.platform.jobs.common import check_places, device_from, records_from, task_from
from timfusion.platform.models import load_fuser
from timfusion.tasks.base import fuse_pair
from timfusion.tasks.datasets import PairRecord, load_pair
from timfusion.tasks.imageio import image_format, path_exists, write_image


@command("fuse", config="fuse", summary="fuse a pair or a dataset with a baseline or trained model")
def fuse(cfg: DictConfig) -> list[str]:
    task = task_from(cfg)
    device = device_from(cfg)
    if cfg.out is None:
        raise UserError("out: required (an output file for a=/b=, a folder for data.root=/data.dataset=)")
    check_places(cfg, "a", "b", "data.root", "out")
    pair_mode = cfg.a is not None or cfg.b is not None
    if pair_mode:
        if cfg.a is None or cfg.b is None:
            raise UserError("a and b: give both sources (or data.root= for a dataset)")
        if cfg.data.root or cfg.data.dataset:
            raise UserError("a=/b= and data.root=/data.dataset=: give a pair or a dataset, not both")
        image_format(str(cfg.out))  # an unwritable format fails before any work
        jobs = [(PairRecord(name=Path(str(cfg.a)).stem, a=str(cfg.a), b=str(cfg.b)), str(cfg.out))]
    else:
        records = records_from(cfg, task)
        image_format(cfg.suffix)
        out_dir = str(cfg.out).rstrip("/")
        jobs = [(record, f"{out_dir}/{record.name}{cfg.suffix}") for record in records]
    if not cfg.overwrite:
        existing = [target for _, target in jobs if path_exists(target)]
        if existing:
            raise UserError(f"{existing[0]}: exists ({len(existing)} output(s) in all); "
                            "pass overwrite=true to replace")
    fuser = load_fuser(str(cfg.model), task, device, cfg.tracking.uri)
    written = []
    for record, target in tqdm(jobs, desc=f"fuse {cfg.model}", unit="pair", disable=len(jobs) == 1):
        a, b = load_pair(record, resize=bool(cfg.resize))
        write_image(target, fuse_pair(fuser, a, b, device))
        written.append(target)
    print(f"fused {len(written)} pair(s) with {cfg.model} -> {cfg.out}")
    return written
