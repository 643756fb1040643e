"""The meta-training loop, per worker: sample meta-tasks, adapt, average meta-gradients, step.

Each Ray Train worker (or this process, ``cluster=none``) takes its share of every
meta-batch's tasks, adapts on them with the configured :class:`~.algorithms.MetaAlgorithm`
and accumulates the meta-gradients; the workers then sum them with an all-reduce over
the process group Ray Train set up (what DDP's reducer does, done by hand because the
inner loop runs on learn2learn clones, not through a DDP forward), so every worker takes
the same outer step. The first ``pretrain_steps`` outer steps are joint (multitask) training
of the same network on the same meta-batches, the meta algorithm's ``steps`` follow (a
Meta-Baseline-style schedule: joint pre-training, then meta-learning from there). The first
``fidelity_warmup_steps`` outer steps use the losses' pixel-fidelity terms only (training's
warm-up; multitask gets the same share). Rank 0 logs the query losses before and after
adaptation, writes checkpoints through the worker context (a restarted or resumed run
continues from the last one) and, at the end, the meta-initialized model
(``model/model.pt``, the same file format as training's, with its genotype) and any extra
meta-parameters.
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from timfusion.meta.algorithms import build_algorithm, fusion_loss
from timfusion.meta.sampler import TaskSampler
from timfusion.tasks import build_task
from timfusion.tasks.datasets import PairRecord


def _share(meta_batch: int, rank: int, world_size: int) -> int:
    """How many of a meta-batch's tasks worker ``rank`` adapts on."""
    return meta_batch // world_size + (1 if rank < meta_batch % world_size else 0)


def _all_reduce(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def meta_worker(config: dict[str, Any]) -> None:
    """The per-worker meta-training loop; ``config`` is plain data (see ``timfusion meta``)."""
    from timfusion.platform.tracking import Tracker
    from timfusion.platform.training import LocalWorker, RayWorker
    from timfusion.search_spaces.genotype import Genotype
    from timfusion.search_spaces.network import FusionNetwork, save_model

    settings = config["meta"]
    ctx = LocalWorker(Path(config["run_dir"])) if config["backend"] == "local" else RayWorker()
    torch.set_num_threads(max(1, int(config.get("threads_per_worker", 1))))
    seed = int(settings["seed"])
    torch.manual_seed(seed)  # the same initial weights on every worker
    genotype = Genotype.from_dict(config["genotype"])
    network = FusionNetwork(genotype)
    algorithm = build_algorithm(settings["algorithm"], network, float(settings["inner_lr"]),
                                int(settings["inner_steps"]))
    pretrain = int(settings["pretrain_steps"])
    joint = build_algorithm("multitask", network, float(settings["inner_lr"]), int(settings["inner_steps"]))
    params = algorithm.parameters()
    optimizer = torch.optim.Adam(params, lr=float(settings["outer_lr"]))
    step = 0
    state = ctx.latest_checkpoint()
    if state is not None:
        network.load_state_dict(state["network"], strict=True)
        algorithm.load_state_dict(state["algorithm"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
    pools = {
        name: (build_task(entry["task"]), [PairRecord(**r) for r in entry["records"]])
        for name, entry in config["tasks"].items()
    }
    loss_for = fusion_loss({name: task.build_loss() for name, (task, _) in pools.items()})
    # A resumed run draws new tasks rather than replaying the first ones.
    sampler = TaskSampler(pools, int(settings["support"]), int(settings["query"]), int(settings["crop"]),
                          seed=seed + 7919 * ctx.rank + 104729 * step,
                          cross_losses=bool(settings["cross_losses"]),
                          loss_mixture=float(settings["loss_mixture"]))
    tracker = Tracker(config["tracking_uri"], config["mlflow_run_id"]) if ctx.rank == 0 else None
    steps, meta_batch = pretrain + int(settings["steps"]), int(settings["meta_batch"])
    share = _share(meta_batch, ctx.rank, ctx.world_size)
    log_every, ckpt_every = int(settings["log_every"]), int(settings["checkpoint_every"])
    fidelity_warmup = int(settings["fidelity_warmup_steps"])
    names = sorted(pools)
    window = torch.zeros(2 + 2 * len(names), dtype=torch.float64)  # before, after sums; per-task sums, counts
    started = time.perf_counter()
    while step < steps:
        for p in params:
            p.grad = None
        current = joint if step < pretrain else algorithm
        for _ in range(share):
            task = sampler.sample()
            loss = loss_for(task.loss, pixel_only=step < fidelity_warmup)
            before, after = current.accumulate(task, loss, 1.0 / meta_batch)
            index = names.index(task.task)
            window[0] += before
            window[1] += after
            window[2 + 2 * index] += after
            window[3 + 2 * index] += 1
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            _all_reduce(p.grad, ctx.world_size)
        torch.nn.utils.clip_grad_norm_(params, float(settings["grad_clip"]))
        optimizer.step()
        step += 1
        checkpoint_now = step % ckpt_every == 0 or step == steps
        if step % log_every == 0 or checkpoint_now:
            totals = _all_reduce(window.clone(), ctx.world_size)
            count = float(totals[3::2].sum())
            metrics = {"query_loss/before": float(totals[0]) / count,
                       "query_loss/after": float(totals[1]) / count,
                       "seconds": time.perf_counter() - started}
            metrics.update({f"query_loss/{name}": float(totals[2 + 2 * i] / totals[3 + 2 * i])
                            for i, name in enumerate(names) if totals[3 + 2 * i] > 0})
            window.zero_()
            if tracker is not None:
                tracker.log_metrics(metrics, step=step)
            payload = None
            if checkpoint_now and ctx.rank == 0:
                payload = {"network": network.state_dict(), "algorithm": algorithm.state_dict(),
                           "optimizer": optimizer.state_dict(), "step": step}
            ctx.report({**metrics, "step": step}, payload)
    if ctx.rank == 0:
        with tempfile.TemporaryDirectory() as folder:
            model_path = Path(folder) / "model.pt"
            save_model(model_path, network.eval(), genotype,
                       {"name": "meta-init", "algorithm": settings["algorithm"], "tasks": names})
            tracker.log_artifact(model_path, "model")
            extra = algorithm.state_dict()
            if extra:
                buffer = io.BytesIO()
                torch.save(extra, buffer)
                (Path(folder) / "algorithm_state.pt").write_bytes(buffer.getvalue())
                tracker.log_artifact(Path(folder) / "algorithm_state.pt", "meta")
        tracker.set_tags({"final_step": step})
