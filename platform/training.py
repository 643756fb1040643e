"""Task-guided fusion training, distributed with Ray Train (or in-process for debugging).

Formulation (TIM's task guidance as an alternating scheme). With fusion network N_w,
fused image F = N_w(A, B), downstream segmentation head S_theta, labels Y, the task's
unsupervised fusion loss L_f and the segmentation loss L_s (cross-entropy):

    head step:    theta <- theta - eta_s * grad_theta L_s(S_theta(stopgrad(F)), Y)
    fusion step:  w     <- w     - eta   * grad_w [ L_f(A, B, F) + lambda * L_s(S_theta(F), Y) ]

so the head learns to read the current fused images, and the fusion network is pushed
towards fused images from which the head segments better, while staying a good fusion by
L_f. ``guidance.weight`` is lambda; lambda = 0 is pure unsupervised fusion (no head is
built). ``guidance.warmup_steps`` trains the head alone (lambda held at 0) first, so its
early, uninformed gradient does not distort the fusion network.

Each Ray Train worker runs :func:`train_worker` on its shard of the data (DDP through
``prepare_model`` and ``prepare_data_loader``); rank 0 writes checkpoints every
``train.checkpoint_every`` steps through ``ray.train.report``, validates, and logs to the
job's MLflow run. A restarted worker group (``FailureConfig``) or a rerun of the same
named run (``resume=true``) continues from the latest checkpoint: the step counter
continues, it does not restart at 0.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from timfusion.tasks import build_task
from timfusion.tasks.datasets import PairedDataset, PairRecord
from timfusion.tasks.heads import SegmentationHead, confusion_matrix, mean_iou, segmentation_loss
from timfusion.tasks.imageio import encode_image, to_uint8

STATE_FILE = "state.pt"
RUN_INFO = "timfusion_run.json"


# ----------------------------------------------------------------------------- worker contexts


class WorkerContext(Protocol):
    """What the training loop needs from where it runs (a Ray Train worker, or this process)."""

    rank: int
    world_size: int
    device: torch.device

    def latest_checkpoint(self) -> dict[str, Any] | None: ...

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None: ...

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def prepare_loader(self, loader: DataLoader) -> DataLoader: ...


def _load_state(folder: str | Path) -> dict[str, Any]:
    return torch.load(Path(folder) / STATE_FILE, map_location="cpu", weights_only=True)


def _save_state(folder: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    (folder / STATE_FILE).write_bytes(buffer.getvalue())


class RayWorker:
    """A Ray Train worker: checkpoints go through ``ray.train.report``."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()

    def latest_checkpoint(self) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as folder:
            return _load_state(folder)

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        import ray.train

        if state is None or self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            _save_state(Path(folder), state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        # Two-stage genotypes carry auxiliary heads that inference (and so training
        # through ``fuse``) leaves unused: DDP must not wait for their gradients.
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        import ray.train.torch

        return ray.train.torch.prepare_data_loader(loader)


class LocalWorker:
    """One process, no Ray (``cluster=none``): checkpoints are folders under the run's storage."""

    def __init__(self, run_dir: Path, keep: int = 2) -> None:
        self.rank, self.world_size = 0, 1
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.run_dir = run_dir
        self.keep = keep

    def _checkpoints(self) -> list[Path]:
        return sorted(self.run_dir.glob("checkpoint_*"))

    def latest_checkpoint(self) -> dict[str, Any] | None:
        found = self._checkpoints()
        return _load_state(found[-1]) if found else None

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        if state is None:
            return
        target = self.run_dir / f"checkpoint_{state['step']:09d}"
        partial = target.with_name(target.name + ".part")
        partial.mkdir(parents=True, exist_ok=True)
        _save_state(partial, state)
        os.replace(partial, target)
        for old in self._checkpoints()[: -self.keep]:
            for file in old.iterdir():
                file.unlink()
            old.rmdir()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        return loader


# ----------------------------------------------------------------------------- the loop


class _TrainingView(nn.Module):
    """The network's unclipped output, so saturated pixels still get gradients during training."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.network.fuse(a, b)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


@dataclass
class Schedule:
    steps: int
    warmup: int

    def factor(self, step: int) -> float:
        """Linear warm-up then cosine decay to 5% of the base learning rate."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _batches(loader: DataLoader, epoch: int):
    """Batches forever, advancing the epoch (and the sampler's and dataset's seeds) each pass."""
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        loader.dataset.set_epoch(epoch)
        for batch in loader:
            yield epoch, batch
        epoch += 1


def _out_of_time(started: float, budget_s: float | None, world_size: int) -> bool:
    """Whether the wall-clock budget is spent, agreed by every worker (the slowest decides)."""
    if not budget_s:
        return False
    elapsed = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
    return float(elapsed) >= float(budget_s)


def train_worker(config: dict[str, Any]) -> None:
    """The per-worker training loop (see the module docstring); ``config`` is plain data."""
    import warnings

    from timfusion.platform.tracking import Tracker
    from timfusion.search_spaces.genotype import Genotype
    from timfusion.search_spaces.network import FusionNetwork, save_model

    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    train_cfg, guidance = config["train"], config["guidance"]
    ctx: WorkerContext = LocalWorker(Path(config["run_dir"])) if config["backend"] == "local" else RayWorker()
    torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    torch.manual_seed(int(train_cfg["seed"]) + ctx.rank)
    task = build_task(config["task"])
    genotype = Genotype.from_dict(config["genotype"])
    network = FusionNetwork(genotype)
    guided = float(guidance["weight"]) > 0
    head = SegmentationHead(len(task.classes), width=int(guidance["head_width"])) if guided else None

    state = ctx.latest_checkpoint()
    step, epoch = 0, 0
    if state is not None:
        network.load_state_dict(state["network"], strict=True)
        if head is not None and state.get("head") is not None:
            head.load_state_dict(state["head"], strict=True)
        step, epoch = int(state["step"]), int(state["epoch"])
    elif config.get("init_state"):  # init_weights=: a meta-initialization or another run's weights
        network.load_state_dict(torch.load(io.BytesIO(config["init_state"]), weights_only=True), strict=True)

    view = ctx.prepare_model(_TrainingView(network))
    head_ddp = ctx.prepare_model(head) if head is not None else None
    optimizer = torch.optim.AdamW(network.parameters(), lr=float(train_cfg["lr"]),
                                  weight_decay=float(train_cfg["weight_decay"]))
    head_optimizer = torch.optim.AdamW(head.parameters(), lr=float(guidance["head_lr"])) if head else None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if head_optimizer is not None and state.get("head_optimizer") is not None:
            head_optimizer.load_state_dict(state["head_optimizer"])
    schedule = Schedule(int(train_cfg["steps"]), int(train_cfg["warmup_steps"]))
    base_lr = float(train_cfg["lr"])

    records = [PairRecord(**r) for r in config["train_records"]]
    dataset = PairedDataset(records, crop=int(train_cfg["crop"]), seed=int(train_cfg["seed"]), labels=guided,
                            num_classes=len(task.classes), cache=bool(train_cfg["cache_images"]))
    loader = ctx.prepare_loader(DataLoader(
        dataset, batch_size=int(train_cfg["batch_size"]), shuffle=True,
        drop_last=len(dataset) >= int(train_cfg["batch_size"]) * ctx.world_size,
        num_workers=int(train_cfg["loader_workers"]),
        generator=torch.Generator().manual_seed(int(train_cfg["seed"])),
    ))
    loss_fn = task.build_loss().to(ctx.device)
    amp = ctx.device.type == "cuda" and bool(train_cfg["amp"])
    tracker = Tracker(config["tracking_uri"], config["mlflow_run_id"]) if ctx.rank == 0 else None
    logged_until = -1
    if tracker is not None and state is not None:  # a restarted worker group or resume=true
        logged_until = tracker.restored(step, "loss/total")
    val_records = [PairRecord(**r) for r in config["val_records"]]
    fault_step = (config.get("faults") or {}).get("kill_worker_at_step")
    fault_marker = Path(config["run_dir"]) / ".fault_injected"

    total_steps = int(train_cfg["steps"])
    log_every, ckpt_every = int(train_cfg["log_every"]), int(train_cfg["checkpoint_every"])
    val_every = int(train_cfg["val_every"]) or total_steps
    budget_s = train_cfg.get("time_budget_s")
    fidelity_warmup = int(train_cfg["fidelity_warmup_steps"])
    batches = _batches(loader, epoch)
    window: dict[str, list[float]] = {}
    started, seen = time.perf_counter(), 0
    view.train()
    while step < total_steps:
        epoch, batch = next(batches)
        if fault_step is not None and step == int(fault_step) and ctx.rank == ctx.world_size - 1 \
                and not fault_marker.exists():
            fault_marker.write_text(f"worker {ctx.rank} killed at step {step}\n")
            os._exit(1)  # fault drill: the worker dies; Ray Train restarts the group from the last checkpoint
        a, b = batch["a"].to(ctx.device), batch["b"].to(ctx.device)
        factor = schedule.factor(step)
        for group in optimizer.param_groups:
            group["lr"] = base_lr * factor
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
            fused = view(a, b)
            total, parts = loss_fn(a, b, fused.float(), pixel_only=step < fidelity_warmup)
        logged = {"loss/fusion": float(total.detach()),
                  **{f"loss/{k}": float(v.detach()) for k, v in parts.items()}}
        if head_ddp is not None:
            labels = batch["label"].to(ctx.device)
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
                head_loss = segmentation_loss(head_ddp(fused.detach().clamp(0, 1)), labels)
            head_optimizer.zero_grad(set_to_none=True)
            head_loss.backward()
            head_optimizer.step()
            weight = float(guidance["weight"]) if step >= int(guidance["warmup_steps"]) else 0.0
            if weight > 0:
                with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
                    task_loss = segmentation_loss(head_ddp(fused.clamp(0, 1)), labels)
                total = total + weight * task_loss
                logged["loss/task"] = float(task_loss.detach())
            logged["loss/head"] = float(head_loss.detach())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), float(train_cfg["grad_clip"]))
        optimizer.step()
        if head_optimizer is not None:
            head_optimizer.zero_grad(set_to_none=True)
        logged["loss/total"] = float(total.detach())
        step += 1
        seen += a.shape[0] * ctx.world_size
        for key, value in logged.items():
            window.setdefault(key, []).append(value)

        if step % log_every == 0 and _out_of_time(started, budget_s, ctx.world_size):
            total_steps = step  # the budget is spent: finish here (checkpoint, validate, save)
        checkpoint_now = step % ckpt_every == 0 or step == total_steps
        validate_now = step % val_every == 0 or step == total_steps
        if step % log_every == 0 or checkpoint_now or validate_now:
            metrics = {k: float(np.mean(v)) for k, v in window.items()}
            metrics.update(step=step, epoch=epoch, lr=base_lr * factor,
                           patches_per_s=seen / max(1e-9, time.perf_counter() - started))
            window.clear()
            if validate_now and ctx.rank == 0:
                val_metrics, grid = validate(network, head, val_records, task, ctx.device, config)
                metrics.update({f"val/{k}": v for k, v in val_metrics.items()})
                tracker.log_bytes(grid, f"validation/step_{step:07d}.png")
            if tracker is not None and step > logged_until:  # logged before the restart: first values stay
                tracker.log_metrics({k: v for k, v in metrics.items() if k != "step"}, step=step)
            payload = None
            if checkpoint_now and ctx.rank == 0:
                payload = {
                    "network": network.state_dict(), "head": head.state_dict() if head else None,
                    "optimizer": optimizer.state_dict(),
                    "head_optimizer": head_optimizer.state_dict() if head_optimizer else None,
                    "step": step, "epoch": epoch,
                }
            ctx.report(metrics, payload if checkpoint_now else None)
            view.train()

    if ctx.rank == 0:
        with tempfile.TemporaryDirectory() as folder:
            model_path = Path(folder) / "model.pt"
            save_model(model_path, network.eval(), genotype, config["task"])
            tracker.log_artifact(model_path, "model")
            if head is not None:
                head_path = Path(folder) / "head.pt"
                buffer = io.BytesIO()
                torch.save({"num_classes": head.num_classes, "state_dict": head.state_dict()}, buffer)
                head_path.write_bytes(buffer.getvalue())
                tracker.log_artifact(head_path, "model")
        tracker.set_tags({"final_step": step, "stopped_by_budget": step < int(train_cfg["steps"])})


# ----------------------------------------------------------------------------- validation


def scored_pairs(records: list[PairRecord], limit: int | None) -> list[PairRecord]:
    """The validation pairs a run scores: the first ``train.val_max_pairs`` (null: every one)."""
    return records[: None if limit is None else int(limit)]


def validate(
    network: nn.Module,
    head: nn.Module | None,
    records: list[PairRecord],
    task: Any,
    device: torch.device,
    config: dict[str, Any],
) -> tuple[dict[str, float], bytes]:
    """The task's fusion loss (``loss``), fusion metrics (and mIoU with a head) on full-size
    validation pairs, plus a PNG grid."""
    from timfusion.tasks.metrics import resolve_metrics, score_batch

    specs = resolve_metrics("tang", list(config["val_metrics"]))
    network.eval()
    if head is not None:
        head.eval()
    dataset = PairedDataset(scored_pairs(records, config["train"]["val_max_pairs"]), labels=head is not None,
                            num_classes=len(task.classes))
    loss_fn = task.build_loss().to(device)
    sums: dict[str, list[float]] = {spec.name: [] for spec in specs}
    sums["loss"] = []
    confusion = None
    tiles = []
    with torch.no_grad():
        for index in range(len(dataset)):
            item = dataset[index]
            a, b = item["a"][None].to(device), item["b"][None].to(device)
            fused = network(a, b)
            sums["loss"].append(float(loss_fn(a, b, fused)[0]))
            planes = [to_uint8(t[0, 0].float().cpu().numpy() * 255.0).astype(np.float64)
                      for t in (a, b, fused)]
            values = score_batch([planes[0]], [planes[1]], [planes[2]], specs)
            for name, value in values.items():
                sums[name].append(float(value[0]))
            row = list(planes)
            if head is not None:
                logits = head(fused)
                counts = confusion_matrix(logits, item["label"][None].to(device), head.num_classes).cpu()
                confusion = counts if confusion is None else confusion + counts
                predicted = logits.argmax(1)[0].cpu().numpy()
                row.append(predicted * (255.0 / max(1, head.num_classes - 1)))
            if len(tiles) < 4:
                tiles.append(row)
    network.train()
    if head is not None:
        head.train()
    metrics = {name: float(np.mean(values)) for name, values in sums.items() if values}
    if confusion is not None and int(confusion.sum()) > 0:  # some validation pair has labels
        metrics["mIoU"] = mean_iou(confusion)
    return metrics, encode_image(_grid(tiles), ".png")


def _grid(rows: list[list[np.ndarray]], height: int = 128) -> np.ndarray:
    """Rows of (a, b, fused[, segmentation]) tiles resized to one height, as one image."""
    from PIL import Image

    lines = []
    for row in rows:
        tiles = []
        for tile in row:
            width = max(1, round(tile.shape[1] * height / tile.shape[0]))
            resized = Image.fromarray(to_uint8(tile)).resize((width, height), Image.BILINEAR)
            tiles.append(np.asarray(resized, dtype=np.float64))
            tiles.append(np.full((height, 4), 255.0))
        lines.append(np.concatenate(tiles, axis=1))
    width = max(line.shape[1] for line in lines)
    lines = [np.pad(line, ((0, 4), (0, width - line.shape[1])), constant_values=255) for line in lines]
    return np.concatenate(lines, axis=0)


def record_run(run_dir: Path, tracker: Any, name: str, identity: dict[str, Any]) -> None:
    """The run info a resume finds: the MLflow run and store, the run's name, and what its
    checkpoints' shapes depend on (``identity``: see ``jobs.train.check_resumed``)."""
    from timfusion.tasks.imageio import atomic_write_text

    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"mlflow_run_id": tracker.run_id, "tracking_uri": tracker.uri, "name": name, "identity": identity}
    atomic_write_text(run_dir / RUN_INFO, json.dumps(info, indent=2) + "\n")


def read_run_info(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RUN_INFO
    return json.loads(path.read_text()) if path.exists() else None
