"""Synthetic paired data: every registered generator, and writing data sets with ``synthesize``."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from timfusion.platform.errors import UserError
from timfusion.tasks import synthetic
from timfusion.tasks.colour import luminance
from timfusion.tasks.imageio import read_image, to_uint8
from timfusion.tasks.labels import read_label, read_segmentation
from timfusion.tasks.synthetic import FAMILIES, MANIFEST_COLUMNS, MEDICAL_VARIANTS, SyntheticPair, synthesize

NAMES = FAMILIES.names()
SEEDS = (0, 1, 2)
SIZE = (96, 128)


@functools.cache
def make(name: str, seed: int, size: tuple[int, int] = SIZE) -> SyntheticPair:
    return FAMILIES.get(name)(np.random.default_rng(seed), *size)


def test_registry_has_every_family() -> None:
    assert set(NAMES) >= {"ir_vis", "mri_ct", "mri_pet", "mri_spect", "multi_exposure", "multi_focus"}
    for name in NAMES:
        meta = FAMILIES.meta(name)
        assert len(meta["roles"]) == 2 and meta["roles"][0] != meta["roles"][1]
        assert meta["classes"][0] == "background" and len(meta["classes"]) >= 2


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_per_seed(name: str) -> None:
    first = make(name, 0)
    again = FAMILIES.get(name)(np.random.default_rng(0), *SIZE)
    for field in ("a", "b", "mask"):
        np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
    other = make(name, 1)
    assert not np.array_equal(first.a, other.a)


@pytest.mark.parametrize("size", [SIZE, (64, 200), (33, 17)])
@pytest.mark.parametrize("name", NAMES)
def test_shapes_dtypes_ranges(name: str, size: tuple[int, int]) -> None:
    pair = make(name, 0, size)
    assert pair.roles == tuple(FAMILIES.meta(name)["roles"])
    for image in (pair.a, pair.b):
        assert image.dtype == np.float64
        assert image.shape in (size, (*size, 3))
        assert np.isfinite(image).all()
        assert image.min() >= 0.0 and image.max() <= 255.0
        assert image.std() > 1.0  # not blank
    assert pair.mask.dtype == np.uint8 and pair.mask.shape == size
    assert pair.mask.max() < len(FAMILIES.meta(name)["classes"])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", NAMES)
def test_mask_has_objects_and_sources_differ(name: str, seed: int) -> None:
    pair = make(name, seed)
    assert (pair.mask > 0).mean() > 0.01
    assert len(np.unique(pair.mask)) >= 2
    difference = np.abs(luminance(pair.a) - luminance(pair.b))
    assert difference.mean() > 5.0


def _high_frequency(image: np.ndarray) -> float:
    y = luminance(image)
    return float(np.mean((y - ndimage.gaussian_filter(y, 1.0)) ** 2))


def _sharpness(image: np.ndarray, region: np.ndarray) -> float:
    lap = ndimage.laplace(ndimage.gaussian_filter(luminance(image), 0.5))
    return float(np.mean(lap[region] ** 2))


@pytest.mark.parametrize("seed", SEEDS)
def test_ir_vis_complementary(seed: int) -> None:
    pair = make("ir_vis", seed)
    ir, vis = pair.a, pair.b
    assert ir.ndim == 2 and vis.ndim == 3
    warm = np.isin(pair.mask, [1, 2, 3])  # person, bicycle, car
    assert warm.any()
    assert ir[warm].mean() - ir[pair.mask == 0].mean() > 40  # warm objects stand out in IR
    assert _high_frequency(vis) > 1.5 * _high_frequency(ir)  # texture lives in VIS
    assert luminance(vis).mean() < 100  # a dark, low-light VIS
    assert np.std(vis, axis=-1).mean() > 1.0  # and a colour one


@pytest.mark.parametrize("seed", SEEDS)
def test_multi_exposure_under_and_over(seed: int) -> None:
    pair = make("multi_exposure", seed)
    under, over = pair.a, pair.b
    assert under.ndim == 3 and over.ndim == 3
    assert under.mean() + 40 < over.mean()
    assert (under.max(axis=-1) <= 2).mean() > 0.002  # crushed shadows
    assert (over.min(axis=-1) >= 253).mean() > 0.01  # blown highlights
    light = pair.mask == 2
    if light.any():
        assert (over[light].min(axis=-1) >= 253).mean() > 0.5


@pytest.mark.parametrize("seed", SEEDS)
def test_multi_focus_near_and_far(seed: int) -> None:
    pair = make("multi_focus", seed)
    near, far = pair.a, pair.b
    foreground = ndimage.binary_erosion(pair.mask == 1, iterations=4)
    background = ~ndimage.binary_dilation(pair.mask == 1, iterations=8)
    assert foreground.sum() > 50 and background.sum() > 50
    assert _sharpness(near, foreground) > 2 * _sharpness(far, foreground)
    assert _sharpness(far, background) > 2 * _sharpness(near, background)


def test_multi_focus_colour_option() -> None:
    grey = FAMILIES.get("multi_focus")(np.random.default_rng(0), 64, 64, grayscale=True)
    colour = FAMILIES.get("multi_focus")(np.random.default_rng(0), 64, 64, grayscale=False)
    assert grey.a.ndim == grey.b.ndim == 2
    assert colour.a.ndim == colour.b.ndim == 3


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("variant", MEDICAL_VARIANTS)
def test_medical_modalities(variant: str, seed: int) -> None:
    pair = make(variant, seed)
    mri, other = pair.a, pair.b
    bone, grey, white = pair.mask == 1, pair.mask == 3, pair.mask == 4
    assert mri.ndim == 2
    assert abs(mri[grey].mean() - mri[white].mean()) > 20  # MRI: soft-tissue contrast
    assert mri[bone].mean() < mri[grey | white].mean() + 30  # cortical bone is dark in MRI
    if variant == "mri_ct":
        assert other.ndim == 2
        assert other[bone].mean() - mri[bone].mean() > 100  # CT: bright bone
        assert abs(other[grey].mean() - other[white].mean()) < 15  # little soft-tissue contrast
    else:
        assert other.ndim == 3
        head = pair.mask > 0
        assert np.std(other[head], axis=-1).mean() > 20  # colour-mapped
        # registered with the MRI: the activity is inside the head, the rest is dark
        outside = ndimage.binary_dilation(head, iterations=12) == 0
        assert luminance(other)[outside].mean() < 10
        assert luminance(other)[grey].mean() > luminance(other)[pair.mask == 5].mean()


# --------------------------------------------------------------------------------------
# synthesize
# --------------------------------------------------------------------------------------


def _manifest(path: Path) -> list[dict[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    assert tuple(header) == MANIFEST_COLUMNS
    return [dict(zip(header, line.split("\t"), strict=True)) for line in lines[1:]]


@pytest.mark.parametrize("family", [*NAMES, "medical"])
def test_synthesize_writes_a_readable_set(family: str, tmp_path: Path) -> None:
    out = tmp_path / "set"
    manifest = synthesize(family, out, n=6, seed=3, size=(48, 64))
    assert manifest == out / "MANIFEST.tsv"
    rows = _manifest(manifest)
    assert [r["pair"] for r in rows] == [f"synth_{i:04d}" for i in range(6)]
    assert {r["split"] for r in rows} == {"train", "val"}
    for row in rows:
        for key, mode_key in (("a_path", "a_mode"), ("b_path", "b_mode")):
            image = read_image(out / row[key])
            assert image.shape[:2] == (48, 64)
            assert row[mode_key] == ("L" if image.ndim == 2 else "RGB")
            assert row[key.replace("path", "size")] == "64x48"
        mask = read_segmentation(out / row["label_path"])
        assert mask.shape == (48, 64) and mask.dtype == np.uint8
        np.testing.assert_array_equal(read_label(out / row["label_path"], 64, 48), mask)
        task = row["task"]
        assert task in FAMILIES
        roles = FAMILIES.meta(task)["roles"]
        assert row["a_path"].startswith(f"{roles[0]}/") and row["b_path"].startswith(f"{roles[1]}/")
    if family == "medical":
        assert sorted(r["task"] for r in rows) == sorted(MEDICAL_VARIANTS * 2)
    else:
        assert {r["task"] for r in rows} == {family}
    assert not list(out.rglob("*.part"))


def test_synthesize_files_match_generator_and_are_deterministic(tmp_path: Path) -> None:
    first = synthesize("mri_pet", tmp_path / "one", n=3, seed=7, size=(40, 40))
    second = synthesize("mri_pet", tmp_path / "two", n=5, seed=7, size=(40, 40))
    rows_one, rows_two = _manifest(first), _manifest(second)
    child = np.random.SeedSequence(7).spawn(3)[1]
    expected = FAMILIES.get("mri_pet")(np.random.default_rng(child), 40, 40)
    np.testing.assert_array_equal(read_image(first.parent / rows_one[1]["a_path"]), to_uint8(expected.a))
    np.testing.assert_array_equal(read_image(first.parent / rows_one[1]["b_path"]), to_uint8(expected.b))
    np.testing.assert_array_equal(read_segmentation(first.parent / rows_one[1]["label_path"]), expected.mask)
    for row_one, row_two in zip(rows_one, rows_two[:3], strict=True):  # pair i does not depend on n
        for key in ("a_path", "b_path", "label_path"):
            assert (first.parent / row_one[key]).read_bytes() == (second.parent / row_two[key]).read_bytes()


def test_synthesize_refuses_existing_set_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "set"
    synthesize("multi_focus", out, n=6, size=(32, 32))
    with pytest.raises(UserError, match="MANIFEST.tsv.*overwrite"):
        synthesize("multi_focus", out, n=2, size=(32, 32))
    assert len(_manifest(out / "MANIFEST.tsv")) == 6
    synthesize("multi_focus", out, n=2, size=(32, 32), overwrite=True)
    rows = _manifest(out / "MANIFEST.tsv")
    assert len(rows) == 2
    # files of the old set that the new one does not name are removed
    assert sorted(p.name for p in (out / "near").iterdir()) == ["synth_0000.png", "synth_0001.png"]


def test_synthesize_accepts_a_non_empty_directory_without_manifest(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    synthesize("ir_vis", tmp_path, n=1, size=(32, 32))
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert len(_manifest(tmp_path / "MANIFEST.tsv")) == 1


def test_synthesize_interrupted_leaves_no_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "set"
    synthesize("multi_exposure", out, n=3, size=(32, 32))
    calls = {"n": 0}
    real_write = synthetic.write_image

    def failing_write(path, image, **options):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated kill")
        real_write(path, image, **options)

    monkeypatch.setattr(synthetic, "write_image", failing_write)
    with pytest.raises(KeyboardInterrupt):
        synthesize("multi_exposure", out, n=3, size=(32, 32), overwrite=True)
    # the old manifest would now point at a mix of old and new files: it must be gone
    assert not (out / "MANIFEST.tsv").exists()
    assert not list(out.rglob("*.part"))


BAD_ARGUMENTS = [
    ({"family": "nope"}, "unknown synthetic generator 'nope'; known: ir_vis, medical, mri_ct"),
    ({"n": 2.5}, "n: expected a positive"),
    ({"n": "2"}, "n: expected a positive"),
    ({"n": True}, "n: expected a positive"),
    ({"n": 0}, "n: expected a positive"),
    ({"seed": -1}, "seed: expected a non-negative"),
    ({"seed": 1.5}, "seed: expected a non-negative"),
    ({"size": (8, 8)}, "size: expected"),
    ({"size": "big"}, "size: expected"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS)
def test_synthesize_rejects_bad_arguments(kwargs: dict, message: str, tmp_path: Path) -> None:
    args = {"family": "ir_vis", "out_dir": tmp_path / "set", "n": 2, "size": (32, 32)} | kwargs
    with pytest.raises(UserError, match=message):
        synthesize(**args)
    assert not (tmp_path / "set").exists()


@pytest.mark.parametrize(("kwargs", "message"), BAD_ARGUMENTS)
def test_synthesized_once_refuses_bad_arguments_before_writing(kwargs: dict, message: str,
                                                                 tmp_path: Path) -> None:
    """The cached set's name is built from ``n`` and ``seed``: they are checked before it is,
    so ``n=2.5`` is not cached as two pairs, and no hidden temporary folder is left behind."""
    parent = tmp_path / "cache"
    parent.mkdir()
    args = {"family": "ir_vis", "parent": parent, "n": 2, "seed": 0, "size": (32, 32)} | kwargs
    expected = message if "family" in kwargs else rf"^data\.synthetic\.{message}"
    with pytest.raises(UserError, match=expected):
        synthetic.synthesized_once(**args, prefix="data.synthetic.")
    assert list(parent.iterdir()) == []


def test_synthesized_once_interrupted_leaves_nothing_and_a_retry_completes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parent = tmp_path / "cache"
    real_write = synthetic.write_image

    def interrupted(path, image, **options):
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(synthetic, "write_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthetic.synthesized_once("multi_focus", parent, n=2, seed=0, size=(32, 32))
    assert list(parent.iterdir()) == []
    monkeypatch.setattr(synthetic, "write_image", real_write)
    root = synthetic.synthesized_once("multi_focus", parent, n=2, seed=0, size=(32, 32))
    assert [entry.name for entry in parent.iterdir()] == [root.name]
    assert len(_manifest(root / "MANIFEST.tsv")) == 2


def test_synthesize_out_dir_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        synthesize("ir_vis", target, n=1, size=(32, 32))
