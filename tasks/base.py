"""Fusion tasks: what is fused, how colour is handled, which loss and metrics apply.

A task is a registered ``FusionTask`` subclass (``@TASKS.register("ir_vis")``) holding
what is intrinsic to a kind of fusion (its two source roles, the folder names those roles
go by, its colour rule, its synthetic generator, its downstream label classes), plus a
YAML config under ``tasks/conf/task/NAME.yaml`` holding what users tune (loss weights,
default metrics, datasets). The config names its class (``name: ir_vis``) and is checked
against the class signature before any work starts.

Colour policy (one rule for every task; see ``ColourContext``):
  * every source is reduced to luminance (Y of full-range BT.601 YCbCr; single-channel
    sources as they are) and the fuser sees only the two luminance planes on [0, 1];
  * exactly one colour source (RGB visible image, PET, SPECT): its Cb/Cr are put back
    around the fused Y;
  * two colour sources (multi-exposure, multi-focus): each chroma plane is the average of
    the two sources' chroma weighted by its saturation |C - 128| (the rule of DeepFuse and
    U2Fusion), so the more saturated source dominates and grey stays grey;
  * no colour source: the output is single-channel.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from timfusion.platform.errors import UserError
from timfusion.platform.registry import Registry
from timfusion.tasks.colour import rgb_to_ycbcr, ycbcr_to_rgb


@dataclass
class ColourContext:
    """The chroma put aside while luminance is fused (None where the output is grayscale)."""

    cbcr: np.ndarray | None  # (H, W, 2) on 0..255

    def restore(self, fused_y: np.ndarray) -> np.ndarray:
        """The fused image on 0..255 from its fused luminance on 0..255."""
        if self.cbcr is None:
            return fused_y
        return np.clip(ycbcr_to_rgb(np.concatenate([fused_y[..., None], self.cbcr], axis=-1)), 0, 255)


def split_colour(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, ColourContext]:
    """Luminance of both sources (0..255) and the chroma to restore, per the module's policy."""
    if a.shape[:2] != b.shape[:2]:
        raise UserError(f"sources differ in size: {a.shape[1]}x{a.shape[0]} vs {b.shape[1]}x{b.shape[0]}")
    ycc = [rgb_to_ycbcr(img) if img.ndim == 3 else None for img in (a, b)]
    lum = [img if y is None else y[..., 0] for img, y in zip((a, b), ycc, strict=True)]
    chroma = [None if y is None else y[..., 1:] for y in ycc]
    if chroma[0] is None and chroma[1] is None:
        return lum[0], lum[1], ColourContext(None)
    if chroma[0] is None or chroma[1] is None:
        return lum[0], lum[1], ColourContext(chroma[0] if chroma[1] is None else chroma[1])
    sat_a, sat_b = np.abs(chroma[0] - 128.0), np.abs(chroma[1] - 128.0)
    total = sat_a + sat_b
    safe = np.where(total > 0, total, 1.0)
    mixed = np.where(total > 0, (chroma[0] * sat_a + chroma[1] * sat_b) / safe, 128.0)
    return lum[0], lum[1], ColourContext(mixed)


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset a task knows: a folder (relative to the data root) and manifest filters."""

    path: str
    filter: dict[str, str]
    role: str  # what it is for: train, val, eval


class FusionTask:
    """One kind of image fusion. Subclasses set the class attributes; configs set the rest."""

    name: ClassVar[str]
    family: ClassVar[str]
    roles: ClassVar[tuple[str, str]]
    # Folder names accepted for each role in the folder convention ROOT/<folder>/NAME.
    role_folders: ClassVar[tuple[tuple[str, ...], tuple[str, ...]]]
    synthetic: ClassVar[str]  # generator name in timfusion.tasks.synthetic
    classes: ClassVar[tuple[str, ...]] = ("background",)  # downstream segmentation classes

    def __init__(
        self,
        name: str,
        loss: dict[str, float],
        loss_options: dict[str, dict[str, Any]] | None = None,
        metrics: list[str] | None = None,
        datasets: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        if name != self.name:
            raise UserError(f"task config names {name!r} but builds {self.name!r}")
        self.loss_weights = dict(loss)
        self.loss_options = {k: dict(v) for k, v in (loss_options or {}).items()}
        self.metrics = list(metrics or [])
        self.datasets = {
            key: DatasetSpec(
                path=str(spec["path"]),
                filter={k: str(v) for k, v in (spec.get("filter") or {}).items()},
                role=str(spec.get("role", "eval")),
            )
            for key, spec in (datasets or {}).items()
        }

    def build_loss(self) -> torch.nn.Module:
        """The task's unsupervised fusion loss (``FusionLoss`` over its weighted terms)."""
        from timfusion.tasks.losses import FusionLoss

        return FusionLoss(self.loss_weights, options=self.loss_options)

    def folder_for(self, role_index: int, available: set[str]) -> str | None:
        """Which of a folder-convention root's subfolders holds role ``role_index``."""
        for candidate in self.role_folders[role_index]:
            if candidate in available:
                return candidate
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, roles={self.roles})"


TASKS: Registry[type[FusionTask]] = Registry("task")


def build_task(config: dict[str, Any]) -> FusionTask:
    """Build a task from its config, checking keys against the class signature first."""
    if "name" not in config:
        raise UserError("task config: missing key 'name' (the registered task to build)")
    cls = TASKS.get(str(config["name"]))
    params = inspect.signature(cls.__init__).parameters
    accepted = [p for p in params if p != "self"]
    unknown = sorted(set(config) - set(accepted))
    if unknown:
        raise UserError(f"task config: unknown key(s) {', '.join(unknown)}; "
                        f"expected some of {', '.join(accepted)}")
    missing = [
        p for p, spec in params.items()
        if p != "self" and spec.default is inspect.Parameter.empty and p not in config
    ]
    if missing:
        raise UserError(f"task config {config['name']!r}: missing key(s) {', '.join(missing)}")
    return cls(**config)


def fuse_pair(fuser: torch.nn.Module, a: np.ndarray, b: np.ndarray,
              device: torch.device | str = "cpu") -> np.ndarray:
    """Fuse two 0..255 source images with ``fuser`` under the colour policy; 0..255 result."""
    ya, yb, context = split_colour(a, b)

    def plane(y: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((y / 255.0).astype(np.float32))[None, None].to(device)

    with torch.no_grad():
        fused = fuser(plane(ya), plane(yb))
    fused_y = fused[0, 0].clamp(0, 1).double().cpu().numpy() * 255.0
    return context.restore(fused_y)
