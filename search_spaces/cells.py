"""Cells of the TIM search space: a chain of operations, or a multi-scale fusion cell.

A cell is built as ``Cell(channels, ops, make_op=None)``: ``ops`` names the operation at
each *position* (two by default); the module at a position is made by
``make_op(position, channels)``, by default ``OPS.get(ops[position])(channels)``. The
architecture search injects its own factory (e.g. a weighted sum over every candidate
op) and then ``ops`` only labels the positions. A cell lists the op modules it built, in
order, with :meth:`Cell.op_slots`: one slot per (position, scale), so a multi-scale cell
has three slots per position (C, 2C and 4C channels) that a search would weight with
the same architecture parameters.

Cells are registered in :data:`CELLS` with their parameter count as a formula of C and
the op names (``CELLS.meta(name)["params"](C, ops)``) and the input-size multiple they
need (``CELLS.meta(name)["multiple"]``).

Both cells follow the public TIM code (``Cell_Chain2`` and ``Cell_Fusion`` of
``model/model_searched.py``), reimplemented layer by layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timfusion.platform.registry import Registry
from timfusion.search_spaces.ops import OPS

MakeOp = Callable[[int, int], nn.Module]
"""``make_op(position, channels) -> module`` keeping ``channels`` and the spatial size."""

CELLS: Registry[type[Cell]] = Registry("cell type")


@dataclass(frozen=True)
class OpSlot:
    """One op module of a cell: its position in the cell's op list, channels and scale."""

    position: int
    channels: int
    scale: int = 1  # resolution divisor: 1 (full), 2 or 4


def default_make_op(ops: Sequence[str]) -> MakeOp:
    """The factory building the registered operation named at each position."""

    def make(position: int, channels: int) -> nn.Module:
        return OPS.get(ops[position])(channels)

    return make


def _op_params(ops: Sequence[str], channels: int) -> int:
    return sum(OPS.meta(name)["params"](channels) for name in ops)


class Cell(nn.Module):
    """Base of the registered cells."""

    multiple = 1  # the input height and width must be multiples of this

    def __init__(self, channels: int, ops: Sequence[str], make_op: MakeOp | None = None) -> None:
        super().__init__()
        if len(ops) < 1:
            raise ValueError("a cell needs at least one operation position")
        self.channels = channels
        self.op_names = tuple(ops)
        self._make_op = make_op or default_make_op(self.op_names)

    def op_slots(self) -> list[tuple[OpSlot, nn.Module]]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"channels={self.channels}, ops={list(self.op_names)}"


class ReLUConvBN(nn.Sequential):
    """TIM's cell preprocessing: ReLU, bias-free 1x1 conv, BatchNorm."""

    def __init__(self, channels: int) -> None:
        super().__init__(nn.ReLU(), nn.Conv2d(channels, channels, 1, bias=False), nn.BatchNorm2d(channels))


@CELLS.register("chain", multiple=1, params=lambda c, ops: c * c + 2 * c + _op_params(ops, c))
class ChainCell(Cell):
    """``ops[-1](...ops[0](ReLUConvBN(x)))``: 1x1 conv + BN preprocessing, then the ops in sequence."""

    def __init__(self, channels: int, ops: Sequence[str], make_op: MakeOp | None = None) -> None:
        super().__init__(channels, ops, make_op)
        self.pre = ReLUConvBN(channels)
        self.ops = nn.ModuleList(self._make_op(i, channels) for i in range(len(self.op_names)))

    def op_slots(self) -> list[tuple[OpSlot, nn.Module]]:
        return [(OpSlot(i, self.channels), op) for i, op in enumerate(self.ops)]

    def forward(self, x: Tensor) -> Tensor:
        x = self.pre(x)
        for op in self.ops:
            x = op(x)
        return x


class BlurPool(nn.Module):
    """Anti-aliased downsampling by 2 (Zhang 2019): reflect pad 1, [1,2,1]^2/16 blur, stride 2.

    The filter is a fixed, non-persistent buffer (not in the state dict, no parameters).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        taps = torch.tensor([1.0, 2.0, 1.0])
        kernel = (taps[:, None] * taps[None, :]) / 16.0
        self.register_buffer("kernel", kernel.expand(channels, 1, 3, 3).contiguous(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), self.kernel, stride=2, groups=x.shape[1])


class ResidualDown(nn.Module):
    """Halve the resolution, double the channels: a conv path plus a blur-pool path (TIM).

    ``top = 1x1(blur(PReLU(3x3(PReLU(1x1(x))))))`` (C -> 2C), ``bot = 1x1(blur(x))``; all
    convs bias-free. Parameters: 14 C^2 + 2.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels
        self.top = nn.Sequential(
            nn.Conv2d(c, c, 1, bias=False),
            nn.PReLU(),
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.PReLU(),
            BlurPool(c),
            nn.Conv2d(c, 2 * c, 1, bias=False),
        )
        self.bot = nn.Sequential(BlurPool(c), nn.Conv2d(c, 2 * c, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.top(x) + self.bot(x)


class ResidualUp(nn.Module):
    """Double the resolution, halve the channels: transposed-conv path plus bilinear path (TIM).

    ``top = 1x1(PReLU(convT3x3_s2(PReLU(1x1(x)))))`` (C -> C/2), ``bot = 1x1(bilinear_x2(x))``;
    all bias-free. Parameters: 11 C^2 + 2.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = channels
        self.top = nn.Sequential(
            nn.Conv2d(c, c, 1, bias=False),
            nn.PReLU(),
            nn.ConvTranspose2d(c, c, 3, stride=2, padding=1, output_padding=1, bias=False),
            nn.PReLU(),
            nn.Conv2d(c, c // 2, 1, bias=False),
        )
        self.bot = nn.Conv2d(c, c // 2, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        up = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.top(x) + self.bot(up)


class SelectiveKernelFusion(nn.Module):
    """SKFF (Zamir et al., MIRNet): softmax attention across same-shaped branches.

    ``z = PReLU(1x1(mean_hw(sum_i x_i)))`` (C -> d = max(C // 8, 4)), one 1x1 ``d -> C`` per
    branch, softmax over the branches per channel, ``out = sum_i a_i x_i``.
    Parameters: C d + 1 + branches d C.
    """

    def __init__(self, channels: int, branches: int = 3, reduction: int = 8) -> None:
        super().__init__()
        d = max(channels // reduction, 4)
        self.squeeze = nn.Sequential(nn.Conv2d(channels, d, 1, bias=False), nn.PReLU())
        self.excite = nn.ModuleList(nn.Conv2d(d, channels, 1, bias=False) for _ in range(branches))

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        stacked = torch.stack(list(feats), 1)  # (N, B, C, H, W)
        z = self.squeeze(stacked.sum(1).mean((2, 3), keepdim=True))
        attention = torch.softmax(torch.stack([fc(z) for fc in self.excite], 1), 1)  # (N, B, C, 1, 1)
        return (stacked * attention).sum(1)


def _multiscale_params(c: int, ops: Sequence[str]) -> int:
    d = max(c // 8, 4)
    pre = c * c + 2 * c
    down = 2 * (14 * c * c + 2) + (14 * (2 * c) ** 2 + 2)  # down_2, and down_4's two steps
    up = 2 * (11 * (2 * c) ** 2 + 2) + (11 * (4 * c) ** 2 + 2)  # up_2, and up_4's two steps
    skff = c * d + 1 + 3 * d * c
    return pre + down + up + skff + sum(_op_params(ops, c * s) for s in (1, 2, 4))


@CELLS.register("multiscale", multiple=4, params=_multiscale_params)
class MultiScaleCell(Cell):
    """TIM's multi-scale fusion cell (``Cell_Fusion``).

    ``x = ReLUConvBN(x)``; three branches: ``x`` (C channels), ``down2(x)`` (2C, 1/2 size)
    and ``down4(x)`` (4C, 1/4 size, two down steps of its own); each branch runs the op
    chain at its width (separate weights, same op names); the coarse branches come back
    through ``up2`` / ``up4`` (one / two up steps) and the three are merged by
    selective-kernel fusion; the output is ``x + SKFF(...)``. H and W must be multiples of 4.
    """

    multiple = 4
    scales = (1, 2, 4)

    def __init__(self, channels: int, ops: Sequence[str], make_op: MakeOp | None = None) -> None:
        super().__init__(channels, ops, make_op)
        c = channels
        self.pre = ReLUConvBN(c)
        self.down2 = ResidualDown(c)
        self.down4 = nn.Sequential(ResidualDown(c), ResidualDown(2 * c))
        self.branches = nn.ModuleList(
            nn.ModuleList(self._make_op(i, c * s) for i in range(len(self.op_names))) for s in self.scales
        )
        self.up2 = ResidualUp(2 * c)
        self.up4 = nn.Sequential(ResidualUp(4 * c), ResidualUp(2 * c))
        self.skff = SelectiveKernelFusion(c, branches=3)

    def op_slots(self) -> list[tuple[OpSlot, nn.Module]]:
        slots = []
        for i in range(len(self.op_names)):
            for branch, s in zip(self.branches, self.scales, strict=True):
                slots.append((OpSlot(i, self.channels * s, s), branch[i]))
        return slots

    def forward(self, x: Tensor) -> Tensor:
        x = self.pre(x)
        feats = [x, self.down2(x), self.down4(x)]
        for k, branch in enumerate(self.branches):
            for op in branch:
                feats[k] = op(feats[k])
        fused = self.skff([feats[0], self.up2(feats[1]), self.up4(feats[2])])
        return x + fused
