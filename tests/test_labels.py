"""Label readers: segmentation PNGs, YOLO and Pascal VOC boxes, and their class masks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from timfusion.platform.errors import UserError
from timfusion.tasks.labels import (
    MSRS_CLASS_IDS,
    Box,
    boxes_to_mask,
    read_label,
    read_segmentation,
    read_voc,
    read_yolo,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TIMFUSION_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"
skip_without_shared = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"shared data not found at {DATA} (set TIMFUSION_SHARED)"
)

MSRS_FILES = sorted((DATA / "msrs" / "labels_det" / "fusion").glob("*.txt")) if DATA.is_dir() else []
VOC_FILES = sorted((DATA / "llvip" / "labels").glob("*.xml")) if DATA.is_dir() else []


# --------------------------------------------------------------------------------------
# Real files
# --------------------------------------------------------------------------------------


@pytest.mark.shared
@skip_without_shared
def test_msrs_yolo_files() -> None:
    assert len(MSRS_FILES) >= 30
    seen = set()
    for path in MSRS_FILES:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        boxes = read_yolo(path, 640, 480)
        assert len(boxes) == len(lines)
        for box in boxes:
            assert box.cls in (0, 1, 2)
            assert -1 <= box.x0 < box.x1 <= 641 and -1 <= box.y0 < box.y1 <= 481
        mask = read_label(path, 640, 480)
        assert mask.shape == (480, 640) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1, 2, 3}
        assert (mask > 0).any() == bool(boxes)
        seen |= {b.cls for b in boxes}
    assert seen == {0, 1, 2}


@pytest.mark.shared
@skip_without_shared
def test_msrs_yolo_known_box() -> None:
    # first line of 00004N.txt: "0  0.8360721982758621  0.5727370689655172  0.0821659...  0.3035201..."
    box = read_yolo(DATA / "msrs" / "labels_det" / "fusion" / "00004N.txt", 640, 480)[0]
    assert box.cls == 0
    assert box.x0 == pytest.approx((0.8360721982758621 - 0.08216594827586218 / 2) * 640)
    assert box.y1 == pytest.approx((0.5727370689655172 + 0.3035201149425288 / 2) * 480)
    mask = read_label(DATA / "msrs" / "labels_det" / "fusion" / "00004N.txt", 640, 480)
    assert mask[int((box.y0 + box.y1) / 2), int((box.x0 + box.x1) / 2)] == MSRS_CLASS_IDS["person"]


@pytest.mark.shared
@skip_without_shared
def test_llvip_voc_files() -> None:
    assert VOC_FILES
    for path in VOC_FILES:
        boxes = read_voc(path)
        assert boxes and all(box.cls == "person" for box in boxes)
        mask = read_label(path, 1280, 1024)
        assert set(np.unique(mask)) == {0, 1}
    first = read_voc(DATA / "llvip" / "labels" / "010005.xml")[0]
    assert first == Box("person", 849.0, 405.0, 961.0, 663.0)
    mask = read_label(DATA / "llvip" / "labels" / "010005.xml", 1280, 1024)
    assert mask[405:663, 849:961].all()


# --------------------------------------------------------------------------------------
# boxes_to_mask
# --------------------------------------------------------------------------------------


def test_box_covers_pixels_whose_centres_are_inside() -> None:
    mask = boxes_to_mask([Box(0, 2.0, 3.0, 6.0, 8.0)], height=10, width=10)
    expected = np.zeros((10, 10), np.uint8)
    expected[3:8, 2:6] = 1
    np.testing.assert_array_equal(mask, expected)
    # half-pixel edges: centres at 2.5 .. 5.5 are inside [2.4, 5.6)
    mask = boxes_to_mask([Box(0, 2.4, 2.4, 5.6, 5.6)], height=8, width=8)
    assert mask.sum() == 16 and mask[2:6, 2:6].all()


def test_tiny_box_keeps_one_pixel_and_outside_boxes_are_clipped() -> None:
    mask = boxes_to_mask([Box(1, 3.6, 4.1, 3.9, 4.3)], height=8, width=8)
    assert mask.sum() == 2 and mask[4, 3] == 2
    mask = boxes_to_mask([Box(0, -5, -5, 3, 3), Box(0, 20, 20, 30, 30), Box(0, 6, 6, 50, 50)], 8, 8)
    assert mask[:3, :3].all() and mask[6:, 6:].all() and mask.sum() == 9 + 4


def test_smaller_boxes_drawn_last_and_ties_go_to_the_later_box() -> None:
    big, small = Box(2, 0, 0, 10, 10), Box(0, 3, 3, 5, 5)
    for boxes in ([big, small], [small, big]):
        mask = boxes_to_mask(boxes, 10, 10)
        assert mask[4, 4] == 1 and mask[0, 0] == 3
    first, second = Box(0, 0, 0, 4, 4), Box(1, 2, 2, 6, 6)
    assert boxes_to_mask([first, second], 8, 8)[3, 3] == 2
    assert boxes_to_mask([second, first], 8, 8)[3, 3] == 1


def test_class_mapping() -> None:
    boxes = [Box("person", 0, 0, 2, 2), Box("car", 2, 0, 4, 2), Box("bicycle", 4, 0, 6, 2),
             Box(2, 6, 0, 8, 2)]
    mask = boxes_to_mask(boxes, 2, 8)
    assert mask[0].tolist() == [1, 1, 3, 3, 2, 2, 3, 3]
    custom = boxes_to_mask([Box("dog", 0, 0, 2, 2)], 2, 2, class_ids={"dog": 7})
    assert (custom == 7).all()
    with pytest.raises(UserError, match="'dog'.*known: bicycle, car, person"):
        boxes_to_mask([Box("dog", 0, 0, 2, 2)], 2, 2)
    wide = boxes_to_mask([Box(299, 0, 0, 1, 1)], 2, 2)
    assert wide.dtype == np.int64 and wide[0, 0] == 300
    assert boxes_to_mask([], 3, 4).shape == (3, 4)


# --------------------------------------------------------------------------------------
# Segmentation images and dispatch
# --------------------------------------------------------------------------------------


def test_read_segmentation_modes(tmp_path: Path) -> None:
    classes = np.array([[0, 1, 2], [3, 8, 0]], np.uint8)
    Image.fromarray(classes, mode="L").save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_segmentation(tmp_path / "l.png"), classes)

    palette = Image.fromarray(classes, mode="P")
    palette.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [200] * (256 * 3 - 12))
    palette.save(tmp_path / "p.png")
    seg = read_segmentation(tmp_path / "p.png")
    assert seg.dtype == np.uint8
    np.testing.assert_array_equal(seg, classes)  # indices, not colours

    wide = np.array([[0, 300], [1000, 2]], np.uint16)
    Image.fromarray(wide).save(tmp_path / "i16.png")
    seg = read_segmentation(tmp_path / "i16.png")
    assert seg.dtype == np.int64
    np.testing.assert_array_equal(seg, wide)

    Image.fromarray(np.stack([classes] * 3, -1)).save(tmp_path / "grey_rgb.png")
    np.testing.assert_array_equal(read_segmentation(tmp_path / "grey_rgb.png"), classes)

    colour = np.zeros((2, 3, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(UserError, match=r"colour\.png: a colour"):
        read_segmentation(tmp_path / "colour.png")


def test_read_label_dispatch_and_errors(tmp_path: Path) -> None:
    Image.fromarray(np.ones((4, 6), np.uint8)).save(tmp_path / "seg.png")
    assert read_label(tmp_path / "seg.png", 6, 4).shape == (4, 6)
    with pytest.raises(UserError, match=r"seg\.png: label map is 6x4, the image is 4x6"):
        read_label(tmp_path / "seg.png", 4, 6)
    (tmp_path / "boxes.txt").write_text("2 0.5 0.5 0.5 0.5\n\n")
    mask = read_label(tmp_path / "boxes.txt", 8, 4)
    assert mask.sum() == 3 * 8 and mask[1:3, 2:6].all()
    (tmp_path / "label.json").write_text("{}")
    with pytest.raises(UserError, match=r"label\.json: unknown label format '\.json'"):
        read_label(tmp_path / "label.json", 8, 4)
    with pytest.raises(UserError, match="no such file"):
        read_label(tmp_path / "missing.txt", 8, 4)
    (tmp_path / "empty.txt").write_text("")
    assert not read_label(tmp_path / "empty.txt", 8, 4).any()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"broken\.png: not a readable label image"):
        read_label(tmp_path / "broken.png", 8, 4)


# --------------------------------------------------------------------------------------
# Malformed files
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0 0.5 0.5 0.1 0.1\n0 0.5 0.5 0.1\n", r"bad\.txt:2: expected 5 fields"),
        ("person 0.5 0.5 0.1 0.1\n", r"bad\.txt:1: class 'person' is not an integer"),
        ("\n-1 0.5 0.5 0.1 0.1\n", r"bad\.txt:2: class -1 is negative"),
        ("0 0.5 x 0.1 0.1\n", r"bad\.txt:1: expected numbers"),
        ("0 0.5 nan 0.1 0.1\n", r"bad\.txt:1: non-finite"),
        ("0 0.5 0.5 -0.1 0.1\n", r"bad\.txt:1: negative box size"),
        ("0 320 240 20 40\n", r"bad\.txt:1: expected normalised 0\.\.1 values"),
    ],
)
def test_malformed_yolo(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "bad.txt").write_text(text)
    with pytest.raises(UserError, match=message):
        read_yolo(tmp_path / "bad.txt", 640, 480)


VOC_OK = """<annotation>
  <size><width>8</width><height>4</height></size>
  <object>
    <name>person</name>
    <bndbox><xmin>1</xmin><ymin>0</ymin><xmax>3</xmax><ymax>2</ymax></bndbox>
  </object>
  <object>
    <name>car</name>
    <bndbox><xmin>4.5</xmin><ymin>1</ymin><xmax>8</xmax><ymax>4</ymax></bndbox>
  </object>
</annotation>
"""


def test_voc_parses_names_and_floats(tmp_path: Path) -> None:
    (tmp_path / "ok.xml").write_text(VOC_OK)
    assert read_voc(tmp_path / "ok.xml") == [Box("person", 1, 0, 3, 2), Box("car", 4.5, 1, 8, 4)]
    mask = read_label(tmp_path / "ok.xml", 8, 4)
    assert mask[0, 1] == 1 and mask[3, 7] == 3 and mask[0, 0] == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<annotation>\n<object>\n<name>person</name>\n</annotation>\n", r"bad\.xml:4: malformed XML"),
        ("", r"bad\.xml:1: malformed XML"),
        ("<root/>", r"bad\.xml:1: expected a Pascal VOC <annotation>"),
        (
            "<annotation>\n  <object>\n    <bndbox/>\n  </object>\n</annotation>",
            r"bad\.xml:2: <object> without a <name>",
        ),
        (
            "<annotation>\n<object><name>p</name></object>\n</annotation>",
            r"bad\.xml:2: <object> 'p' without a <bndbox>",
        ),
        (
            "<annotation><object><name>p</name>\n<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>2</xmax></bndbox>"
            "</object></annotation>",
            r"bad\.xml:2: <bndbox> without <ymax>",
        ),
        (
            "<annotation><object><name>p</name><bndbox>\n<xmin>1</xmin>\n<ymin>one</ymin><xmax>2</xmax>"
            "<ymax>2</ymax></bndbox></object></annotation>",
            r"bad\.xml:3: <ymin> is not a number",
        ),
        (
            "<annotation><object><name>p</name>\n\n<bndbox><xmin>5</xmin><ymin>1</ymin><xmax>2</xmax>"
            "<ymax>2</ymax></bndbox></object></annotation>",
            r"bad\.xml:3: box has xmax < xmin",
        ),
    ],
)
def test_malformed_voc(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "bad.xml").write_text(text)
    with pytest.raises(UserError, match=message):
        read_voc(tmp_path / "bad.xml")
