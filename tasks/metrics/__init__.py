"""Fusion-quality metrics matching the reference MATLAB evaluation codes."""

from timfusion.tasks.metrics.registry import (  # noqa: F401
    DEFAULT_METRICS,
    METRICS,
    MetricSpec,
    register_metric,
)
