"""The fuser interface and every registered baseline (parametrized over BASELINES.names())."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from timfusion.platform.errors import UserError
from timfusion.tasks.filters import box_mean, guided_filter, sobel_magnitude
from timfusion.tasks.fusers import BASELINES, Fuser, LaplacianPyramidFuser, _expand, _reduce

NAMES = BASELINES.names()


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=dtype)


def _smooth_pair(n: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Natural-ish images: blurred noise plus fine noise, on [0, 1]."""
    a = box_mean(_rand(n, 1, h, w, seed=1), 2) * 0.7 + _rand(n, 1, h, w, seed=2) * 0.3
    b = box_mean(_rand(n, 1, h, w, seed=3), 4) * 0.8 + _rand(n, 1, h, w, seed=4) * 0.2
    return a, b


def synthetic_pair(h: int = 96, w: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """A: bright square on a flat dark background; B: a checkerboard over its left half, flat elsewhere."""
    a = torch.full((1, 1, h, w), 0.2)
    a[..., 24:72, 40:104] = 0.9
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    checker = ((yy // 2 + xx // 2) % 2 * 2 - 1).float()
    b = (0.5 + 0.25 * checker).view(1, 1, h, w)
    b[..., 64:] = 0.5
    return a, b


def test_registry_has_the_classic_baselines() -> None:
    assert {"average", "maximum", "lp", "gff"} <= set(NAMES)
    for name in NAMES:
        fuser = BASELINES.get(name)()
        assert isinstance(fuser, Fuser)
        assert fuser.name == name


def test_unknown_baseline_is_a_user_error() -> None:
    with pytest.raises(UserError, match="known: .*average"):
        BASELINES.get("nope")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [(64, 80), (37, 53), (53, 37), (17, 200)])
def test_shape_range_dtype(name: str, size: tuple[int, int]) -> None:
    a, b = _smooth_pair(2, *size)
    out = BASELINES.get(name)()(a, b)
    assert out.shape == a.shape and out.dtype == a.dtype
    assert torch.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [(1, 1), (1, 7), (7, 1), (2, 3), (5, 4), (15, 16)])
def test_tiny_images_give_valid_results(name: str, size: tuple[int, int]) -> None:
    a, b = _rand(1, 1, *size, seed=5), _rand(1, 1, *size, seed=6)
    out = BASELINES.get(name)()(a, b)
    assert out.shape == a.shape
    assert torch.isfinite(out).all() and out.min() >= 0.0 and out.max() <= 1.0
    same = BASELINES.get(name)()(a, a)
    torch.testing.assert_close(same, a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_batch_equals_items_one_by_one(name: str) -> None:
    a, b = _smooth_pair(3, 41, 58)
    fuser = BASELINES.get(name)()
    batched = fuser(a, b)
    single = torch.cat([fuser(a[i : i + 1], b[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [(64, 96), (37, 53)])
def test_equal_inputs_give_the_input(name: str, size: tuple[int, int]) -> None:
    a, _ = _smooth_pair(2, *size)
    torch.testing.assert_close(BASELINES.get(name)()(a, a.clone()), a, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_and_float64(name: str) -> None:
    a, b = _smooth_pair(1, 40, 50)
    fuser = BASELINES.get(name)()
    assert torch.equal(fuser(a, b), fuser(a, b))
    out64 = fuser(a.double(), b.double())
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), fuser(a, b), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "a_shape, b_shape",
    [
        ((1, 1, 8, 8), (1, 1, 8, 9)),
        ((1, 3, 8, 8), (1, 3, 8, 8)),
        ((8, 8), (8, 8)),
        ((1, 1, 0, 8), (1, 1, 0, 8)),
    ],
)
def test_bad_inputs_are_user_errors(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> None:
    with pytest.raises(UserError):
        BASELINES.get("average")()(torch.rand(a_shape), torch.rand(b_shape))


def test_integer_inputs_are_user_errors() -> None:
    x = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(UserError, match="floating point"):
        BASELINES.get("lp")()(x, x)


def test_maximum_and_average_are_exact() -> None:
    a, b = _smooth_pair(2, 30, 40)
    assert torch.equal(BASELINES.get("maximum")()(a, b), torch.maximum(a, b))
    assert torch.equal(BASELINES.get("average")()(a, b), (a + b) / 2)


def _gradient_error(a: torch.Tensor, b: torch.Tensor, fused: torch.Tensor) -> float:
    target = torch.maximum(sobel_magnitude(a), sobel_magnitude(b))
    return (sobel_magnitude(fused) - target).abs().mean().item()


@pytest.mark.parametrize("name", ["lp", "gff"])
def test_multiscale_keeps_object_and_texture_better_than_average(name: str) -> None:
    a, b = synthetic_pair()
    fused = BASELINES.get(name)()(a, b)
    average = BASELINES.get("average")()(a, b)
    # Gradients: the fused image carries the square's edges and the checkerboard at full strength.
    assert _gradient_error(a, b, fused) < 0.5 * _gradient_error(a, b, average)
    # Texture from B (top-left, where A is flat) at close to full contrast; average halves it.
    texture = fused[..., :16, :48].std().item()
    assert texture > 0.9 * b[..., :16, :48].std().item() > 1.5 * average[..., :16, :48].std().item()
    # The bright object from A (where B is flat) stands out at least as much as in the average.
    contrast = fused[..., 32:64, 76:96].mean() - fused[..., 80:, 76:].mean()
    avg_contrast = average[..., 32:64, 76:96].mean() - average[..., 80:, 76:].mean()
    assert contrast >= avg_contrast - 0.01


def test_lp_levels_adapt_to_size() -> None:
    lp = LaplacianPyramidFuser()
    assert lp.num_levels(480, 640) == 6  # 480 -> 240 -> 120 -> 60 -> 30 -> 15 -> 8
    assert lp.num_levels(37, 53) == 2
    assert lp.num_levels(15, 200) == 1  # 15 -> 8
    assert lp.num_levels(14, 200) == 0
    assert LaplacianPyramidFuser(levels=2).num_levels(480, 640) == 2
    with pytest.raises(UserError):
        LaplacianPyramidFuser(min_size=2)


def test_lp_picks_the_more_active_detail() -> None:
    a, b = _smooth_pair(1, 64, 64)
    flat = torch.full_like(a, 0.5)
    # Against a flat image every detail coefficient comes from a; the base is the average.
    fused = LaplacianPyramidFuser(levels=1)(a, flat)
    base = (_reduce(a) + _reduce(flat)) / 2
    expected = (a - _expand(_reduce(a), (64, 64))) + _expand(base, (64, 64))
    torch.testing.assert_close(fused, expected.clamp(0, 1), atol=1e-6, rtol=0)


def test_guided_filter_smooths_and_preserves_edges() -> None:
    step = torch.zeros(1, 1, 32, 32)
    step[..., 16:] = 1.0
    # The guide's own edge is kept by the filter (edge preserving) for a small eps.
    out = guided_filter(step, step, 4, 1e-6)
    torch.testing.assert_close(out, step, atol=1e-3, rtol=0)
    # A constant input passes through unchanged, including at the clipped borders.
    ones = torch.ones_like(step)
    torch.testing.assert_close(guided_filter(_rand(1, 1, 32, 32), ones, 45, 0.3), ones)


@pytest.mark.parametrize("size", [(23, 31), (1, 1), (1, 7), (5, 3), (100, 3)])
@pytest.mark.parametrize("radius", [0, 1, 3, 45])
def test_box_mean_matches_avg_pool(size: tuple[int, int], radius: int) -> None:
    x = _rand(2, 2, *size, dtype=torch.float64)
    pad = (radius,) * 4
    k = 2 * radius + 1
    replicate = F.avg_pool2d(F.pad(x, pad, mode="replicate"), k, stride=1)
    torch.testing.assert_close(box_mean(x, radius), replicate, atol=1e-12, rtol=0)
    inside = F.avg_pool2d(F.pad(torch.ones_like(x), pad), k, stride=1)
    clipped = F.avg_pool2d(F.pad(x, pad), k, stride=1) / inside
    torch.testing.assert_close(box_mean(x, radius, "clip"), clipped, atol=1e-12, rtol=0)
    assert box_mean(x.float(), radius).dtype == torch.float32


def test_box_mean_gradcheck() -> None:
    x = _rand(1, 1, 9, 11, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: box_mean(t, 3), (x,))
    assert torch.autograd.gradcheck(lambda t: box_mean(t, 20, "clip"), (x,))


def test_print_timing_640x480() -> None:
    """Prints the time per baseline on a 640x480 pair; a figure only, never asserted."""
    a, b = _smooth_pair(1, 480, 640)
    for name in NAMES:
        fuser = BASELINES.get(name)()
        fuser(a, b)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            fuser(a, b)
            best = min(best, time.perf_counter() - start)
        print(f"baseline {name}: {best * 1000:.1f} ms per 640x480 pair ({torch.get_num_threads()} threads)")
