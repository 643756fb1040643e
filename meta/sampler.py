"""Meta-tasks: a batch of patches from one fusion task family (or variant), split into support and query.

The task distribution is uniform over the *families* left after ``exclude`` (``ir_vis``,
``medical``, ``multi_exposure``, ``multi_focus``), then uniform over the family's
configured variants (``mri_ct``, ``mri_pet``, ``mri_spect``), so the three medical
variants do not outweigh the other families. ``exclude`` takes task or family names.

``cross_losses`` (task augmentation) draws the loss's family independently of the data's,
from the same included families: the same patches then meet conflicting fusion rules, the
setting in which an initialization that adapts fast differs from one that fits the average
rule (joint training on the same draws). ``loss_mixture`` (> 0) goes further: each meta-task's
loss is a mixture of one variant's loss from every included family, the weights drawn from a
symmetric Dirichlet of that concentration (small: near one family's rule; large: near the
average), so the fusion rules form a continuum rather than a handful of points.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from timfusion.platform.errors import UserError
from timfusion.tasks import FusionTask
from timfusion.tasks.datasets import PairedDataset, PairRecord


@dataclass
class MetaTask:
    """One meta-task: the task its patches come from, the loss that applies (a task's, or a
    weighted mixture of tasks'), the patches."""

    task: str
    support: dict[str, Tensor]
    query: dict[str, Tensor]
    loss: str | dict[str, float]  # a task's name, or task names weighted (``loss_mixture``)


def included_tasks(tasks: Sequence[FusionTask], exclude: Sequence[str]) -> list[FusionTask]:
    """``tasks`` without those whose name or family is in ``exclude``; unknown names are an error."""
    known = {t.name for t in tasks} | {t.family for t in tasks}
    unknown = sorted(set(exclude) - known)
    if unknown:
        raise UserError(f"meta.exclude: {', '.join(unknown)} not among the meta tasks or their families "
                        f"({', '.join(sorted(known))})")
    kept = [t for t in tasks if t.name not in exclude and t.family not in exclude]
    if not kept:
        raise UserError(f"meta.exclude={list(exclude)} leaves no task to meta-train on")
    return kept


class TaskSampler:
    """Draws :class:`MetaTask` s from per-task pools of training pairs, seeded per worker."""

    def __init__(
        self,
        pools: Mapping[str, tuple[FusionTask, list[PairRecord]]],
        support: int,
        query: int,
        crop: int,
        seed: int,
        cross_losses: bool = False,
        loss_mixture: float = 0.0,
    ) -> None:
        if support < 1 or query < 1:
            raise UserError(f"meta.support and meta.query must be >= 1, got {support} and {query}")
        check_loss_draw(cross_losses, loss_mixture)
        self.tasks = {name: task for name, (task, _) in pools.items()}
        self.datasets = {
            name: PairedDataset(records, crop=crop, seed=seed, cache=True)
            for name, (_, records) in pools.items()
        }
        families: dict[str, list[str]] = {}
        for name, task in self.tasks.items():
            families.setdefault(task.family, []).append(name)
        self.families = {family: sorted(names) for family, names in sorted(families.items())}
        self.support, self.query = support, query
        self.cross_losses, self.loss_mixture = cross_losses, float(loss_mixture)
        self.rng = np.random.default_rng(seed)
        self.draws = 0

    def _draw(self) -> str:
        """A task name: a family uniformly, then one of its variants uniformly."""
        variants = self.families[list(self.families)[self.rng.integers(len(self.families))]]
        return variants[self.rng.integers(len(variants))]

    def sample(self) -> MetaTask:
        name = self._draw()
        dataset = self.datasets[name]
        dataset.set_epoch(self.draws)
        self.draws += 1
        count = self.support + self.query
        picks = self.rng.choice(len(dataset), size=count, replace=count > len(dataset))
        items = [dataset[int(i)] for i in picks]
        a = torch.stack([item["a"] for item in items])
        b = torch.stack([item["b"] for item in items])
        s = self.support
        return MetaTask(name, {"a": a[:s], "b": b[:s]}, {"a": a[s:], "b": b[s:]}, self._loss(name))

    def _loss(self, name: str) -> str | dict[str, float]:
        """The loss of a meta-task whose patches come from ``name``."""
        if self.loss_mixture > 0:
            members = [variants[self.rng.integers(len(variants))] for variants in self.families.values()]
            weights = self.rng.dirichlet([self.loss_mixture] * len(members))
            return dict(zip(members, (float(w) for w in weights), strict=True))
        return self._draw() if self.cross_losses else name


def check_loss_draw(cross_losses: bool, loss_mixture: float) -> None:
    """``meta.cross_losses`` and ``meta.loss_mixture``: two ways to draw a meta-task's loss, one at a time."""
    if not 0 <= loss_mixture < float("inf"):
        raise UserError(f"meta.loss_mixture={loss_mixture}: expected a finite Dirichlet concentration >= 0 "
                        "(0: off)")
    if cross_losses and loss_mixture > 0:
        raise UserError(f"meta.loss_mixture={loss_mixture} with meta.cross_losses=true: choose one way to "
                        "draw a meta-task's loss (set the other to its default)")
