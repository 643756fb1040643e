"""The supernet of an architecture search: every op position a softmax-weighted mixture.

A search space (``search_spaces/conf/search_space/<name>.yaml``, :func:`load_search_space`)
is a genotype *template* whose cells give a number of op ``positions`` instead of op
names, plus the ``candidates``: registered op names. :class:`Supernet` builds the
template's network with a :class:`MixedOp` at every position, ``sum_k softmax(alpha)_k
op_k(x)``, one alpha vector per (cell, position), shared by a multi-scale cell's three
scales. The network weights (:meth:`Supernet.weights`) and the architecture weights
(:meth:`Supernet.arch_parameters`) are kept apart for the two levels of the search.

Derivation (:meth:`Supernet.derive`) takes the argmax per position into the genotype JSON
training builds from; ``max_skips`` caps the parameter-free ops (the known DARTS collapse
onto skips): the surplus skips with the smallest margin over their best other op are
replaced by that op. Compactness (:meth:`Supernet.expected_cost`) is ``sum_positions
softmax(alpha) . cost``, the cost per candidate from a :class:`CostTable`.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import platform as platform_module
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from timfusion.platform.errors import UserError, is_integer
from timfusion.search_spaces.genotype import Genotype
from timfusion.search_spaces.network import FusionNetwork, mac_profile
from timfusion.search_spaces.ops import OPS

SEARCH_SPACE_DIR = Path(__file__).resolve().parent / "conf" / "search_space"
PARAMETER_FREE = ("skip",)


def SEARCH_SPACES() -> list[str]:  # noqa: N802 - reads as the constant it stands for
    """The shipped search-space names."""
    return sorted(p.stem for p in SEARCH_SPACE_DIR.glob("*.yaml"))


@dataclass(frozen=True)
class SearchSpace:
    """A genotype template with op positions, and the candidate ops for every position."""

    name: str
    candidates: tuple[str, ...]
    template: dict[str, Any]

    def positions(self) -> list[tuple[str, int]]:
        """Every (cell place, position) in genotype order: ``("stage1.cells.0", 1)``, ..."""
        return [(place, pos) for place, cell in self.genotype({}).cells() for pos in range(len(cell.ops))]

    def genotype(self, choice: Mapping[tuple[str, int], str], name: str | None = None) -> Genotype:
        """The template with ``choice[(place, position)]`` at each position (first candidate elsewhere)."""
        data = copy.deepcopy(self.template)
        data["name"] = name or data.get("name", self.name)
        for place, cell in _template_cells(data):
            count = cell.pop("positions")
            cell["ops"] = [choice.get((place, pos), self.candidates[0]) for pos in range(count)]
        return Genotype.from_dict(data, source=f"search space {self.name}")


def _template_cells(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    cells = [(f"stage1.cells.{i}", c) for i, c in enumerate(data["stage1"]["cells"])]
    stage2 = data.get("stage2")
    if stage2:
        for b, branch in enumerate(stage2["branches"]):
            cells += [(f"stage2.branches.{b}.cells.{i}", c) for i, c in enumerate(branch["cells"])]
    return cells


def parse_search_space(data: Any, source: str) -> SearchSpace:
    """A search space from its config mapping; every problem is a UserError naming ``source``."""
    if not isinstance(data, Mapping):
        raise UserError(f"{source}: expected a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - {"name", "candidates", "template"})
    if unknown:
        raise UserError(f"{source}: unknown key {unknown[0]!r}; valid keys: candidates, name, template")
    for key in ("name", "candidates", "template"):
        if key not in data:
            raise UserError(f"{source}: missing key {key!r}")
    candidates = data["candidates"]
    if not isinstance(candidates, Sequence) or isinstance(candidates, str) or len(candidates) < 2:
        raise UserError(f"{source}: candidates must be a list of at least two op names, got {candidates!r}")
    for op in candidates:
        OPS.get(op)  # an unknown op is a UserError listing the known ones
    if len(set(candidates)) != len(candidates):
        raise UserError(f"{source}: candidates repeat an op: {list(candidates)}")
    template = _plain(data["template"])
    if not isinstance(template, dict) or "stage1" not in template:
        raise UserError(f"{source}: template must be a genotype mapping with a stage1")
    try:
        cells = _template_cells(template)
    except (KeyError, TypeError) as err:
        raise UserError(f"{source}: template cells are malformed: {err}") from None
    for place, cell in cells:
        count = cell.get("positions") if isinstance(cell, dict) else None
        if not is_integer(count) or count < 1 or "ops" in cell:
            raise UserError(
                f"{source}: template {place} must give 'positions' (an integer >= 1) instead of ops"
            )
    space = SearchSpace(str(data["name"]), tuple(candidates), template)
    space.genotype({})  # the template itself must make a valid genotype
    return space


def _plain(value: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return copy.deepcopy(value)


def load_search_space(spec: str | Mapping[str, Any]) -> SearchSpace:
    """A shipped search space by name, a YAML path, or a mapping (a composed config node)."""
    if isinstance(spec, Mapping):
        return parse_search_space(spec, f"search space {spec.get('name', '?')}")
    from omegaconf import OmegaConf

    path = Path(spec)
    if not path.suffix:
        path = SEARCH_SPACE_DIR / f"{spec}.yaml"
        if not path.exists():
            raise UserError(f"unknown search space {spec!r}; known: {', '.join(SEARCH_SPACES())}")
    if not path.exists():
        raise UserError(f"{path}: no such search-space file")
    return parse_search_space(OmegaConf.to_container(OmegaConf.load(path), resolve=True), str(path))


def resize_search_space(
    space: SearchSpace, width: int | None = None, cells: int | None = None
) -> SearchSpace:
    """The space with another feature ``width`` (the stem's hidden width scaled alike) and/or
    ``cells`` stage-1 cells (the last cell repeated, or the list cut); ``None`` keeps it."""
    template = copy.deepcopy(space.template)
    if width is not None:
        width = int(width)
        if width < 1:
            raise UserError(f"search space {space.name}: width must be >= 1, got {width}")
        if template.get("stem_hidden"):
            template["stem_hidden"] = max(1, round(template["stem_hidden"] * width / template["width"]))
        template["width"] = width
    if cells is not None:
        cells = int(cells)
        if cells < 1:
            raise UserError(f"search space {space.name}: cells must be >= 1, got {cells}")
        stage1 = template["stage1"]["cells"]
        template["stage1"]["cells"] = (stage1 + [copy.deepcopy(stage1[-1]) for _ in range(cells)])[:cells]
    resized = SearchSpace(space.name, space.candidates, template)
    resized.genotype({})
    return resized


def _alpha_key(place: str, position: int) -> str:
    return f"{place.replace('.', '_')}__{position}"


class MixedOp(nn.Module):
    """``sum_k w_k op_k(x)`` over the candidates, ``w = softmax(alpha)`` read at each call."""

    def __init__(self, channels: int, candidates: Sequence[str], weights: functools.partial) -> None:
        super().__init__()
        self.candidates = tuple(candidates)
        self.ops = nn.ModuleList(OPS.get(name)(channels) for name in candidates)
        self._weights = weights  # not a module: the alphas live in the supernet

    def forward(self, x: Tensor) -> Tensor:
        w = self._weights()
        return sum(w[k] * op(x) for k, op in enumerate(self.ops))


def latency_cache_path(device: torch.device) -> Path:
    """Where measured op latencies of ``device`` are kept (``$TIMFUSION_CACHE`` or ~/.cache/timfusion)."""
    root = Path(os.environ.get("TIMFUSION_CACHE", Path.home() / ".cache" / "timfusion"))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{platform_module.machine()}-{torch.get_num_threads()}threads"
    return root / "latency" / ("".join(c if c.isalnum() or c in "-_." else "_" for c in name) + ".json")


def measure_latency(
    op: nn.Module, channels: int, height: int, width: int, device: torch.device, repeats: int = 5
) -> float:
    """Median seconds of one eval-mode, no-grad forward of ``op`` on a (1, C, H, W) input."""
    import time

    op = copy.deepcopy(op).to(device).eval()
    x = torch.rand(1, channels, height, width, device=device)
    times = []
    with torch.no_grad():
        op(x)
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            op(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    return float(sorted(times)[len(times) // 2])


class CostTable:
    """Cost of each candidate op at each op slot: ``params``, ``macs`` or ``latency`` at an input size.

    ``costs[key]`` is a vector over the candidates, summed over the position's slots (a
    multi-scale cell's three scales); computed once per search space and input size.
    ``latency`` is measured on ``device`` (median of 5 runs per op, channels and size) and
    cached per device in :func:`latency_cache_path`, so a cluster's trials measure once.
    """

    KINDS = ("params", "macs", "latency")

    def __init__(
        self,
        supernet: Supernet,
        kind: str = "params",
        size: tuple[int, int] = (256, 256),
        device: torch.device | str = "cpu",
    ) -> None:
        if kind not in self.KINDS:
            raise UserError(f"unknown cost {kind!r}; known: {', '.join(self.KINDS)}")
        self.kind, self.size, self.device = kind, size, torch.device(device)
        self._cache_path = latency_cache_path(self.device) if kind == "latency" else None
        self._cache: dict[str, float] = {}
        if self._cache_path is not None and self._cache_path.exists():
            try:
                self._cache = json.loads(self._cache_path.read_text())
            except (OSError, ValueError):
                self._cache = {}  # an unreadable cache is measured again and rewritten
        self.costs: dict[str, Tensor] = {}
        for place, slot, op in supernet.network.op_slots():
            key = _alpha_key(place, slot.position)
            vec = torch.tensor(
                [self._cost(name, sub, slot) for name, sub in zip(op.candidates, op.ops, strict=True)],
                dtype=torch.float64,
            )
            self.costs[key] = self.costs.get(key, torch.zeros_like(vec)) + vec
        if self._cache_path is not None:
            from timfusion.tasks.imageio import atomic_write_text

            self._cache_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self._cache_path, json.dumps(self._cache, indent=0, sort_keys=True))

    def cost_of(self, choice: Mapping[tuple[str, int], str], candidates: Sequence[str]) -> float:
        """The cost of a discrete choice (``{(place, position): op}``, e.g. a sampled genotype)."""
        return float(
            sum(
                self.costs[_alpha_key(place, pos)][list(candidates).index(op)]
                for (place, pos), op in choice.items()
            )
        )

    def _cost(self, name: str, op: nn.Module, slot) -> float:
        if self.kind == "params":
            return float(sum(p.numel() for p in op.parameters()))
        h, w = (max(1, s // slot.scale) for s in self.size)
        if self.kind == "latency":
            entry = f"{name}:{slot.channels}:{h}x{w}"
            if entry not in self._cache:
                self._cache[entry] = measure_latency(op, slot.channels, h, w, self.device)
            return self._cache[entry]
        x = torch.zeros(1, slot.channels, h, w)
        return float(sum(mac_profile(op, h, w, inputs=(x,), full=False).values()))


class Supernet(nn.Module):
    """The search space's network with a :class:`MixedOp` per position and its alphas."""

    def __init__(self, space: SearchSpace, init_scale: float = 1e-3, seed: int = 0) -> None:
        super().__init__()
        self.space = space
        gen = torch.Generator().manual_seed(seed)
        self.alphas = nn.ParameterDict(
            {
                _alpha_key(place, pos): nn.Parameter(
                    init_scale * torch.randn(len(space.candidates), generator=gen)
                )
                for place, pos in space.positions()
            }
        )
        self.network = FusionNetwork(space.genotype({}), make_op=self._make_op)

    def _make_op(self, place: str, position: int, channels: int) -> MixedOp:
        return MixedOp(channels, self.space.candidates, functools.partial(self.op_weights, place, position))

    def op_weights(self, place: str, position: int) -> Tensor:
        """``softmax(alpha)`` of one position."""
        return torch.softmax(self.alphas[_alpha_key(place, position)], dim=0)

    def weights(self) -> list[nn.Parameter]:
        """The network weights (the lower level's variables)."""
        return list(self.network.parameters())

    def arch_parameters(self) -> list[nn.Parameter]:
        """The alphas (the upper level's variables), in :meth:`SearchSpace.positions` order."""
        return [self.alphas[_alpha_key(place, pos)] for place, pos in self.space.positions()]

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.network.fuse(a, b)

    def fuse(self, a: Tensor, b: Tensor) -> Tensor:
        return self.network.fuse(a, b)

    def expected_cost(self, table: CostTable) -> Tensor:
        """``sum_positions softmax(alpha) . cost``: differentiable in the alphas."""
        total = torch.zeros((), dtype=torch.float64)
        for key, alpha in self.alphas.items():
            total = total + (torch.softmax(alpha, dim=0).double() * table.costs[key]).sum()
        return total

    def alpha_matrix(self) -> Tensor:
        """``softmax(alpha)`` of every position, one row each (for heatmaps and logs)."""
        return torch.stack([torch.softmax(a.detach(), dim=0) for a in self.arch_parameters()])

    def derive(
        self,
        max_skips: int | None = None,
        name: str | None = None,
        costs: CostTable | None = None,
        max_cost: float | None = None,
    ) -> Genotype:
        """The discrete genotype: argmax per position, at most ``max_skips`` parameter-free ops,
        and with ``costs`` and ``max_cost``, at most that cost (in the table's units).

        Over the budget, positions step down to cheaper candidates one at a time, each time
        the step that gives up the least log-probability per unit of cost saved, so the
        genotype stays as close to alpha's choice as the budget allows.
        """
        probs = self.alpha_matrix()
        cands = self.space.candidates
        best = probs.argmax(dim=1).tolist()
        free = [i for i, name in enumerate(cands) if name in PARAMETER_FREE]
        if max_skips is not None:
            skipped = [r for r, k in enumerate(best) if k in free]
            if len(skipped) > max_skips:
                masked = probs.clone()
                masked[:, free] = -1.0
                margin = {r: float(probs[r, best[r]] - masked[r].max()) for r in skipped}
                for r in sorted(skipped, key=margin.get)[: len(skipped) - max_skips]:
                    best[r] = int(masked[r].argmax())
        if max_cost is not None:
            if costs is None:
                raise ValueError("derive: max_cost needs the cost table it is measured in")
            best = self._within_budget(probs, best, costs, float(max_cost), max_skips, free)
        choice = {pos: cands[k] for pos, k in zip(self.space.positions(), best, strict=True)}
        return self.space.genotype(choice, name=name or f"{self.space.name}-derived")

    def _within_budget(
        self,
        probs: Tensor,
        best: list[int],
        costs: CostTable,
        max_cost: float,
        max_skips: int | None,
        free: list[int],
    ) -> list[int]:
        table = torch.stack([costs.costs[_alpha_key(p, q)] for p, q in self.space.positions()])
        logp = torch.log(probs.double().clamp_min(1e-30))
        best = list(best)
        while float(sum(table[r, k] for r, k in enumerate(best))) > max_cost:
            skips = sum(k in free for k in best)
            moves = [
                (float(logp[r, k_old] - logp[r, k]) / float(table[r, k_old] - table[r, k]), r, k)
                for r, k_old in enumerate(best)
                for k in range(table.shape[1])
                if table[r, k] < table[r, k_old]
                and not (k in free and max_skips is not None and skips >= max_skips and k_old not in free)
            ]
            if not moves:
                cheapest = float(sum(table[r, k] for r, k in enumerate(best)))
                raise UserError(
                    f"search: no genotype of {self.space.name} costs at most {max_cost:.4g} "
                    f"{costs.kind} with at most {max_skips} skips (cheapest reachable {cheapest:.4g})"
                )
            _, row, k = min(moves)
            best[row] = k
        return best
