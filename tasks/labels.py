"""Downstream-task labels: segmentation maps and detection boxes, as class maps.

Task guidance needs a per-pixel class map whatever the label format, so every reader ends
in :func:`read_label`, which dispatches on the file suffix:

- ``.png`` (also ``.bmp``, ``.tif``, ``.tiff``): a segmentation map (MSRS / FMB style):
  an index image (mode L, I;16 or P: palette images give their indices, not colours).
- ``.txt``: YOLO boxes, one ``class cx cy w h`` per line, normalised to 0..1.
- ``.xml``: Pascal VOC boxes (``<object><name>`` + ``<bndbox>``), in pixels.

Boxes become a mask with :func:`boxes_to_mask`. Class ids: YOLO classes are 0-based, so
class ``k`` becomes mask class ``k + 1`` (0 stays background); for MSRS (``0 person,
1 bicycle, 2 car``) that gives 1 person, 2 bicycle, 3 car, the ids of
:data:`MSRS_CLASS_IDS`. VOC class names go through ``class_ids`` (default
:data:`MSRS_CLASS_IDS`, which also covers LLVIP's single ``person`` class). The synthetic
IR/VIS generator uses the same ids.

Malformed files raise :class:`~timfusion.platform.errors.UserError` naming the file and line.
"""

from __future__ import annotations

import io
import math
import os
import xml.parsers.expat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from timfusion.platform.errors import UserError
from timfusion.tasks.imageio import read_bytes

__all__ = [
    "Box",
    "MSRS_CLASS_IDS",
    "SEGMENTATION_SUFFIXES",
    "boxes_to_mask",
    "read_label",
    "read_segmentation",
    "read_voc",
    "read_yolo",
]

MSRS_CLASS_IDS: dict[str, int] = {"person": 1, "bicycle": 2, "car": 3}
"""Mask class ids of named boxes (0 is background); YOLO class k maps to k + 1 = these."""

SEGMENTATION_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")

# Tolerance on YOLO's normalised numbers: annotation tools round boxes at the border
# slightly past 0 or 1; anything further out means pixels were written, not fractions.
_YOLO_SLACK = 0.02


@dataclass(frozen=True)
class Box:
    """One detection box in pixel coordinates: ``x0 <= x1`` and ``y0 <= y1`` are pixel edges.

    ``cls`` is the integer class of YOLO files (0-based) or the class name of VOC files.
    """

    cls: int | str
    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def area(self) -> float:
        return max(self.x1 - self.x0, 0.0) * max(self.y1 - self.y0, 0.0)


def _decode_text(path: str | os.PathLike) -> str:
    raw = read_bytes(path)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text label file") from None


def read_segmentation(path: str | os.PathLike) -> np.ndarray:
    """A segmentation class map from an index image: uint8, or int64 for 16-bit maps.

    Palette (P) images give their palette indices. RGB files are accepted only when their
    three channels are equal (an index map saved as RGB); a colour visualisation has no
    defined class order and is refused.
    """
    raw = read_bytes(path)
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            mode = image.mode
            if mode in ("P", "PA"):
                data = np.asarray(image.getchannel(0) if mode == "PA" else image)
            elif mode in ("1", "L", "LA"):
                data = np.asarray(image.getchannel(0)).astype(np.uint8)
            elif mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
                data = np.asarray(image).astype(np.int64)
            elif mode in ("RGB", "RGBA"):
                rgb = np.asarray(image.convert("RGB"))
                grey = np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
                if not grey:
                    raise UserError(
                        f"{path}: a colour ({mode}) image; expected a class-index map (mode L, I;16 or P)"
                    )
                data = rgb[..., 0].copy()
            else:
                raise UserError(f"{path}: image mode {mode} is not a class-index map (expected L, I;16 or P)")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{path}: not a readable label image ({err.__class__.__name__})") from None
    if data.dtype == np.int64:
        if data.min() < 0:
            raise UserError(f"{path}: negative class ids in the label image")
        if data.max() <= 255:
            data = data.astype(np.uint8)
    return np.ascontiguousarray(data)


def read_yolo(path: str | os.PathLike, width: int, height: int) -> list[Box]:
    """YOLO boxes (``class cx cy w h`` per line, normalised) scaled to a ``width`` x ``height`` image.

    Blank lines are skipped; an empty file means no objects. Class ids must be
    non-negative integers and the four numbers finite fractions (a small slack past 0..1
    is allowed for rounding); anything else is a UserError naming the file and line.
    """
    _check_size(width, height)
    boxes = []
    for number, line in enumerate(_decode_text(path).splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{number}"
        if len(fields) != 5:
            raise UserError(
                f"{where}: expected 5 fields 'class cx cy w h', got {len(fields)}: {line.strip()!r}"
            )
        try:
            cls = int(fields[0])
        except ValueError:
            raise UserError(f"{where}: class {fields[0]!r} is not an integer") from None
        if cls < 0:
            raise UserError(f"{where}: class {cls} is negative")
        try:
            cx, cy, bw, bh = (float(f) for f in fields[1:])
        except ValueError:
            numbers = " ".join(fields[1:])
            raise UserError(f"{where}: expected numbers for cx cy w h, got {numbers!r}") from None
        values = (cx, cy, bw, bh)
        if not all(math.isfinite(v) for v in values):
            raise UserError(f"{where}: non-finite box value in {line.strip()!r}")
        if bw < 0 or bh < 0:
            raise UserError(f"{where}: negative box size in {line.strip()!r}")
        if not all(-_YOLO_SLACK <= v <= 1 + _YOLO_SLACK for v in values):
            raise UserError(
                f"{where}: expected normalised 0..1 values (pixels written?), got {line.strip()!r}"
            )
        boxes.append(Box(cls, (cx - bw / 2) * width, (cy - bh / 2) * height,
                         (cx + bw / 2) * width, (cy + bh / 2) * height))
    return boxes


class _Node:
    """An XML element with the line it starts on (ElementTree keeps no line numbers)."""

    __slots__ = ("tag", "line", "children", "text")

    def __init__(self, tag: str, line: int) -> None:
        self.tag, self.line = tag, line
        self.children: list[_Node] = []
        self.text = ""

    def find(self, tag: str) -> _Node | None:
        return next((c for c in self.children if c.tag == tag), None)


def _parse_xml(path: str | os.PathLike) -> _Node:
    parser = xml.parsers.expat.ParserCreate()
    root = _Node("", 0)
    stack = [root]

    def start(tag: str, _attrs: dict) -> None:
        node = _Node(tag, parser.CurrentLineNumber)
        stack[-1].children.append(node)
        stack.append(node)

    def end(_tag: str) -> None:
        stack.pop()

    def text(data: str) -> None:
        stack[-1].text += data

    parser.StartElementHandler, parser.EndElementHandler = start, end
    parser.CharacterDataHandler = text
    try:
        parser.Parse(read_bytes(path), True)
    except xml.parsers.expat.ExpatError as err:
        reason = xml.parsers.expat.errors.messages[err.code]
        raise UserError(f"{path}:{err.lineno}: malformed XML ({reason})") from None
    if not root.children:
        raise UserError(f"{path}: empty XML document")
    return root.children[0]


def read_voc(path: str | os.PathLike) -> list[Box]:
    """Pascal VOC boxes: one :class:`Box` per ``<object>``, ``cls`` its ``<name>``.

    ``xmin ymin xmax ymax`` are taken as the box's pixel edges as written (VOC's 1-based
    convention is below the precision of hand-drawn boxes). A missing or non-numeric
    field, or xmax < xmin, is a UserError naming the file and line.
    """
    root = _parse_xml(path)
    if root.tag != "annotation":
        raise UserError(f"{path}:{root.line}: expected a Pascal VOC <annotation>, got <{root.tag}>")
    boxes = []
    for obj in (c for c in root.children if c.tag == "object"):
        name = obj.find("name")
        if name is None or not name.text.strip():
            raise UserError(f"{path}:{obj.line}: <object> without a <name>")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise UserError(f"{path}:{obj.line}: <object> {name.text.strip()!r} without a <bndbox>")
        coords = []
        for key in ("xmin", "ymin", "xmax", "ymax"):
            node = bndbox.find(key)
            if node is None:
                raise UserError(f"{path}:{bndbox.line}: <bndbox> without <{key}>")
            try:
                value = float(node.text.strip())
            except ValueError:
                text = node.text.strip()
                raise UserError(f"{path}:{node.line}: <{key}> is not a number: {text!r}") from None
            if not math.isfinite(value):
                raise UserError(f"{path}:{node.line}: <{key}> is not finite")
            coords.append(value)
        x0, y0, x1, y1 = coords
        if x1 < x0 or y1 < y0:
            raise UserError(f"{path}:{bndbox.line}: box has xmax < xmin or ymax < ymin: {coords}")
        boxes.append(Box(name.text.strip(), x0, y0, x1, y1))
    return boxes


def _check_size(width: int, height: int) -> None:
    if int(width) != width or int(height) != height or width < 1 or height < 1:
        raise UserError(f"image size: expected positive integers width, height; got {width!r}, {height!r}")


def _class_id(cls: int | str, class_ids: dict[str, int]) -> int:
    if isinstance(cls, str):
        if cls not in class_ids:
            raise UserError(f"box class {cls!r} has no mask id; known: {', '.join(sorted(class_ids))}")
        return int(class_ids[cls])
    return int(cls) + 1


def boxes_to_mask(
    boxes: list[Box], height: int, width: int, class_ids: dict[str, int] | None = None
) -> np.ndarray:
    """Rasterize boxes into an (height, width) class map; 0 is background.

    Integer classes (YOLO, 0-based) become ``cls + 1``; named classes go through
    ``class_ids`` (default :data:`MSRS_CLASS_IDS`). A pixel belongs to a box when its
    centre lies inside it; a box thinner than a pixel still gets one row/column, so no
    object vanishes. Overlaps: boxes are drawn largest first, so smaller boxes (usually
    the farther, partly occluded objects) stay visible; among equal areas the later box
    in the list is drawn over the earlier one. Boxes are clipped to the image. The map is
    uint8, or int64 when a class id exceeds 255.
    """
    _check_size(width, height)
    ids = MSRS_CLASS_IDS if class_ids is None else class_ids
    classes = [_class_id(box.cls, ids) for box in boxes]
    dtype = np.uint8 if max(classes, default=0) <= 255 else np.int64
    mask = np.zeros((height, width), dtype)
    order = sorted(range(len(boxes)), key=lambda i: -boxes[i].area)  # stable: ties keep file order
    for i in order:
        box = boxes[i]
        c0, c1 = _pixel_span(box.x0, box.x1, width)
        r0, r1 = _pixel_span(box.y0, box.y1, height)
        if c0 < c1 and r0 < r1:
            mask[r0:r1, c0:c1] = classes[i]
    return mask


def _pixel_span(lo: float, hi: float, size: int) -> tuple[int, int]:
    """Indices of the pixels whose centres lie in [lo, hi); if none, the pixel holding the middle."""
    first, stop = math.ceil(lo - 0.5), math.ceil(hi - 0.5)
    if stop <= first and hi > 0 and lo < size:
        first = math.floor((lo + hi) / 2)
        stop = first + 1
    return max(first, 0), min(stop, size)


def read_label(path: str | os.PathLike, width: int, height: int) -> np.ndarray:
    """The class map of a label file for a ``width`` x ``height`` image, by suffix (see module doc)."""
    suffix = Path(str(path)).suffix.lower()
    if suffix in SEGMENTATION_SUFFIXES:
        _check_size(width, height)
        mask = read_segmentation(path)
        if mask.shape != (height, width):
            raise UserError(
                f"{path}: label map is {mask.shape[1]}x{mask.shape[0]}, the image is {width}x{height}"
            )
        return mask
    if suffix == ".txt":
        return boxes_to_mask(read_yolo(path, width, height), height, width)
    if suffix == ".xml":
        return boxes_to_mask(read_voc(path), height, width)
    raise UserError(
        f"{path}: unknown label format {suffix or '(no suffix)'!r}; expected "
        f"{', '.join(SEGMENTATION_SUFFIXES)} (segmentation), .txt (YOLO) or .xml (Pascal VOC)"
    )
