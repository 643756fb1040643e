"""Genotypes: the discrete description of a fusion network, stored as JSON.

A genotype fixes

* ``width`` C (the feature channels of every cell) and ``stem_hidden`` (the stem is
  ``conv3x3 2 -> stem_hidden -> C``; the published stems use 2C),
* ``stage1``: its cells (``type`` + op ``names`` per position) and its ``head``, a
  stack of convolutions down to one channel, each optionally followed by PReLU, with an
  output form: ``none`` (the image itself), ``tanh``, or ``select`` (the one channel is a
  decision logit z and the fused image is ``w a + (1 - w) b`` with ``w = clamp(0.5 + z, 0,
  1)`` (straight-through gradient, :func:`network.decision_weight`): a learned
  per-pixel choice between the sources, which keeps the sources' own pixel values and
  edges where it is decisive); a ``select`` head may add an ``activity`` comparison
  (:class:`network.ActivityDecision`: ``{"channels": 4, "kernel": 3, "window": 23,
  "gain": 12.5}``), whose logit is added to the convolutions',
* an optional ``stage2``: two ``branches``, branch 0 over [source a, stage-1 output] and
  branch 1 over [source b, stage-1 output], each a stem and a list of cells; a ``merge``,
  ``mask`` (IR/VIS: ``m = sigmoid(1x1([max_c f_k, mean_c f_k]))`` of branch ``mask_branch``'s
  features f_k, then ``head(m f_k + (1 - m) f_other)``) or ``concat`` (medical:
  ``head([f_0, f_1])``); the final ``head``; and an optional ``aux_head`` (applied to each
  branch's features for the auxiliary per-branch outputs the public code trains with),
* ``multiple``: the input height/width multiple (inputs are reflect-padded to it).

The named genotypes ship as ``genotypes/<name>.json`` next to this module
(:func:`GENOTYPES` lists them); :func:`load_genotype` takes a name or a path. Every
inconsistency is a :class:`UserError` naming the genotype and the offending place.

JSON layout (keys in brackets are optional)::

    {"name": "...", ["description": "..."], "width": 48, ["stem_hidden": 96], ["multiple": 4],
     "stage1": {"cells": [{"type": "chain", "ops": ["res_3x3", "channel_att"]}, ...],
                "head": {"layers": [{"out": 48, "kernel": 3, "act": "prelu"}, ...], ["output": "none"]}},
     ["stage2": {"branches": [{["label": "ir"], "cells": [...]}, {...}], "merge": "mask",
                 ["mask_branch": 1], "head": {...}, ["aux_head": {...}]}]}
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from timfusion.platform.errors import UserError
from timfusion.search_spaces.cells import CELLS
from timfusion.search_spaces.ops import OPS

GENOTYPE_DIR = Path(__file__).resolve().parent / "genotypes"
MERGES = ("mask", "concat")
HEAD_ACTS = (None, "prelu")
HEAD_OUTPUTS = ("none", "tanh", "select")


@dataclass(frozen=True)
class CellSpec:
    type: str
    ops: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "ops": list(self.ops)}


@dataclass(frozen=True)
class HeadLayer:
    out: int
    kernel: int = 3
    act: str | None = None  # None or "prelu"

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "kernel": self.kernel, "act": self.act}


@dataclass(frozen=True)
class ActivitySpec:
    """A ``select`` head's activity comparison (:class:`network.ActivityDecision`)."""

    channels: int = 4
    kernel: int = 3
    window: int = 23
    gain: float = 12.5

    def to_dict(self) -> dict[str, Any]:
        return {"channels": self.channels, "kernel": self.kernel, "window": self.window, "gain": self.gain}


@dataclass(frozen=True)
class HeadSpec:
    """Convolutions (reflect-padded, with bias) down to one channel, then ``output``."""

    layers: tuple[HeadLayer, ...]
    output: str = "none"  # one of HEAD_OUTPUTS
    activity: ActivitySpec | None = None  # only with output "select"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layers": [layer.to_dict() for layer in self.layers], "output": self.output}
        if self.activity is not None:
            out["activity"] = self.activity.to_dict()
        return out


@dataclass(frozen=True)
class BranchSpec:
    cells: tuple[CellSpec, ...]
    label: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "cells": [c.to_dict() for c in self.cells]}


@dataclass(frozen=True)
class Stage2Spec:
    branches: tuple[BranchSpec, BranchSpec]
    merge: str
    head: HeadSpec
    mask_branch: int = 0
    aux_head: HeadSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "branches": [b.to_dict() for b in self.branches],
            "merge": self.merge,
            "mask_branch": self.mask_branch,
            "head": self.head.to_dict(),
        }
        if self.aux_head is not None:
            out["aux_head"] = self.aux_head.to_dict()
        return out


@dataclass(frozen=True)
class Genotype:
    name: str
    width: int
    stage1: tuple[CellSpec, ...]
    head: HeadSpec
    stage2: Stage2Spec | None = None
    multiple: int = 4
    stem_hidden: int | None = None  # None: 2 * width
    description: str = field(default="", compare=False)

    @property
    def stem_channels(self) -> int:
        return self.stem_hidden if self.stem_hidden is not None else 2 * self.width

    def cells(self) -> list[tuple[str, CellSpec]]:
        """Every cell with its place: ``stage1.cells.0``, ``stage2.branches.1.cells.0``, ..."""
        places = [(f"stage1.cells.{i}", c) for i, c in enumerate(self.stage1)]
        if self.stage2 is not None:
            for b, branch in enumerate(self.stage2.branches):
                places += [(f"stage2.branches.{b}.cells.{i}", c) for i, c in enumerate(branch.cells)]
        return places

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["width"] = self.width
        if self.stem_hidden is not None:
            out["stem_hidden"] = self.stem_hidden
        out.update(
            multiple=self.multiple,
            stage1={"cells": [c.to_dict() for c in self.stage1], "head": self.head.to_dict()},
        )
        if self.stage2 is not None:
            out["stage2"] = self.stage2.to_dict()
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str = "genotype") -> Genotype:
        return _parse(data, source)

    @classmethod
    def from_json(cls, text: str, source: str = "genotype") -> Genotype:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{source}: not valid JSON ({err.msg} at line {err.lineno})") from None
        return _parse(data, source)


# ----------------------------------------------------------------------------- parsing


class _Reader:
    """Typed, key-checked access to one JSON object, errors naming where it is."""

    def __init__(self, data: Any, where: str, allowed: tuple[str, ...]) -> None:
        if not isinstance(data, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise UserError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(allowed)}")
        self.data, self.where = data, where

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., nullable: bool = False) -> Any:
        if key not in self.data:
            if default is ...:
                raise UserError(f"{self.where}: missing key {key!r}")
            return default
        value = self.data[key]
        if value is None and nullable:
            return None
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise UserError(f"{self.where}: {key} must be {names}, got {value!r}")
        return value

    def positive(self, key: str, default: Any = ...) -> int:
        value = self.get(key, int, default)
        if value is not None and value < 1:
            raise UserError(f"{self.where}: {key} must be a positive integer, got {value}")
        return value


def _cell(data: Any, where: str) -> CellSpec:
    r = _Reader(data, where, ("type", "ops"))
    kind = r.get("type", str)
    if kind not in CELLS:
        raise UserError(f"{where}: unknown cell type {kind!r}; known: {', '.join(CELLS.names())}")
    ops = r.get("ops", list)
    if not ops:
        raise UserError(f"{where}: ops must name at least one operation")
    for i, name in enumerate(ops):
        if not isinstance(name, str) or name not in OPS:
            raise UserError(
                f"{where} position {i}: unknown operation {name!r}; known: {', '.join(OPS.names())}"
            )
    return CellSpec(kind, tuple(ops))


def _cells(data: Any, where: str) -> tuple[CellSpec, ...]:
    if not isinstance(data, list) or not data:
        raise UserError(f"{where}: cells must be a non-empty list")
    return tuple(_cell(c, f"{where} cell {i}") for i, c in enumerate(data))


def _odd(reader: _Reader, key: str, default: int) -> int:
    value = reader.positive(key, default)
    if value % 2 == 0:
        raise UserError(f"{reader.where}: {key} must be odd, got {value}")
    return value


def _activity(data: Any, where: str) -> ActivitySpec:
    r = _Reader(data, where, ("channels", "kernel", "window", "gain"))
    gain = r.get("gain", (int, float), ActivitySpec.gain)
    if not gain > 0 or not math.isfinite(gain):
        raise UserError(f"{where}: gain must be a finite number > 0, got {gain}")
    return ActivitySpec(
        r.positive("channels", ActivitySpec.channels), _odd(r, "kernel", ActivitySpec.kernel),
        _odd(r, "window", ActivitySpec.window), float(gain),
    )


def _head(data: Any, where: str) -> HeadSpec:
    r = _Reader(data, where, ("layers", "output", "activity"))
    layers_data = r.get("layers", list)
    output = r.get("output", str, "none")
    if output not in HEAD_OUTPUTS:
        raise UserError(f"{where}: output must be one of {', '.join(HEAD_OUTPUTS)}, got {output!r}")
    if not layers_data:
        raise UserError(f"{where}: layers must be a non-empty list")
    activity = None
    if r.get("activity", dict, None, nullable=True) is not None:
        if output != "select":
            raise UserError(
                f"{where}: activity needs output 'select' (it compares the two sources), got {output!r}"
            )
        activity = _activity(data["activity"], f"{where} activity")
    layers = []
    for i, item in enumerate(layers_data):
        lr = _Reader(item, f"{where} layer {i}", ("out", "kernel", "act"))
        kernel = _odd(lr, "kernel", 3)
        act = lr.get("act", str, None, nullable=True)
        if act not in HEAD_ACTS:
            raise UserError(f"{where} layer {i}: act must be null or 'prelu', got {act!r}")
        layers.append(HeadLayer(lr.positive("out"), kernel, act))
    if layers[-1].out != 1:
        raise UserError(f"{where}: the last layer must have out 1 (one fused channel), got {layers[-1].out}")
    return HeadSpec(tuple(layers), output, activity)


def _aux_head(data: Any, where: str) -> HeadSpec:
    head = _head(data, where)
    if head.output == "select":
        raise UserError(f"{where}: output 'select' needs both sources; an auxiliary head sees one branch")
    return head


def _parse(data: Any, source: str) -> Genotype:
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a JSON object, got {type(data).__name__}")
    name = data.get("name")
    where = f"genotype {name}" if isinstance(name, str) and name else source
    r = _Reader(data, where, ("name", "description", "width", "stem_hidden", "multiple", "stage1", "stage2"))
    name = r.get("name", str)
    width = r.positive("width")
    stem_hidden = r.get("stem_hidden", int, None, nullable=True)
    if stem_hidden is not None and stem_hidden < 1:
        raise UserError(f"{where}: stem_hidden must be a positive integer, got {stem_hidden}")
    multiple = r.positive("multiple", 4)
    s1 = _Reader(r.get("stage1", dict), f"{where} stage1", ("cells", "head"))
    stage1 = _cells(s1.get("cells", list), f"{where} stage1")
    head = _head(s1.get("head", dict), f"{where} stage1 head")
    stage2 = None
    if r.get("stage2", dict, None, nullable=True) is not None:
        s2 = _Reader(
            data["stage2"], f"{where} stage2", ("branches", "merge", "mask_branch", "head", "aux_head")
        )
        branches_data = s2.get("branches", list)
        if len(branches_data) != 2:
            raise UserError(f"{where} stage2: branches must list exactly two branches (sources a and b)")
        branches = []
        for b, item in enumerate(branches_data):
            br = _Reader(item, f"{where} stage2 branch {b}", ("label", "cells"))
            branches.append(
                BranchSpec(
                    _cells(br.get("cells", list), f"{where} stage2 branch {b}"), br.get("label", str, "")
                )
            )
        merge = s2.get("merge", str)
        if merge not in MERGES:
            raise UserError(f"{where} stage2: merge must be one of {', '.join(MERGES)}, got {merge!r}")
        mask_branch = s2.get("mask_branch", int, 0)
        if mask_branch not in (0, 1):
            raise UserError(f"{where} stage2: mask_branch must be 0 or 1, got {mask_branch}")
        aux = s2.get("aux_head", dict, None, nullable=True)
        stage2 = Stage2Spec(
            (branches[0], branches[1]),
            merge,
            _head(s2.get("head", dict), f"{where} stage2 head"),
            mask_branch,
            None if aux is None else _aux_head(aux, f"{where} stage2 aux_head"),
        )
    genotype = Genotype(
        name=name,
        width=width,
        stage1=stage1,
        head=head,
        stage2=stage2,
        multiple=multiple,
        stem_hidden=stem_hidden,
        description=r.get("description", str, ""),
    )
    need = math.lcm(*(CELLS.meta(c.type)["multiple"] for _, c in genotype.cells()))
    if multiple % need:
        raise UserError(f"{where}: multiple {multiple} must be a multiple of {need} (needed by its cells)")
    return genotype


# ----------------------------------------------------------------------------- named genotypes


def GENOTYPES() -> list[str]:  # a function, named like the registries it sits beside
    """The names of the genotypes shipped in ``search_spaces/genotypes/*.json``."""
    return sorted(p.stem for p in GENOTYPE_DIR.glob("*.json"))


def load_genotype(name_or_path: str | os.PathLike | Genotype, key: str = "genotype") -> Genotype:
    """A named genotype (see :func:`GENOTYPES`) or one read from a JSON file; an unknown one is
    an error naming the setting ``key``."""
    if isinstance(name_or_path, Genotype):
        return name_or_path
    text = str(name_or_path)
    named = GENOTYPES()
    if text in named:
        path = GENOTYPE_DIR / f"{text}.json"
    else:
        path = Path(text).expanduser()
        if not path.is_file():
            raise UserError(
                f"{key}={text}: unknown genotype; named genotypes: {', '.join(named)} "
                "(or give the path of a genotype .json file)"
            )
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot be read ({err.__class__.__name__})") from None
    return Genotype.from_json(raw, source=str(path))
