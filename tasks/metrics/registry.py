"""Metric registry: every fusion-quality metric, keyed by definition and name.

A metric is a function ``fn(a, b, fused) -> Tensor[N]`` over float64 tensors shaped
(N, C, H, W) on 0..255, ``a`` the first source (ir / mri / under / near) and ``b`` the
second (vis / ct|pet|spect / over / far). Definitions are the two MATLAB evaluation
codes that published tables rely on (see ../shared/metrics/README.md):

- ``tang``: Linfeng-Tang/Evaluation-for-Image-Fusion, on single-channel images (colour
  inputs are converted with MATLAB ``rgb2gray`` and rounded, as that code does);
- ``vifb``: the VIFB benchmark's code, which keeps colour (``colour=True``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from timfusion.platform.registry import Registry

MetricFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    definition: str
    fn: MetricFn
    higher_is_better: bool
    colour: bool

    @property
    def key(self) -> str:
        return f"{self.definition}.{self.name}"


METRICS: Registry[MetricSpec] = Registry("metric")

# The default set (and column order) of each definition; others are registered extras.
DEFAULT_METRICS: dict[str, list[str]] = {
    "tang": [
        "EN", "SD", "SF", "AG", "MI", "VIF", "Qabf", "Nabf", "CC", "SCD", "MSE", "PSNR",
        "SSIM", "MS_SSIM", "FMI_edge", "FMI_dct", "FMI_pixel",
    ],
    "vifb": ["EN", "SD", "SF", "AG", "MI", "CE", "EI", "PSNR", "RMSE", "SSIM", "Qabf", "Qcb", "Qcv"],
}


def register_metric(
    name: str, definition: str, higher_is_better: bool = True, colour: bool = False
) -> Callable[[MetricFn], MetricFn]:
    """Decorator registering ``fn`` as metric ``name`` of ``definition``."""

    def decorate(fn: MetricFn) -> MetricFn:
        spec = MetricSpec(name, definition, fn, higher_is_better, colour)
        METRICS.register(spec.key)(spec)
        return fn

    return decorate
