"""Meta-learning algorithms for a fusion network's initialization, one class each, registered.

Every algorithm adapts a copy of the network on a meta-task's support patches
(``inner_steps`` steps at ``inner_lr`` on the task's unsupervised fusion loss) and adds
that task's meta-gradient to ``.grad`` of :meth:`MetaAlgorithm.parameters`; the caller
averages over tasks (and workers) and steps an optimizer. learn2learn supplies MAML and
MetaSGD (imported here only: it costs seconds to import):

* ``maml`` — second-order MAML: the query loss after adaptation, differentiated through
  the inner steps (``l2l.algorithms.MAML``, ``first_order=False``).
* ``fomaml`` — first-order MAML: the same, the inner steps' Hessians dropped.
* ``metasgd`` — MetaSGD: MAML with a learned learning rate per weight (``l2l.algorithms.MetaSGD``;
  the rates start at ``inner_lr`` and are meta-parameters too).
* ``reptile`` — Reptile (Nichol et al. 2018): the meta-gradient is ``(theta - phi) /
  (inner_lr * inner_steps)``, ``phi`` the weights after plain SGD adaptation on support
  and query together: no second derivatives, no learn2learn.
* ``multitask`` — not meta-learning: joint training of the base network on the same
  tasks' patches (the honest baseline, ``timfusion adapt init=multitask``).

A new algorithm subclasses :class:`MetaAlgorithm`, registers with
``@META_ALGORITHMS.register`` and must pass ``tests/test_meta.py``'s conformance class.
"""

from __future__ import annotations

import abc
import copy
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from timfusion.meta.sampler import MetaTask
from timfusion.platform.errors import UserError
from timfusion.platform.registry import Registry

META_ALGORITHMS: Registry[type[MetaAlgorithm]] = Registry("meta-learning algorithm")

LossFn = Callable[[nn.Module, Mapping[str, Tensor]], Tensor]
"""The fusion loss of a network on a batch of patches: ``loss_fn(network, {"a", "b"})``."""


def fusion_loss(loss_modules: Mapping[str, nn.Module]) -> Callable[..., LossFn]:
    """Per task name (or task names weighted: a mixture, :class:`MetaTask`'s ``loss``),
    ``(network, batch) -> the task's unsupervised loss of network.fuse``; ``pixel_only=True``
    keeps its pixel-fidelity terms only (the fidelity warm-up of training, which keeps a fresh
    network out of contrast-inverted minima)."""

    def for_task(name: str | Mapping[str, float], pixel_only: bool = False) -> LossFn:
        weights = {name: 1.0} if isinstance(name, str) else name
        weighted = [(float(weight), loss_modules[task]) for task, weight in weights.items()]

        def loss(network: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
            fused = network.fuse(batch["a"], batch["b"])
            return sum(weight * module(batch["a"], batch["b"], fused, pixel_only=pixel_only)[0]
                       for weight, module in weighted)

        return loss

    return for_task


class MetaAlgorithm(abc.ABC):
    """Adapts ``network`` per meta-task and accumulates the meta-gradient of its initialization."""

    name: str = ""

    def __init__(self, network: nn.Module, inner_lr: float = 0.01, inner_steps: int = 3) -> None:
        if not inner_lr > 0:
            raise UserError(f"meta algorithm {self.name}: inner_lr must be > 0, got {inner_lr}")
        if inner_steps < 1:
            raise UserError(f"meta algorithm {self.name}: inner_steps must be >= 1, got {inner_steps}")
        self.network, self.inner_lr, self.inner_steps = network, float(inner_lr), int(inner_steps)

    @classmethod
    def passes_per_task(cls, inner_steps: int) -> int:
        """Forward/backward passes per meta-task (to give the multitask baseline equal compute)."""
        return inner_steps + 1

    def parameters(self) -> list[nn.Parameter]:
        """The meta-parameters the outer optimizer updates (the network's weights by default)."""
        return list(self.network.parameters())

    @abc.abstractmethod
    def accumulate(self, task: MetaTask, loss: LossFn, scale: float) -> tuple[float, float]:
        """Adapt on ``task.support``; add ``scale`` x the meta-gradient to ``.grad``.

        Returns the query loss before and after adaptation.
        """

    def state_dict(self) -> dict[str, Any]:
        """Meta-parameters beyond the network's weights (MetaSGD's rates); empty by default."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise UserError(f"meta algorithm {self.name}: unexpected state {sorted(state)}")


def _query_before(network: nn.Module, task: MetaTask, loss: LossFn) -> float:
    with torch.no_grad():
        return float(loss(network, task.query))


class _Learn2Learn(MetaAlgorithm):
    """MAML-family algorithms on a learn2learn wrapper: clone, adapt, query loss backward."""

    def _wrapper(self) -> nn.Module:
        raise NotImplementedError

    def __init__(self, network: nn.Module, inner_lr: float = 0.01, inner_steps: int = 3) -> None:
        super().__init__(network, inner_lr, inner_steps)
        self.wrapper = self._wrapper()

    def parameters(self) -> list[nn.Parameter]:
        return list(self.wrapper.parameters())

    def accumulate(self, task, loss, scale):
        before = _query_before(self.network, task, loss)
        learner = self.wrapper.clone()
        for _ in range(self.inner_steps):
            learner.adapt(loss(learner.module, task.support))
        after = loss(learner.module, task.query)
        (scale * after).backward()
        return before, float(after.detach())


@META_ALGORITHMS.register("maml")
class Maml(_Learn2Learn):
    """Second-order MAML (learn2learn)."""

    name = "maml"
    first_order = False

    def _wrapper(self):
        import learn2learn as l2l

        return l2l.algorithms.MAML(self.network, lr=self.inner_lr, first_order=self.first_order,
                                   allow_unused=True)


@META_ALGORITHMS.register("fomaml")
class FirstOrderMaml(Maml):
    """First-order MAML (learn2learn, ``first_order=True``)."""

    name = "fomaml"
    first_order = True


@META_ALGORITHMS.register("metasgd")
class MetaSgd(_Learn2Learn):
    """MetaSGD (learn2learn): per-weight learning rates learned with the initialization."""

    name = "metasgd"

    def _wrapper(self):
        import learn2learn as l2l

        return l2l.algorithms.MetaSGD(self.network, lr=self.inner_lr, first_order=False)

    def accumulate(self, task, loss, scale):
        try:
            return super().accumulate(task, loss, scale)
        except RuntimeError as err:
            if "does not require grad" in str(err) or "not have been used" in str(err):
                raise UserError(f"meta algorithm metasgd: every weight must take part in fuse(); "
                                f"{err}") from None
            raise

    def state_dict(self):
        return {"lrs": [lr.detach().clone() for lr in self.wrapper.lrs]}

    def load_state_dict(self, state):
        with torch.no_grad():
            for lr, saved in zip(self.wrapper.lrs, state["lrs"], strict=True):
                lr.copy_(saved)


@META_ALGORITHMS.register("reptile")
class Reptile(MetaAlgorithm):
    """Reptile: move the initialization towards the weights SGD adaptation reaches."""

    name = "reptile"

    @classmethod
    def passes_per_task(cls, inner_steps: int) -> int:
        return inner_steps  # the query losses before and after are logged, forward only

    def accumulate(self, task, loss, scale):
        before = _query_before(self.network, task, loss)
        fast = copy.deepcopy(self.network)
        optimizer = torch.optim.SGD(fast.parameters(), lr=self.inner_lr)
        joint = {key: torch.cat((task.support[key], task.query[key])) for key in ("a", "b")}
        for _ in range(self.inner_steps):
            optimizer.zero_grad(set_to_none=True)
            loss(fast, joint).backward()
            optimizer.step()
        after = _query_before(fast, task, loss)
        factor = scale / (self.inner_lr * self.inner_steps)
        for slow, adapted in zip(self.network.parameters(), fast.parameters(), strict=True):
            step = factor * (slow.detach() - adapted.detach())
            slow.grad = step if slow.grad is None else slow.grad + step
        return before, after


@META_ALGORITHMS.register("multitask")
class Multitask(MetaAlgorithm):
    """Joint training on the meta-tasks' patches, no adaptation: the baseline meta-init must beat."""

    name = "multitask"

    @classmethod
    def passes_per_task(cls, inner_steps: int) -> int:
        return 1

    def accumulate(self, task, loss, scale):
        joint = {key: torch.cat((task.support[key], task.query[key])) for key in ("a", "b")}
        total = loss(self.network, joint)
        (scale * total).backward()
        value = _query_before(self.network, task, loss)
        return value, value


def build_algorithm(name: str, network: nn.Module, inner_lr: float, inner_steps: int) -> MetaAlgorithm:
    """The registered algorithm ``name`` over ``network``."""
    return META_ALGORITHMS.get(name)(network, inner_lr=inner_lr, inner_steps=inner_steps)
