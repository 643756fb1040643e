"""The bilevel implicit architecture search, one step at a time.

With supernet weights ``w`` and architecture weights ``alpha`` (:class:`~.supernet.Supernet`):

    lower:  w     <- w     - eta   * grad_w L_f(train; w, alpha)   (+ lambda_g * task loss)
    upper:  alpha <- alpha - eta_a * hypergrad[ L_f(val) + lambda_g * L_task(val)
                                                + lambda * cost(alpha) / cost_max ]

``hypergrad`` is one of :data:`~.hypergrad.HYPERGRADS` (``settings.hypergrad``); the cost
is the supernet's expected cost (params or MACs per op, :class:`~.supernet.CostTable`)
over its maximum, so ``lambda`` is on the scale of the losses. Against the known collapse
onto parameter-free ops, alpha stays fixed for ``warmup_steps`` while the weights learn,
and derivation caps skips (``max_skips``) and, optionally, MACs (``max_macs``).
``upper_every`` takes that many lower steps per upper step: DARTS alternates one and one,
while the implicit function theorem assumes the weights near their optimum for the current
alpha, so the implicit method is meant to take several lower steps per hyperstep
(Lorraine et al. 2020, Algorithm 1). Weights use Adam at ``weight_lr``; alphas Adam with
betas (0.5, 0.999) as in the public TIM code. The task guidance is the training module's:
a segmentation head trained on the detached fused images, its loss through the fused
image added with weight ``guidance_weight`` at both levels.

:meth:`BilevelSearch.step` is the whole loop body, so a Ray Tune trial, a test and a
benchmark drive the same code.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from timfusion.platform.errors import UserError, check_bounds, naming
from timfusion.search_spaces.genotype import Genotype
from timfusion.search_spaces.hypergrad import HYPERGRADS, build_hypergrad
from timfusion.search_spaces.network import FusionNetwork, count_macs
from timfusion.search_spaces.supernet import CostTable, Supernet


@dataclass
class SearchSettings:
    """The bilevel search's knobs (``search.*`` in the config; Optuna samples some of them)."""

    hypergrad: str = "implicit"
    hypergrad_options: dict[str, Any] = field(default_factory=dict)
    weight_lr: float = 2e-3
    alpha_lr: float = 3e-3
    warmup_steps: int = 20
    cost: str = "macs"
    cost_weight: float = 0.0
    cost_size: tuple[int, int] = (256, 256)
    guidance_weight: float = 0.0
    max_skips: int | None = 2
    grad_clip: float = 1.0
    upper_every: int = 1
    max_macs: float | None = None

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> SearchSettings:
        """From a plain mapping; unknown keys are a UserError listing the valid ones."""
        valid = sorted(cls.__dataclass_fields__)
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise UserError(f"search: unknown key {unknown[0]!r}; valid keys: {', '.join(valid)}")
        values = dict(data)
        if "cost_size" in values:
            values["cost_size"] = tuple(int(s) for s in values["cost_size"])
        settings = cls(**values)
        check_bounds("search", asdict(settings), at_least_one=("upper_every",),
                     positive=("weight_lr", "alpha_lr", "grad_clip", "max_macs"),
                     non_negative=("cost_weight", "guidance_weight", "warmup_steps", "max_skips"),
                     optional=("max_macs", "max_skips"))
        if settings.cost not in CostTable.KINDS:
            raise UserError(f"search.cost={settings.cost}: unknown; valid choices: "
                            f"{', '.join(CostTable.KINDS)}")
        with naming(f"search.hypergrad={settings.hypergrad}"):
            build_hypergrad(settings.hypergrad, **settings.hypergrad_options)  # the name and its options
        return settings

    @classmethod
    def for_run(cls, block: Mapping[str, Any], drawn: Mapping[str, Any] | None = None) -> SearchSettings:
        """A run's settings from the config's ``search`` block, whose ``hypergrad_options`` are
        keyed by method, with ``drawn`` (Tune's samples, a benchmark's choices) over the block.

        The run takes the options of its own method (``drawn``'s ``hypergrad`` or the block's),
        so one config serves every method Tune may draw. Every method's options are checked,
        used by this run or not: a typo fails before a search starts, not in a later trial."""
        values = dict(block)
        by_method = values.get("hypergrad_options") or {}
        if not isinstance(by_method, Mapping):
            raise UserError(
                f"search.hypergrad_options: expected {{method: {{option: value}}}}, got {by_method!r}")
        for method, options in by_method.items():
            with naming(f"search.hypergrad_options.{method}"):
                if method not in HYPERGRADS:
                    raise UserError(f"expected options under a hypergradient method "
                                    f"({', '.join(HYPERGRADS.names())}), got the key {method!r}")
                if not isinstance(options, Mapping):
                    raise UserError(f"expected a mapping of {method}'s options, got {options!r}")
                build_hypergrad(method, **options)
        drawn = dict(drawn or {})
        method = drawn.get("hypergrad", values.get("hypergrad", cls.hypergrad))
        values["hypergrad_options"] = dict(by_method.get(method) or {})
        return cls.from_config({**values, **drawn})


class BilevelSearch:
    """Alternating weight and architecture updates on a :class:`Supernet`."""

    def __init__(
        self,
        supernet: Supernet,
        loss_fn: nn.Module,
        settings: SearchSettings,
        head: nn.Module | None = None,
        head_lr: float = 2e-3,
    ) -> None:
        self.supernet, self.loss_fn, self.settings = supernet, loss_fn, settings
        self.head = head if settings.guidance_weight > 0 else None
        self.weights = supernet.weights()
        self.alphas = supernet.arch_parameters()
        self.weight_opt = torch.optim.Adam(self.weights, lr=settings.weight_lr)
        self.alpha_opt = torch.optim.Adam(self.alphas, lr=settings.alpha_lr, betas=(0.5, 0.999))
        self.head_opt = (
            torch.optim.Adam(self.head.parameters(), lr=head_lr) if self.head is not None else None
        )
        options = {"weight_lr": settings.weight_lr, **settings.hypergrad_options}
        self.hypergrad = build_hypergrad(settings.hypergrad, **options)
        device = next(supernet.parameters()).device
        self.costs = (
            CostTable(supernet, settings.cost, settings.cost_size, device)
            if settings.cost_weight > 0
            else None
        )
        self.cost_max = float(sum(c.max() for c in self.costs.costs.values())) if self.costs else 1.0
        self.step_count = 0
        self.history: list[np.ndarray] = []

    def _objective(self, batch: Mapping[str, Tensor], guided: bool) -> Tensor:
        from timfusion.tasks.heads import segmentation_loss

        a, b = batch["a"], batch["b"]
        fused = self.supernet(a, b)
        total, _ = self.loss_fn(a, b, fused)
        if guided and self.head is not None and "label" in batch:
            total = total + self.settings.guidance_weight * segmentation_loss(
                self.head(fused.clamp(0, 1)), batch["label"]
            )
        return total

    def cost(self) -> Tensor:
        """The normalised expected cost (0 when the cost weight is 0)."""
        if self.costs is None:
            return torch.zeros(())
        return (self.supernet.expected_cost(self.costs) / self.cost_max).float()

    def validate(self, val_batch: Mapping[str, Tensor]) -> float:
        """The upper objective's fusion (+ guidance) part on ``val_batch``, without gradients."""
        with torch.no_grad():
            return float(self._objective(val_batch, guided=True))

    def step(self, train_batch: Mapping[str, Tensor], val_batch: Mapping[str, Tensor]) -> dict[str, float]:
        """One lower-level step, then (after the warm-up, every ``upper_every``) one upper-level
        step; the losses. ``loss/val`` comes with the upper steps only: it is the validation
        objective the hypergradient evaluated first (no extra forward pass for logging)."""
        from timfusion.tasks.heads import segmentation_loss

        logged: dict[str, float] = {}
        if self.head is not None and "label" in train_batch:
            with torch.no_grad():
                fused = self.supernet(train_batch["a"], train_batch["b"])
            head_loss = segmentation_loss(self.head(fused.clamp(0, 1)), train_batch["label"])
            self.head_opt.zero_grad(set_to_none=True)
            head_loss.backward()
            self.head_opt.step()
            logged["loss/head"] = float(head_loss.detach())

        lower = self._objective(train_batch, guided=True)
        self.weight_opt.zero_grad(set_to_none=True)
        for alpha in self.alphas:
            alpha.grad = None
        lower.backward()
        torch.nn.utils.clip_grad_norm_(self.weights, self.settings.grad_clip)
        self.weight_opt.step()
        logged["loss/train"] = float(lower.detach())
        if self.head is not None:
            self.head_opt.zero_grad(set_to_none=True)

        since_warmup = self.step_count - self.settings.warmup_steps
        if since_warmup >= 0 and since_warmup % int(self.settings.upper_every) == 0:
            weight = self.settings.cost_weight

            def upper() -> Tensor:
                value = self._objective(val_batch, guided=True)
                logged.setdefault("loss/val", float(value.detach()))
                return value + weight * self.cost()

            def lower_closure() -> Tensor:
                return self._objective(train_batch, guided=False)

            grads = self.hypergrad(upper, lower_closure, self.weights, self.alphas)
            for alpha, grad in zip(self.alphas, grads, strict=True):
                alpha.grad = grad.to(alpha.dtype)
            self.alpha_opt.step()
            for param in self.weights:
                param.grad = None
        logged["cost"] = float(self.cost().detach()) if self.costs is not None else 0.0
        self.step_count += 1
        self.history.append(self.supernet.alpha_matrix().numpy())
        return logged

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed trial needs (checkpoints of Ray Tune trials)."""
        return {
            "supernet": self.supernet.state_dict(),
            "weight_opt": self.weight_opt.state_dict(),
            "alpha_opt": self.alpha_opt.state_dict(),
            "head": self.head.state_dict() if self.head is not None else None,
            "head_opt": self.head_opt.state_dict() if self.head_opt is not None else None,
            "step": self.step_count,
            "history": np.stack(self.history) if self.history else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.supernet.load_state_dict(state["supernet"], strict=True)
        self.weight_opt.load_state_dict(state["weight_opt"])
        self.alpha_opt.load_state_dict(state["alpha_opt"])
        if self.head is not None and state.get("head") is not None:
            self.head.load_state_dict(state["head"], strict=True)
            self.head_opt.load_state_dict(state["head_opt"])
        self.step_count = int(state["step"])
        history = state.get("history")
        self.history = list(history) if history is not None else []


def derive_genotype(supernet: Supernet, settings: SearchSettings, name: str) -> Genotype:
    """The search's discrete genotype: ``max_skips`` capped and, when ``max_macs`` is set,
    within that many MACs at ``cost_size`` (the whole network's, as :func:`count_macs` counts)."""
    if settings.max_macs is None:
        return supernet.derive(max_skips=settings.max_skips, name=name)
    size = tuple(settings.cost_size)
    table = CostTable(supernet, "macs", size)
    space = supernet.space
    reference = {pos: space.candidates[0] for pos in space.positions()}
    fixed = count_macs(FusionNetwork(space.genotype(reference)), *size, full=False) - table.cost_of(
        reference, space.candidates
    )
    return supernet.derive(
        max_skips=settings.max_skips, name=name, costs=table, max_cost=float(settings.max_macs) - fixed
    )


def alpha_heatmap(
    history: Sequence[np.ndarray], candidates: Sequence[str], positions: Sequence[str]
) -> bytes:
    """PNG: softmax(alpha) per position (rows) and candidate (columns) at the start and the end,
    and the winning op's weight per position over the steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not history:
        raise ValueError("no alpha history to plot")
    stack = np.stack(history)
    fig, axes = plt.subplots(1, 3, figsize=(14, 0.45 * len(positions) + 2.5))
    for ax, (title, matrix) in zip(
        axes[:2], (("first step", stack[0]), ("last step", stack[-1])), strict=True
    ):
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, vmax=max(0.5, float(stack.max())))
        ax.set_title(f"softmax(alpha), {title}")
        ax.set_xticks(range(len(candidates)), candidates, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(positions)), positions, fontsize=7)
    fig.colorbar(image, ax=axes[1])
    winners = stack[-1].argmax(axis=1)
    for row, k in enumerate(winners):
        axes[2].plot(stack[:, row, k], label=f"{positions[row]}: {candidates[k]}")
    axes[2].set_xlabel("step")
    axes[2].set_title("weight of each position's final op")
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()
