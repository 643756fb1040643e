"""The fuser interface and the classic (training-free) baselines.

The platform fuses on luminance: the caller converts each source to one channel on
[0, 1] and restores chroma afterwards, so a fuser only ever sees (N, 1, H, W) tensors.

A fuser is a ``torch.nn.Module`` whose ``forward(a, b)`` checks its inputs, calls
``fuse(a, b)`` and clips the result to [0, 1]. Learned networks subclass :class:`Fuser`
and implement ``fuse``; baselines are registered in :data:`BASELINES` and are
constructible with no arguments.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from timfusion.platform.errors import UserError
from timfusion.platform.registry import Registry
from timfusion.tasks.filters import (
    box_mean,
    gaussian_filter,
    guided_filter,
    laplacian,
    separable_filter,
)


def check_pair(a: Tensor, b: Tensor) -> None:
    """Raise a UserError unless ``a`` and ``b`` are equal-shaped float (N, 1, H, W) tensors."""
    for label, x in (("a", a), ("b", b)):
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 1:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise UserError(f"fuser input {label} must be an (N, 1, H, W) luminance tensor, got {shape}")
        if not x.is_floating_point():
            raise UserError(f"fuser input {label} must be floating point on [0, 1], got {x.dtype}")
        if x.numel() == 0:
            raise UserError(f"fuser input {label} is empty: {tuple(x.shape)}")
    if a.shape != b.shape:
        raise UserError(f"fuser inputs differ in shape: a {tuple(a.shape)} vs b {tuple(b.shape)}")


class Fuser(torch.nn.Module):
    """Fuse two luminance images: (N, 1, H, W) on [0, 1] twice -> (N, 1, H, W) on [0, 1]."""

    name: str = "fuser"

    def fuse(self, a: Tensor, b: Tensor) -> Tensor:
        """The unclipped fused image; subclasses implement this."""
        raise NotImplementedError

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        check_pair(a, b)
        return self.fuse(a, b).clamp(0.0, 1.0)


BASELINES: Registry[type[Fuser]] = Registry("baseline")


@BASELINES.register("average")
class AverageFuser(Fuser):
    """``F = (A + B) / 2``."""

    name = "average"

    def fuse(self, a: Tensor, b: Tensor) -> Tensor:
        return (a + b) / 2


@BASELINES.register("maximum")
class MaximumFuser(Fuser):
    """``F = max(A, B)`` per pixel."""

    name = "maximum"

    def fuse(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.maximum(a, b)


_BINOMIAL5 = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)
_BINOMIAL5_X2 = tuple(2.0 * k for k in _BINOMIAL5)


def _reduce(x: Tensor) -> Tensor:
    """Burt-Adelson REDUCE: 5-tap binomial blur, keep even rows/columns (odd sizes round up)."""
    return separable_filter(x, _BINOMIAL5, _BINOMIAL5, "replicate")[..., ::2, ::2]


def _expand(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Burt-Adelson EXPAND to ``size``: zero insertion, then the binomial blur with gain 4.

    The zero-inserted image is reflected at its border so every output pixel sees kernel
    weights summing to one (needs both sides >= 3, which the level count guarantees).
    """
    up = x.new_zeros(*x.shape[:2], *size)
    up[..., ::2, ::2] = x
    return separable_filter(up, _BINOMIAL5_X2, _BINOMIAL5_X2, "reflect")


@BASELINES.register("lp")
class LaplacianPyramidFuser(Fuser):
    """Laplacian pyramid fusion (Burt & Adelson 1983; Burt & Kolczynski 1993 selection).

    Both sources get a Gaussian/Laplacian pyramid (5-tap binomial REDUCE/EXPAND). On each
    detail level the coefficient of the source with the larger activity, the mean absolute
    coefficient over a (2r+1)^2 window (``activity_radius``), is kept (ties go to A); the
    base (coarsest Gaussian level) is averaged. The number of REDUCE steps is the largest
    keeping the coarsest level's shorter side >= ``min_size`` (capped by ``levels`` when
    given); images whose shorter side is below 2 * ``min_size`` - 1 have no detail levels
    and are averaged. Equal inputs are reconstructed exactly (up to float rounding).
    """

    name = "lp"

    def __init__(self, levels: int | None = None, min_size: int = 8, activity_radius: int = 1) -> None:
        super().__init__()
        if min_size < 3:
            raise UserError(f"lp min_size must be >= 3, got {min_size}")
        if levels is not None and levels < 0:
            raise UserError(f"lp levels must be >= 0, got {levels}")
        self.levels = levels
        self.min_size = min_size
        self.activity_radius = activity_radius

    def num_levels(self, height: int, width: int) -> int:
        """Number of REDUCE steps (detail levels) used for an image of this size."""
        n = 0
        side = min(height, width)
        while math.ceil(side / 2) >= self.min_size and (self.levels is None or n < self.levels):
            side = math.ceil(side / 2)
            n += 1
        return n

    def fuse(self, a: Tensor, b: Tensor) -> Tensor:
        n = a.shape[0]
        g = torch.cat([a, b])  # both sources in one batch
        details: list[Tensor] = []
        for _ in range(self.num_levels(*a.shape[-2:])):
            coarse = _reduce(g)
            details.append(g - _expand(coarse, g.shape[-2:]))
            g = coarse
        fused = (g[:n] + g[n:]) / 2
        for lap in reversed(details):
            activity = box_mean(lap.abs(), self.activity_radius)
            fused_detail = torch.where(activity[:n] >= activity[n:], lap[:n], lap[n:])
            fused = fused_detail + _expand(fused, lap.shape[-2:])
        return fused


@BASELINES.register("gff")
class GuidedFilterFuser(Fuser):
    """Guided-filtering-based fusion, GFF (Li, Kang, Hu, IEEE TIP 22(7), 2013).

    1. Two-scale decomposition: base ``B_n = mean_31x31(I_n)`` (replicate border), detail
       ``D_n = I_n - B_n``.
    2. Saliency ``S_n = gauss_11x11,sigma=5(|lap(I_n)|)`` with the 4-neighbour Laplacian.
    3. Weight maps ``P_n = [S_n == max(S_1, S_2)]`` (ties go to A).
    4. Refinement ``W^B_n = GF(I_n, P_n; r1=45, eps1=0.3)``, ``W^D_n = GF(I_n, P_n; r2=7,
       eps2=1e-6)``, each clipped to [0, 1] and normalized to sum to one per pixel.
    5. ``F = sum_n W^B_n B_n + W^D_n D_n``.
    """

    name = "gff"

    def __init__(
        self,
        r1: int = 45,
        eps1: float = 0.3,
        r2: int = 7,
        eps2: float = 1e-6,
        base_size: int = 31,
        saliency_size: int = 11,
        saliency_sigma: float = 5.0,
    ) -> None:
        super().__init__()
        if base_size % 2 == 0 or saliency_size % 2 == 0:
            raise UserError("gff base_size and saliency_size must be odd")
        self.r1, self.eps1, self.r2, self.eps2 = r1, eps1, r2, eps2
        self.base_size = base_size
        self.saliency_size, self.saliency_sigma = saliency_size, saliency_sigma

    def fuse(self, a: Tensor, b: Tensor) -> Tensor:
        n = a.shape[0]
        images = torch.cat([a, b])
        base = box_mean(images, self.base_size // 2, "replicate")
        detail = images - base
        saliency = gaussian_filter(laplacian(images).abs(), self.saliency_size, self.saliency_sigma)
        pick_a = (saliency[:n] >= saliency[n:]).to(images.dtype)
        masks = torch.cat([pick_a, 1.0 - pick_a])
        w_base = self._weights(images, masks, self.r1, self.eps1)
        w_detail = self._weights(images, masks, self.r2, self.eps2)
        fused = w_base * base + w_detail * detail
        return fused[:n] + fused[n:]

    @staticmethod
    def _weights(images: Tensor, masks: Tensor, radius: int, eps: float) -> Tensor:
        """Guided-filter the masks, clip to [0, 1], normalize over the two sources."""
        n = images.shape[0] // 2
        w = guided_filter(images, masks, radius, eps).clamp(0.0, 1.0) + 1e-12
        return w / (w[:n] + w[n:]).repeat(2, 1, 1, 1)
