"""Fusion-quality metrics matching the reference MATLAB evaluation codes.

``score_batch`` is the one entry point from images as read from disk: it applies each
definition's colour handling (``tang``: MATLAB ``rgb2gray`` with uint8 rounding, as the
reference code does on colour inputs; ``vifb``: images as stored) and runs the metrics.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from timfusion.platform.errors import UserError
from timfusion.tasks.colour import rgb_to_gray
from timfusion.tasks.metrics.registry import DEFAULT_METRICS, METRICS, MetricSpec, register_metric

__all__ = [
    "DEFAULT_METRICS", "METRICS", "MetricSpec", "definitions", "load_builtin", "register_metric",
    "resolve_metrics", "score_batch",
]


def load_builtin() -> None:
    """Import the built-in definitions so their metrics are registered."""
    from timfusion.tasks.metrics import tang, vifb  # noqa: F401


def definitions() -> list[str]:
    load_builtin()
    return sorted({spec.definition for _, spec in METRICS.items()})


def resolve_metrics(
    definition: str, names: list[str] | None = None, key: str = "metrics"
) -> list[MetricSpec]:
    """The metric specs to compute: ``names`` (in that order) or the definition's default set;
    errors name the setting ``key`` the names came from."""
    if definition not in definitions():
        raise UserError(f"definition={definition}: unknown; valid choices: {', '.join(definitions())}")
    known = [key.split(".", 1)[1] for key in METRICS.names() if key.startswith(definition + ".")]
    wanted = list(names) if names else DEFAULT_METRICS[definition]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise UserError(
            f"{key}: unknown {definition} metric(s) {', '.join(unknown)}; valid: {', '.join(sorted(known))}"
        )
    return [METRICS.get(f"{definition}.{n}") for n in wanted]


def _as_tensor(images: list[np.ndarray], colour: bool, device: torch.device | str) -> Tensor:
    planes = []
    for image in images:
        if not colour:
            image = rgb_to_gray(image, round_uint8=True)
        planes.append(image[None] if image.ndim == 2 else np.moveaxis(image, -1, 0))
    return torch.from_numpy(np.stack(planes).astype(np.float64)).to(device)


def score_batch(
    a: list[np.ndarray],
    b: list[np.ndarray],
    fused: list[np.ndarray],
    specs: list[MetricSpec],
    device: torch.device | str = "cpu",
    key: str = "metrics",
) -> dict[str, np.ndarray]:
    """Metric values for same-size images on 0..255 as read from disk: name -> (N,) array;
    errors name the setting ``key`` the specs came from."""
    shapes = {img.shape[:2] for img in (*a, *b, *fused)}
    if len(shapes) != 1:
        raise UserError(f"score_batch needs images of one size, got {sorted(shapes)}")
    results: dict[str, np.ndarray] = {}
    tensors: dict[bool, tuple[Tensor, Tensor, Tensor]] = {}
    for spec in specs:
        if spec.colour not in tensors:
            tensors[spec.colour] = tuple(_as_tensor(group, spec.colour, device) for group in (a, b, fused))
        ta, tb, tf = tensors[spec.colour]
        try:
            with torch.no_grad():
                results[spec.name] = spec.fn(ta, tb, tf).detach().cpu().numpy().astype(np.float64)
        except ValueError as err:  # a kernel larger than the image (VIF's coarsest scale on small images)
            height, width = shapes.pop()
            raise UserError(f"{spec.name} cannot score {height}x{width} images: {err}; leave it out "
                            f"({key}=[...]) or score larger images") from None
    return results


def check_scorable(specs: list[MetricSpec], height: int, width: int, key: str = "metrics") -> None:
    """Raise, before any work, the UserError :func:`score_batch` would raise on height x width
    images (VIF's coarsest scale needs 41 px). Every metric's windows are square, so of a
    set of images, the one with the shortest side fails first."""
    noise = np.random.default_rng(0).uniform(0, 255, (3, height, width))
    score_batch([noise[0]], [noise[1]], [noise[2]], specs, key=key)
