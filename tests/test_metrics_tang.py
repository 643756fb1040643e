"""The ``tang`` metric definitions against the golden values of the reference MATLAB code.

Golden values: ../shared/metrics/golden.tsv (rows with definition ``tang``), computed by
Linfeng-Tang/Evaluation-for-Image-Fusion on the images listed in images.tsv. Each metric
is evaluated once per (image pair, metric) on a batch of all the fused images that have a
golden row, and the per-row tests read from that cache.
"""

from __future__ import annotations

import csv
import functools
import math
import os
from pathlib import Path

import pytest
import torch

from timfusion.tasks.imageio import read_image
from timfusion.tasks.metrics import METRICS, matlab
from timfusion.tasks.metrics import tang as _tang  # noqa: F401  (registers the metrics)
from timfusion.tasks.metrics import vifb as _vifb  # noqa: F401  (the shorter-side test covers both)

SHARED = Path(os.environ.get("TIMFUSION_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
METRICS_DIR = SHARED / "metrics"
GOLDEN = METRICS_DIR / "golden.tsv"
IMAGES = METRICS_DIR / "images.tsv"

needs_golden = pytest.mark.skipif(
    not (GOLDEN.is_file() and IMAGES.is_file()),
    reason=f"golden metric values not found under {METRICS_DIR} "
    "(set TIMFUSION_SHARED to the shared data folder)",
)

# Relative tolerance: 1e-6, except where the reference's result hinges on
# rounding-sensitive comparisons or on MATLAB's own filtering order.
LOOSE = {
    "Qabf",
    "SSIM",
    "SSIM_F_ir",
    "SSIM_F_vi",
    "MS_SSIM",
    "Nabf",
    "Nabf_fused_first",
    "FMI_edge",
    "FMI_dct",
    "FMI_pixel",
}


@pytest.fixture(scope="module", autouse=True)
def _one_intra_op_thread():
    """Run this module with one intra-op thread, restoring the count afterwards.

    The values do not depend on it, but these are thousands of short whole-image
    operations, and on a shared 2-core machine torch's parallel regions stall whenever
    another process holds a core (the golden checks then take minutes instead of ~15 s).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _tolerance(metric: str) -> float:
    return 1e-4 if metric in LOOSE else 1e-6


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def _golden_rows() -> list[tuple[str, str, str, float]]:
    if not GOLDEN.is_file():
        return []
    return [
        (row["image_pair"], row["fused_method"], row["metric"], float(row["value"]))
        for row in _read_tsv(GOLDEN)
        if row["definition"] == "tang"
    ]


GOLDEN_ROWS = _golden_rows()


@functools.cache
def _image_paths() -> dict[tuple[str, str], dict[str, str]]:
    return {(row["image_pair"], row["fused_method"]): row for row in _read_tsv(IMAGES)}


@functools.cache
def _load(rel_path: str) -> torch.Tensor:
    image = read_image(METRICS_DIR / rel_path)
    assert image.ndim == 2, f"{rel_path}: expected a single-channel image"
    return torch.from_numpy(image)[None, None]


@functools.cache
def _methods_with_golden(image_pair: str, metric: str) -> tuple[str, ...]:
    return tuple(sorted({m for p, m, name, _ in GOLDEN_ROWS if p == image_pair and name == metric}))


@functools.cache
def _computed(image_pair: str, metric: str) -> dict[str, float]:
    """The metric on a batch of every fused image of ``image_pair`` that has a golden row."""
    methods = _methods_with_golden(image_pair, metric)
    rows = [_image_paths()[(image_pair, m)] for m in methods]
    a = torch.cat([_load(r["ir"]) for r in rows])
    b = torch.cat([_load(r["vi"]) for r in rows])
    fused = torch.cat([_load(r["fused"]) for r in rows])
    values = METRICS.get(f"tang.{metric}").fn(a, b, fused)
    assert values.shape == (len(methods),) and values.dtype == torch.float64
    return dict(zip(methods, values.tolist(), strict=True))


@needs_golden
@pytest.mark.shared
@pytest.mark.parametrize(
    ("image_pair", "method", "metric", "expected"),
    GOLDEN_ROWS or [("none", "none", "none", 0.0)],
    ids=[f"{p}-{m}-{name}" for p, m, name, _ in GOLDEN_ROWS] or ["no-golden"],
)
def test_matches_reference_matlab(image_pair: str, method: str, metric: str, expected: float) -> None:
    value = _computed(image_pair, metric)[method]
    rel = abs(value - expected) / abs(expected) if expected != 0 else abs(value)
    assert rel <= _tolerance(metric), (
        f"{metric} {image_pair}/{method}: {value!r} vs golden {expected!r} (rel {rel:.2e})"
    )


@needs_golden
@pytest.mark.shared
def test_every_golden_metric_is_registered() -> None:
    names = {name for _, _, name, _ in GOLDEN_ROWS}
    missing = sorted(n for n in names if f"tang.{n}" not in METRICS)
    assert not missing, f"golden metrics without a tang implementation: {missing}"


# --------------------------------------------------------------------------- registry-wide checks

TANG_METRICS = [name for name in METRICS.names() if name.startswith("tang.")]


def _synthetic_batch(n: int = 3, h: int = 52, w: int = 60, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Integer-valued images with structure, flat regions and saturated pixels (0 and 255)."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    images = []
    for k in range(3 * n):
        phase = float(torch.rand((), generator=gen)) * 6
        base = 127 + 120 * torch.sin(xx / (5 + k) + phase) * torch.cos(yy / (7 + k))
        noise = torch.randn(h, w, generator=gen, dtype=torch.float64) * 12
        img = (base + noise).round().clamp(0, 255)
        img[: h // 4, : w // 4] = 255.0 if k % 2 else 0.0  # flat, saturated corner
        images.append(img)
    stack = torch.stack(images).view(3, n, 1, h, w)
    a, b = stack[0], stack[1]
    # A plausible fusion (positively related to both sources): MEF-SSIM is NaN for
    # anti-correlated images, where MATLAB returns a complex number.
    fused = (0.6 * a + 0.5 * b - 12 + 0.25 * stack[2]).round().clamp(0, 255)
    return a, b, fused


@pytest.mark.parametrize("key", TANG_METRICS)
def test_batch_matches_single_images(key: str) -> None:
    a, b, f = _synthetic_batch()
    fn = METRICS.get(key).fn
    batched = fn(a, b, f)
    assert batched.shape == (a.shape[0],), f"{key}: shape {tuple(batched.shape)}"
    assert batched.dtype == torch.float64
    single = torch.cat([fn(a[i : i + 1], b[i : i + 1], f[i : i + 1]) for i in range(a.shape[0])])
    torch.testing.assert_close(batched, single, rtol=1e-12, atol=1e-12)
    assert torch.isfinite(batched).all(), f"{key}: {batched}"


@pytest.mark.parametrize("key", TANG_METRICS)
def test_shape_dtype_and_spec(key: str) -> None:
    spec = METRICS.get(key)
    assert spec.definition == "tang" and not spec.colour
    a, b, f = _synthetic_batch(n=2, h=48, w=48, seed=1)
    out = spec.fn(a, b, f)
    assert out.shape == (2,) and out.dtype == torch.float64 and out.device == f.device


def test_cpu_per_image_path_matches_batched_path() -> None:
    """Large CPU batches run image by image; the result must not depend on it."""
    from timfusion.tasks.metrics import tang

    a, b, f = _synthetic_batch(n=2, h=260, w=256, seed=2)
    assert a.shape[-1] * a.shape[-2] >= tang._CPU_PER_IMAGE_PIXELS
    for name in ("VIF", "Qabf", "SSIM", "MI"):
        spec = METRICS.get(f"tang.{name}")
        per_image = spec.fn(a, b, f)
        batched = spec.fn.__wrapped__(a, b, f)
        torch.testing.assert_close(per_image, batched, rtol=1e-12, atol=0)


def test_lower_is_better_flags() -> None:
    lower = {name for name in TANG_METRICS if not METRICS.get(name).higher_is_better}
    assert lower == {"tang.MSE", "tang.Nabf", "tang.Nabf_fused_first"}


def test_identical_images_edge_cases() -> None:
    """F == A == B: SSIM 1 per source, MSE 0, MI = 2 H(F), Qabf as coded (gF quirk)."""
    a, _, _ = _synthetic_batch(n=1, seed=3)
    get = {name.split(".", 1)[1]: METRICS.get(name).fn for name in TANG_METRICS}
    assert get["MSE"](a, a, a).item() == 0.0
    torch.testing.assert_close(get["SSIM"](a, a, a), torch.ones(1, dtype=torch.float64))
    torch.testing.assert_close(get["MI"](a, a, a), 2 * get["EN"](a, a, a) + _mi_merge_correction(a))
    assert get["FMI_pixel"](a, a, a).item() == 1.0


def test_fmi_of_constant_windows_follows_matlab_rounding() -> None:
    """Constant windows: MATLAB's sequential mean of nine fl(1/9) is one ulp above fl(1/9),
    so two constant (min-max normalised to ones) windows correlate with c = 1 and get
    FMI 1; a reduction in another order would give c = 0 and FMI ~0."""
    shape = (2, 1, 12, 14)
    a = torch.full(shape, 10.0, dtype=torch.float64)
    b = torch.full(shape, 30.0, dtype=torch.float64)
    f = torch.full(shape, 20.0, dtype=torch.float64)
    fmi = METRICS.get("tang.FMI_pixel").fn(a, b, f)
    torch.testing.assert_close(fmi, torch.ones(2, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def _mi_merge_correction(x: torch.Tensor) -> torch.Tensor:
    """2 (H(x) - H_joint(x, x)) for the 254/255 merge of the joint histogram (0 without both levels)."""
    v = matlab.im2uint8_values(x).flatten()
    merged = torch.bincount(v.clamp(max=254), minlength=256).to(torch.float64)
    plain = torch.bincount(v, minlength=256).to(torch.float64)
    return 2 * (matlab.entropy_from_counts(plain) - matlab.entropy_from_counts(merged))[None]


# --------------------------------------------------------------------------- MATLAB primitives


def test_matlab_conv2_same_even_kernel() -> None:
    # MATLAB: conv2([1 2 3], [1 1], 'same') == [3 5 3] (numpy's 'same' gives [1 3 5]).
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    out = matlab.conv2(x, torch.tensor([[1.0, 1.0]], dtype=torch.float64), "same")
    assert out.tolist() == [[3.0, 5.0, 3.0]]
    out_sep = matlab.conv2_separable(x, [1.0], [1.0, 1.0], "same")
    assert out_sep.tolist() == [[3.0, 5.0, 3.0]]


def test_matlab_gradient() -> None:
    x = torch.tensor([[1.0, 2.0, 4.0, 8.0], [2.0, 4.0, 8.0, 16.0]], dtype=torch.float64)
    gx, gy = matlab.gradient(x)
    assert gx.tolist() == [[1.0, 1.5, 3.0, 4.0], [2.0, 3.0, 6.0, 8.0]]
    assert gy.tolist() == [[1.0, 2.0, 4.0, 8.0], [1.0, 2.0, 4.0, 8.0]]


@pytest.mark.parametrize("method", ["replicate", "symmetric", "reflect", 0.0, 3.5])
def test_matlab_padding_in_separable_filter(method) -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(2, 9, 11, generator=gen, dtype=torch.float64)
    col = torch.rand(5, generator=gen, dtype=torch.float64)
    row = torch.rand(3, generator=gen, dtype=torch.float64)
    pad = (2, 2, 1, 1)
    fast = matlab._separable_valid(x, col.tolist(), row.tolist(), pad, method)
    slow = matlab.filter2(torch.outer(col, row), matlab.padarray(x, pad, method), "valid")
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-13)


def test_matlab_fspecial_gaussian_and_dct2() -> None:
    h = matlab.fspecial_gaussian(11, 1.5)
    g = torch.tensor(matlab.gaussian_1d(11, 1.5), dtype=torch.float64)
    torch.testing.assert_close(h, torch.outer(g, g), rtol=0, atol=1e-17)
    assert math.isclose(h.sum().item(), 1.0, rel_tol=1e-15)
    x = torch.rand(1, 6, 5, dtype=torch.float64)
    d = matlab.dct2(x)
    # orthonormal: energy preserved, and the DC term is sum / sqrt(M N)
    torch.testing.assert_close((d * d).sum(), (x * x).sum())
    torch.testing.assert_close(d[0, 0, 0], x.sum() / math.sqrt(30))


@pytest.mark.parametrize("key", sorted(METRICS.names()))
def test_the_shorter_side_alone_decides_whether_a_metric_can_score(key: str) -> None:
    """What ``check_scorable`` relies on: square windows, so a train run's pre-check need only
    score the validation pair with the shortest side."""
    from timfusion.platform.errors import UserError
    from timfusion.tasks.metrics import check_scorable

    spec = METRICS.get(key)

    def scorable(height: int, width: int) -> bool:
        try:
            check_scorable([spec], height, width)
        except UserError as err:
            assert str(err).startswith(f"{spec.name} cannot score {height}x{width} images")
            return False
        return True

    side = next(s for s in range(2, 257) if scorable(s, s))
    assert scorable(side, 3 * side) and scorable(3 * side, side)
    if side > 2:
        assert not scorable(side - 1, 3 * side) and not scorable(3 * side, side - 1)
