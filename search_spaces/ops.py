"""Candidate operations of the TIM search space.

Every operation keeps its channel count C and its spatial size (stride 1, "same"
padding, so odd sizes work), and is constructed as ``Op(channels)``. Each one is
registered in :data:`OPS` with its exact parameter count as a formula of C
(``OPS.meta(name)["params"](C)``), which the tests check for every registered entry.

The definitions follow the public TIM code (``model/operations.py`` of
LiuZhu-CV/TIMFusion) layer by layer, reimplemented:

==================  =============================================================  ===============
name                layers                                                         parameters
==================  =============================================================  ===============
sep_conv_3x3        2 x (ReLU, depthwise 3x3, 1x1, BN)                             2C^2 + 22C
dil_conv_3x3        x + (ReLU, depthwise 3x3 dilation 2, 1x1, BN)(x)                C^2 + 11C
res_3x3 / res_5x5   x + (depthwise kxk, depthwise 3x3 dilation 2, 1x1, BN, PReLU)   C^2 + (k^2+11)C + 1
dense_3x3 / _5x5    three grouped kxk convs (groups C) over [x], [x,x1], [x,x1,x2]  6k^2 C + 1
                    each + PReLU (one shared slope), out = x + 0.333 x3
spatial_att_3x3     x * sigmoid(conv3x3([max_c x, mean_c x]))                      18
channel_att         ECA (global mean -> 1-D conv k=3 over channels -> sigmoid),     9C^2 + 4
                    then a full 3x3 conv and PReLU (TIM's ``ECABasicBlock``)
skip                identity                                                       0
conv_3x3            3x3 conv (bias) + PReLU (ours: a plain baseline op)            9C^2 + C + 1
==================  =============================================================  ===============

Convolutions inside operations are bias-free and zero-padded, as in the public code;
BatchNorm is affine (the public code's ``affine`` argument never reaches these ops).

Deviations from the public code (all parameter-count neutral):

* ``dense_*`` reproduces TIM's grouping exactly (``groups=C`` over the *concatenation*,
  so group g of the second conv sees channels 2g and 2g+1 of [x, x1]); the 0.333 scale is
  kept as published.
* ``conv_3x3`` and ``skip`` are not in the published genotypes; they are offered to the
  search as a plain baseline and the usual DARTS identity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from timfusion.platform.registry import Registry

OPS: Registry[type[nn.Module]] = Registry("operation")


def _dw(
    channels: int, kernel: int, dilation: int = 1, groups: int | None = None, c_in: int | None = None
) -> nn.Conv2d:
    """A bias-free, zero-padded, stride-1 grouped conv (depthwise by default) keeping the size."""
    c_in = channels if c_in is None else c_in
    return nn.Conv2d(
        c_in,
        channels,
        kernel,
        padding=dilation * (kernel - 1) // 2,
        dilation=dilation,
        groups=channels if groups is None else groups,
        bias=False,
    )


def _pw(channels: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 1, bias=False)


@OPS.register("sep_conv_3x3", params=lambda c: 2 * c * c + 22 * c)
class SepConv3x3(nn.Module):
    """Separable conv applied twice (DARTS style): (ReLU, dw 3x3, 1x1, BN) x 2, no residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(),
            _dw(channels, 3),
            _pw(channels),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            _dw(channels, 3),
            _pw(channels),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


@OPS.register("dil_conv_3x3", params=lambda c: c * c + 11 * c)
class DilConv3x3(nn.Module):
    """``x + BN(1x1(dw3x3_dilation2(ReLU(x))))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.ReLU(), _dw(channels, 3, dilation=2), _pw(channels), nn.BatchNorm2d(channels)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.op(x)


class _Residual(nn.Module):
    """``x + PReLU(BN(1x1(dw3x3_d2(dw_kxk(x)))))`` (TIM's ``ResidualModule``)."""

    kernel = 3

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Sequential(
            _dw(channels, self.kernel),
            _dw(channels, 3, dilation=2),
            _pw(channels),
            nn.BatchNorm2d(channels),
            nn.PReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.op(x)


@OPS.register("res_3x3", params=lambda c: c * c + 20 * c + 1)
class Res3x3(_Residual):
    kernel = 3


@OPS.register("res_5x5", params=lambda c: c * c + 36 * c + 1)
class Res5x5(_Residual):
    kernel = 5


class _Dense(nn.Module):
    """Residual dense block (TIM's ``ResidualDenseBlock``): three grouped kxk convs.

    ``x1 = act(g1(x)); x2 = act(g2([x, x1])); x3 = act(g3([x, x1, x2])); out = x + 0.333 x3``
    with ``groups=C`` on each conv and one PReLU slope shared by the three activations.
    """

    kernel = 3

    def __init__(self, channels: int) -> None:
        super().__init__()
        k = self.kernel
        self.conv1 = _dw(channels, k)
        self.conv2 = _dw(channels, k, c_in=2 * channels)
        self.conv3 = _dw(channels, k, c_in=3 * channels)
        self.act = nn.PReLU()

    def forward(self, x: Tensor) -> Tensor:
        x1 = self.act(self.conv1(x))
        x2 = self.act(self.conv2(torch.cat((x, x1), 1)))
        x3 = self.act(self.conv3(torch.cat((x, x1, x2), 1)))
        return x + 0.333 * x3


@OPS.register("dense_3x3", params=lambda c: 54 * c + 1)
class Dense3x3(_Dense):
    kernel = 3


@OPS.register("dense_5x5", params=lambda c: 150 * c + 1)
class Dense5x5(_Dense):
    kernel = 5


def channel_max_mean(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, 2, H, W): the per-pixel maximum and mean over channels."""
    return torch.cat((x.amax(1, keepdim=True), x.mean(1, keepdim=True)), 1)


@OPS.register("spatial_att_3x3", params=lambda c: 18)
class SpatialAttention3x3(nn.Module):
    """``x * sigmoid(conv3x3([max_c x, mean_c x]))`` (bias-free conv, 2 -> 1 channels)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.conv(channel_max_mean(x)))


class ECA(nn.Module):
    """Efficient channel attention: ``x * sigmoid(conv1d_k(mean_hw x))`` over the channel axis."""

    def __init__(self, kernel: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, kernel, padding=(kernel - 1) // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        y = x.mean((2, 3)).unsqueeze(1)  # (N, 1, C)
        y = torch.sigmoid(self.conv(y)).transpose(1, 2).unsqueeze(-1)  # (N, C, 1, 1)
        return x * y


@OPS.register("channel_att", params=lambda c: 9 * c * c + 4)
class ChannelAttention(nn.Module):
    """TIM's ``ECABasicBlock``: ECA (k=3), then a bias-free 3x3 conv and PReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.eca = ECA(3)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.act = nn.PReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(self.eca(x)))


@OPS.register("skip", params=lambda c: 0)
class Skip(nn.Module):
    """Identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return x


@OPS.register("conv_3x3", params=lambda c: 9 * c * c + c + 1)
class Conv3x3(nn.Module):
    """A plain 3x3 conv with bias, then PReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.PReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv(x))
