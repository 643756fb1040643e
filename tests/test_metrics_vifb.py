"""The ``vifb`` metric definitions against VIFB's MATLAB code (xingchenzhang/VIFB @ 22b2ea9).

Two conformance sets from ../shared (skipped, with the reason, when absent):

- ``metrics/golden.tsv``, rows with definition ``vifb``: single-channel TNO images, values
  from running VIFB's MATLAB code; relative error <= 1e-6 (1e-4 for VIFB_Qcb and
  VIFB_Qcv, as the README allows).
- ``data/vifb/METRICS_REFERENCE.tsv``: VIFB's own per-image values (printed to 5
  significant digits) for the colour fused images of 13 methods on 21 pairs (MST_SR has
  no fused images and is skipped); the value rounded to 5 significant digits must equal
  the printed one.

Each image set is computed once (module-scoped fixtures), one batch per pair with the
sources expanded, single-threaded: the metrics work plane by plane and intra-op threads
only add synchronisation (badly so on a busy machine).
"""

from __future__ import annotations

import csv
import math
import os
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import timfusion.tasks.metrics.vifb  # noqa: F401  (registers the metrics)
from timfusion.tasks.imageio import read_image
from timfusion.tasks.metrics.registry import DEFAULT_METRICS, METRICS

SHARED = Path(os.environ.get("TIMFUSION_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
GOLDEN_DIR = SHARED / "metrics"
VIFB_DIR = SHARED / "data" / "vifb"

VIFB_KEYS = [name for name in METRICS.names() if name.startswith("vifb.")]
NAMES = DEFAULT_METRICS["vifb"]
LOWER_IS_BETTER = {"CE", "RMSE", "Qcv"}
GOLDEN_TOLERANCE = {"Qcb": 1e-4, "Qcv": 1e-4}  # README: 1e-6 otherwise (VIFB_Qabf, VIFB_SSIM included)
REFERENCE_NAMES = {
    "Avg_gradient": "AG",
    "Cross_entropy": "CE",
    "Edge_intensity": "EI",
    "Entropy": "EN",
    "Mutinf": "MI",
    "Psnr": "PSNR",
    "Qabf": "Qabf",
    "Qcb": "Qcb",
    "Qcv": "Qcv",
    "Rmse": "RMSE",
    "Spatial_frequency": "SF",
    "Ssim": "SSIM",
    "Variance": "SD",
}


def _load(path: Path) -> torch.Tensor:
    """An image as read from disk (RGB-stored grey kept RGB, as VIFB's ``imread``): (1, C, H, W)."""
    image = torch.from_numpy(read_image(path, keep_rgb_gray=True))
    return image[None, None] if image.ndim == 2 else image.permute(2, 0, 1)[None].contiguous()


@contextmanager
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _score_pair(ir: torch.Tensor, vi: torch.Tensor, fused: list[torch.Tensor]) -> dict[str, list[float]]:
    """Every vifb metric for one pair and a batch of fused images (the sources expanded)."""
    batch = torch.cat(fused)
    a = ir.expand(batch.shape[0], -1, -1, -1)
    b = vi.expand(batch.shape[0], -1, -1, -1)
    return {name: METRICS.get(f"vifb.{name}").fn(a, b, batch).tolist() for name in NAMES}


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


# ----------------------------------------------------------------------------- registry / shapes


def test_every_vifb_metric_is_registered() -> None:
    assert set(VIFB_KEYS) >= {f"vifb.{name}" for name in NAMES}
    for name in NAMES:
        spec = METRICS.get(f"vifb.{name}")
        assert spec.colour
        assert spec.higher_is_better == (name not in LOWER_IS_BETTER)


def _random_images(n: int, channels: int, h: int, w: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, h, w), generator=g).to(torch.float64)


@pytest.mark.parametrize("key", VIFB_KEYS)
@pytest.mark.parametrize(
    "channels", [(1, 3, 3), (3, 3, 3), (1, 1, 1), (3, 3, 1)], ids=lambda c: "".join(map(str, c))
)
def test_shape_dtype_and_batching(key: str, channels: tuple[int, int, int]) -> None:
    """(N,) float64, finite; a batch equals its images one by one; expanded sources are fine."""
    ca, cb, cf = channels
    h, w = 37, 50  # odd height, even width, partial 16 x 16 blocks (Qcv)
    a = _random_images(1, ca, h, w, 1)
    b = _random_images(1, cb, h, w, 2)
    fused = _random_images(3, cf, h, w, 3)
    fn = METRICS.get(key).fn
    batched = fn(a.expand(3, -1, -1, -1), b.expand(3, -1, -1, -1), fused)
    assert batched.shape == (3,) and batched.dtype == torch.float64
    assert torch.isfinite(batched).all()
    materialised = fn(a.repeat(3, 1, 1, 1), b.repeat(3, 1, 1, 1), fused)
    torch.testing.assert_close(materialised, batched, rtol=1e-12, atol=0)
    singles = torch.cat([fn(a, b, fused[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(singles, batched, rtol=1e-12, atol=0)


@pytest.mark.parametrize("key", VIFB_KEYS)
def test_grey_stored_as_rgb_equals_single_channel_sources(key: str) -> None:
    """With a colour F, an IR stored as RGB with equal channels is the same as the single-channel IR."""
    a = _random_images(1, 1, 33, 40, 4)
    b = _random_images(1, 3, 33, 40, 5)
    fused = _random_images(2, 3, 33, 40, 6)
    fn = METRICS.get(key).fn
    torch.testing.assert_close(
        fn(a.repeat(2, 3, 1, 1), b.expand(2, -1, -1, -1), fused),
        fn(a.expand(2, -1, -1, -1), b.expand(2, -1, -1, -1), fused),
        rtol=1e-12,
        atol=0,
    )


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError):
        METRICS.get("vifb.EN").fn(
            _random_images(1, 1, 8, 8, 0), _random_images(1, 1, 8, 8, 0), _random_images(1, 2, 8, 8, 0)
        )
    with pytest.raises(ValueError):
        METRICS.get("vifb.Qcv").fn(
            _random_images(1, 1, 8, 9, 0), _random_images(1, 1, 8, 8, 0), _random_images(1, 1, 8, 8, 0)
        )


def test_spatial_frequency_reads_a_colour_image_as_channels_side_by_side() -> None:
    """VIFB's SF quirk: H x W x 3 is read as one H x 3W image (seams included), not averaged."""
    fused = _random_images(1, 3, 20, 30, 7)
    wide = torch.cat(list(fused[0]), dim=-1)[None, None]  # [R G B] side by side
    sf = METRICS.get("vifb.SF").fn
    dummy = torch.zeros(1, 1, 20, 30, dtype=torch.float64)
    torch.testing.assert_close(
        sf(dummy, dummy, fused), sf(torch.zeros_like(wide), torch.zeros_like(wide), wide)
    )


# ----------------------------------------------------------------------------- golden.tsv


@pytest.fixture(scope="module")
def golden() -> list[tuple[str, str, str, float, float]]:
    """(pair, method, metric, reference, computed) for every vifb row of golden.tsv."""
    if not (GOLDEN_DIR / "golden.tsv").exists():
        pytest.skip(f"no golden values at {GOLDEN_DIR} (set TIMFUSION_SHARED)")
    images = {(r["image_pair"], r["fused_method"]): r for r in _read_tsv(GOLDEN_DIR / "images.tsv")}
    rows = [r for r in _read_tsv(GOLDEN_DIR / "golden.tsv") if r["definition"] == "vifb"]
    by_pair: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r["fused_method"] not in by_pair[r["image_pair"]]:
            by_pair[r["image_pair"]].append(r["fused_method"])
    computed: dict[tuple[str, str], dict[str, float]] = {}
    with _single_thread():
        for pair, methods in by_pair.items():
            first = images[(pair, methods[0])]
            ir, vi = _load(GOLDEN_DIR / first["ir"]), _load(GOLDEN_DIR / first["vi"])
            scores = _score_pair(ir, vi, [_load(GOLDEN_DIR / images[(pair, m)]["fused"]) for m in methods])
            for i, method in enumerate(methods):
                computed[(pair, method)] = {name: values[i] for name, values in scores.items()}
    out = []
    for r in rows:
        name = r["metric"].removeprefix("VIFB_")
        out.append(
            (
                r["image_pair"],
                r["fused_method"],
                name,
                float(r["value"]),
                computed[(r["image_pair"], r["fused_method"])][name],
            )
        )
    return out


@pytest.mark.shared
@pytest.mark.parametrize("name", NAMES)
def test_golden(golden: list[tuple[str, str, str, float, float]], name: str) -> None:
    rows = [row for row in golden if row[2] == name]
    assert rows, f"golden.tsv has no VIFB_{name} rows"
    tolerance = GOLDEN_TOLERANCE.get(name, 1e-6)
    bad = [
        (pair, method, ref, got)
        for pair, method, _, ref, got in rows
        if not abs(got - ref) <= tolerance * abs(ref)
    ]
    assert not bad, (
        f"VIFB_{name}: {len(bad)}/{len(rows)} rows off by more than {tolerance:g} relative: {bad[:5]}"
    )


# ----------------------------------------------------------------------------- METRICS_REFERENCE.tsv


@pytest.fixture(scope="module")
def reference() -> list[tuple[str, str, str, str, float]]:
    """(pair, method, metric, printed value, computed) for the methods that have fused images."""
    table = VIFB_DIR / "METRICS_REFERENCE.tsv"
    if not table.exists():
        pytest.skip(f"no VIFB reference values at {VIFB_DIR} (set TIMFUSION_SHARED)")
    rows = [r for r in _read_tsv(table) if (VIFB_DIR / "fused" / r["method"]).is_dir()]  # drops MST_SR
    methods_of: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r["method"] not in methods_of[r["pair"]]:
            methods_of[r["pair"]].append(r["method"])
    computed: dict[tuple[str, str], dict[str, float]] = {}
    with _single_thread():
        for pair, methods in methods_of.items():
            ir, vi = _load(VIFB_DIR / "ir" / f"{pair}.jpg"), _load(VIFB_DIR / "vi" / f"{pair}.jpg")
            scores = _score_pair(ir, vi, [_load(VIFB_DIR / "fused" / m / f"{pair}.jpg") for m in methods])
            for i, method in enumerate(methods):
                computed[(pair, method)] = {name: values[i] for name, values in scores.items()}
    return [
        (
            r["pair"],
            r["method"],
            REFERENCE_NAMES[r["metric"]],
            r["value"],
            computed[(r["pair"], r["method"])][REFERENCE_NAMES[r["metric"]]],
        )
        for r in rows
    ]


def _matches_printed(value: float, printed: str) -> bool:
    """``value`` printed with 5 significant digits (MATLAB ``dlmwrite``) gives ``printed``.

    A difference of one unit in the 5th significant digit is accepted only at a rounding
    tie: when ``value`` lies within 1e-9 (relative) of the midpoint between the two
    neighbouring 5-digit numbers, where the last bits of floating-point rounding decide
    which way MATLAB printed it.
    """
    target = float(printed)
    if float(f"{value:.5g}") == target:
        return True
    if value == 0 or not math.isfinite(value):
        return False
    unit = 10.0 ** (math.floor(math.log10(abs(value))) - 4)
    midpoint = (math.floor(value / unit) + 0.5) * unit
    one_unit_apart = abs(abs(target - float(f"{value:.5g}")) - unit) <= 1e-6 * unit
    return one_unit_apart and abs(value - midpoint) <= 1e-9 * abs(value)


@pytest.mark.shared
@pytest.mark.parametrize("name", NAMES)
def test_metrics_reference(reference: list[tuple[str, str, str, str, float]], name: str) -> None:
    rows = [row for row in reference if row[2] == name]
    assert len(rows) == 21 * 13, f"expected 21 pairs x 13 methods for {name}, got {len(rows)}"
    bad = [
        (pair, method, printed, f"{got:.8g}")
        for pair, method, _, printed, got in rows
        if not _matches_printed(got, printed)
    ]
    assert not bad, f"{name}: {len(bad)}/{len(rows)} values do not print as VIFB's: {bad[:5]}"


def test_matches_printed_rounding_rule() -> None:
    assert _matches_printed(1.93284, "1.9328")
    assert _matches_printed(1.93276, "1.9328")
    assert not _matches_printed(1.9327, "1.9328")  # one unit off, no tie
    assert _matches_printed(1.93275 + 1e-12, "1.9327")  # a tie: either neighbour is accepted
    assert _matches_printed(1.93275 - 1e-12, "1.9328")
    assert _matches_printed(np.float64(19.1234), "19.123")
