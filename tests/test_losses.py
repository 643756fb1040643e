"""Unsupervised fusion losses (parametrized over LOSS_TERMS.names()) and FusionLoss."""

from __future__ import annotations

import time

import pytest
import torch

from timfusion.platform.errors import UserError
from timfusion.tasks.filters import box_mean, sobel, sobel_magnitude
from timfusion.tasks.losses import (
    LOSS_TERMS,
    SSIM_C1,
    ExposureLoss,
    FocusLoss,
    FusionLoss,
    GradientLoss,
    IntensityLoss,
    SSIMLoss,
    ssim,
)

NAMES = LOSS_TERMS.names()


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _pair(n: int = 2, h: int = 40, w: int = 52) -> tuple[torch.Tensor, torch.Tensor]:
    a = box_mean(_rand(n, 1, h, w, seed=1), 2) * 0.6 + _rand(n, 1, h, w, seed=2) * 0.4
    b = box_mean(_rand(n, 1, h, w, seed=3), 1) * 0.9 + 0.05
    return a, b


def test_registry_has_the_terms() -> None:
    assert {"intensity", "gradient", "ssim", "exposure", "focus"} <= set(NAMES)
    assert LOSS_TERMS.get("intensity") is IntensityLoss
    assert LOSS_TERMS.get("gradient") is GradientLoss
    assert LOSS_TERMS.get("ssim") is SSIMLoss
    assert LOSS_TERMS.get("exposure") is ExposureLoss
    assert LOSS_TERMS.get("focus") is FocusLoss


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [(40, 52), (37, 53), (1, 9), (3, 3), (1, 1)])
def test_zero_at_the_ideal_when_sources_agree(name: str, size: tuple[int, int]) -> None:
    a, _ = _pair(2, *size)
    loss = LOSS_TERMS.get(name)()(a, a.clone(), a.clone())
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert abs(loss.item()) < 1e-5


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", [(40, 52), (37, 53), (1, 9), (5, 4)])
def test_positive_away_from_the_ideal(name: str, size: tuple[int, int]) -> None:
    a, b = _pair(2, *size)
    fused = _rand(2, 1, *size, seed=9)
    loss = LOSS_TERMS.get(name)()(a, b, fused)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_gradients_flow_to_the_fused_image(name: str) -> None:
    a, b = _pair(2, 37, 53)
    fused = ((a + b) / 2).requires_grad_(True)
    LOSS_TERMS.get(name)()(a, b, fused).backward()
    assert fused.grad is not None
    assert torch.isfinite(fused.grad).all()
    assert fused.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_batch_loss_is_the_mean_of_item_losses(name: str) -> None:
    a, b = _pair(3, 33, 45)
    fused = _rand(3, 1, 33, 45, seed=7)
    term = LOSS_TERMS.get(name)()
    items = torch.stack([term(a[i : i + 1], b[i : i + 1], fused[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(term(a, b, fused), items.mean(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_float32_agrees_with_float64(name: str) -> None:
    a, b = _pair(2, 64, 64)
    fused = _rand(2, 1, 64, 64, seed=8)
    term = LOSS_TERMS.get(name)()
    l32 = term(a, b, fused)
    l64 = term(a.double(), b.double(), fused.double())
    assert l32.dtype == torch.float32 and l64.dtype == torch.float64
    torch.testing.assert_close(l32.double(), l64, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_mismatched_shapes_are_user_errors(name: str) -> None:
    a, b = _pair(1, 16, 16)
    with pytest.raises(UserError):
        LOSS_TERMS.get(name)()(a, b, a[..., :8])


# ------------------------------------------------------------------------------ per term


@pytest.mark.parametrize(
    "target, ideal",
    [
        ("max", torch.maximum),
        ("mean", lambda a, b: (a + b) / 2),
        ("a", lambda a, b: a),
        ("b", lambda a, b: b),
    ],
)
@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_intensity_targets(target: str, ideal, norm: str) -> None:  # type: ignore[no-untyped-def]
    a, b = _pair()
    loss = IntensityLoss(target=target, norm=norm)
    assert loss(a, b, ideal(a, b)).item() == 0.0
    shifted = (ideal(a, b) + 0.1).clamp(0, 1)
    diff = shifted - ideal(a, b)
    expected = diff.abs().mean() if norm == "l1" else diff.square().mean()
    torch.testing.assert_close(loss(a, b, shifted), expected)


def test_intensity_rejects_unknown_options() -> None:
    with pytest.raises(UserError, match="known: max, mean, a, b"):
        IntensityLoss(target="median")
    with pytest.raises(UserError, match="norm"):
        IntensityLoss(norm="l3")


def test_gradient_loss_formula_and_magnitude_form() -> None:
    a, b = _pair()
    fused = _rand(2, 1, 40, 52, seed=3)
    gx, gy = sobel(fused)
    torch.testing.assert_close(sobel_magnitude(fused), gx.abs() + gy.abs())
    target = torch.maximum(sobel_magnitude(a), sobel_magnitude(b))
    torch.testing.assert_close(GradientLoss()(a, b, fused), (sobel_magnitude(fused) - target).abs().mean())
    # Keeping the sharper source's gradients is ideal where the other source is flat.
    flat = torch.full_like(a, 0.3)
    assert GradientLoss()(a, flat, a).item() < 1e-6
    assert GradientLoss(magnitude="l2")(a, flat, a).item() < 1e-5
    assert GradientLoss()(a, flat, (a + flat) / 2).item() > 0.1


def test_ssim_matches_the_closed_form_on_constants() -> None:
    x = torch.full((1, 1, 20, 20), 0.8)
    y = torch.full((1, 1, 20, 20), 0.2)
    expected = (2 * 0.8 * 0.2 + SSIM_C1) / (0.8**2 + 0.2**2 + SSIM_C1)
    torch.testing.assert_close(ssim(x, y), torch.tensor([expected]), atol=1e-4, rtol=0)
    torch.testing.assert_close(ssim(x.double(), y.double()).item(), expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(ssim(x, x), torch.tensor([1.0]))


def test_ssim_loss_weights() -> None:
    a, b = _pair()
    only_a = SSIMLoss(weight_a=1.0, weight_b=0.0)
    assert only_a(a, b, a).item() < 1e-6
    assert only_a(a, b, b).item() > 0.05
    torch.testing.assert_close(SSIMLoss()(a, b, a), 0.5 * (1 - ssim(a, b).mean()))
    with pytest.raises(UserError):
        SSIMLoss(window=10)


def test_exposure_prefers_well_exposed_pixels() -> None:
    h, w = 24, 32
    a = torch.full((1, 1, h, w), 0.5)  # well exposed
    b = torch.full((1, 1, h, w), 0.02)  # under exposed
    loss = ExposureLoss()
    w_a, w_b = loss.weights(a, b)
    torch.testing.assert_close(w_a + w_b, torch.ones_like(a))
    assert (w_a > 0.9).all()
    assert loss(a, b, a).item() < loss(a, b, b).item()
    assert loss(a, b, a).item() < loss(a, b, (a + b) / 2).item()
    target = w_a * a + w_b * b
    assert loss(a, b, target).item() < 1e-7
    # Extreme sources and a tiny sigma neither overflow nor divide 0 by 0.
    sharp = ExposureLoss(sigma=0.01)
    w_a, w_b = sharp.weights(torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4))
    assert torch.isfinite(w_a).all() and torch.isfinite(w_b).all()


def test_exposure_brightness_term() -> None:
    a, b = _pair()
    plain = ExposureLoss()
    bright = ExposureLoss(brightness_weight=0.5, brightness_window=8)
    target = torch.full_like(a, 0.5)
    # At mid-grey the brightness term vanishes; darker outputs pay for it.
    torch.testing.assert_close(bright(target, target, target), plain(target, target, target))
    dark = torch.full_like(a, 0.1)
    extra = bright(a, b, dark) - plain(a, b, dark)
    torch.testing.assert_close(extra, torch.tensor(0.5 * 0.4), atol=1e-6, rtol=0)


def _multifocus_pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sharp texture; a: left half in focus, b: right half in focus."""
    sharp = _rand(1, 1, 48, 64, seed=11)
    blurred = box_mean(sharp, 3)
    left = torch.zeros_like(sharp)
    left[..., :32] = 1.0
    a = left * sharp + (1 - left) * blurred
    b = left * blurred + (1 - left) * sharp
    return a, b, sharp


@pytest.mark.parametrize("hard", [False, True])
def test_focus_prefers_the_all_in_focus_image(hard: bool) -> None:
    a, b, sharp = _multifocus_pair()
    loss = FocusLoss(hard=hard)
    m = loss.decision_map(a, b)
    assert m[..., 8:-8, 4:28].mean() > 0.9 and m[..., 8:-8, 36:60].mean() < 0.1
    best = loss(a, b, sharp).item()
    for other in (a, b, (a + b) / 2):
        assert best < loss(a, b, other).item()


def test_focus_rejects_even_windows() -> None:
    with pytest.raises(UserError):
        FocusLoss(window=6)


# ------------------------------------------------------------------------------ FusionLoss


def test_fusion_loss_sums_weighted_parts() -> None:
    a, b = _pair()
    fused = _rand(2, 1, 40, 52, seed=4)
    weights = {"intensity": 1.0, "gradient": 10.0, "ssim": 0.5, "exposure": 0.0}
    total, parts = FusionLoss(weights)(a, b, fused)
    assert set(parts) == {"intensity", "gradient", "ssim"}
    expected = sum(weights[k] * v for k, v in parts.items())
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(parts["gradient"], GradientLoss()(a, b, fused))


def test_selection_is_zero_on_a_per_pixel_choice_and_grows_with_blending() -> None:
    a, b = _pair()
    choice = torch.rand_like(a) < 0.5
    loss = LOSS_TERMS.get("selection")()
    assert float(loss(a, b, torch.where(choice, a, b))) == 0.0
    half = float(loss(a, b, (a + b) / 2))
    torch.testing.assert_close(torch.tensor(half), ((a - b).abs() / 2).mean())
    assert float(loss(a, b, 0.9 * a + 0.1 * b)) < half


def test_pixel_only_sums_the_pixel_fidelity_terms() -> None:
    a, b = _pair()
    fused = _rand(2, 1, 40, 52, seed=6)
    loss = FusionLoss({"intensity": 2.0, "gradient": 10.0, "ssim": 1.0})
    total, parts = loss(a, b, fused, pixel_only=True)
    assert set(parts) == {"intensity", "gradient", "ssim"}  # every part is still reported
    torch.testing.assert_close(total, 2.0 * parts["intensity"])
    # without a pixel-fidelity term, pixel_only falls back to the whole loss
    structural = FusionLoss({"gradient": 10.0, "ssim": 1.0})
    torch.testing.assert_close(structural(a, b, fused, pixel_only=True)[0], structural(a, b, fused)[0])


def test_pixel_fidelity_terms_are_the_pixel_targets() -> None:
    flagged = {name for name in NAMES if getattr(LOSS_TERMS.get(name), "pixel_fidelity", False)}
    assert flagged == {"intensity", "exposure", "focus", "activity"}


@pytest.mark.parametrize("name", NAMES)
def test_fusion_loss_single_term_equals_the_term(name: str) -> None:
    a, b = _pair()
    fused = _rand(2, 1, 40, 52, seed=5).requires_grad_(True)
    total, parts = FusionLoss({name: 2.0})(a, b, fused)
    torch.testing.assert_close(total, 2.0 * LOSS_TERMS.get(name)()(a, b, fused))
    total.backward()
    assert fused.grad is not None and torch.isfinite(fused.grad).all()


def test_fusion_loss_options() -> None:
    a, b = _pair()
    loss = FusionLoss({"intensity": 1.0, "gradient": 10.0}, options={"intensity": {"target": "a"}})
    _, parts = loss(a, b, a)
    assert parts["intensity"].item() == 0.0
    loss = FusionLoss({"intensity": 1.0}, intensity={"target": "b", "norm": "l2"})
    _, parts = loss(a, b, b)
    assert parts["intensity"].item() == 0.0
    # Options for a known term that is switched off are ignored.
    FusionLoss({"intensity": 1.0, "focus": 0.0}, options={"focus": {"window": 5}})


def test_fusion_loss_errors() -> None:
    with pytest.raises(UserError, match="unknown loss term 'sharpness'; known: .*exposure.*intensity"):
        FusionLoss({"intensity": 1.0, "sharpness": 1.0})
    with pytest.raises(UserError, match="unknown loss term"):
        FusionLoss({"intensity": 1.0}, options={"nope": {}})
    with pytest.raises(UserError, match="bad options"):
        FusionLoss({"intensity": 1.0}, options={"intensity": {"colour": "red"}})
    with pytest.raises(UserError, match="known: max"):
        FusionLoss({"intensity": 1.0}, options={"intensity": {"target": "min"}})
    with pytest.raises(UserError, match=">= 0"):
        FusionLoss({"intensity": -1.0})
    with pytest.raises(UserError, match="number"):
        FusionLoss({"intensity": "lots"})  # type: ignore[dict-item]
    with pytest.raises(UserError, match="non-zero"):
        FusionLoss({"intensity": 0.0})


def test_print_timing() -> None:
    """Prints forward+backward time of the full loss on a training-sized batch; never asserted."""
    a, b = _pair(8, 128, 128)
    loss = FusionLoss({name: 1.0 for name in NAMES})
    fused = ((a + b) / 2).requires_grad_(True)
    start = time.perf_counter()
    total, _ = loss(a, b, fused)
    total.backward()
    print(f"FusionLoss(all terms) fwd+bwd on 8x1x128x128: {(time.perf_counter() - start) * 1000:.1f} ms")
