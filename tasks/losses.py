"""Unsupervised fusion losses on luminance.

Every term is a ``torch.nn.Module`` with ``forward(a, b, fused) -> Tensor`` (a scalar),
``a``, ``b`` the sources and ``fused`` the output, all (N, 1, H, W) on [0, 1]. Terms are
means over pixels and the batch, so a batch's loss is the mean of its items' losses.
They are differentiable in ``fused`` and safe in float32.

Gradients are Sobel magnitudes ``|gx| + |gy|`` (unnormalized 3x3 Sobel, replicate
border; see :mod:`timfusion.tasks.filters`), which has no singular derivative at 0.

:class:`FusionLoss` is a weighted sum of the terms in :data:`LOSS_TERMS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from timfusion.platform.errors import UserError
from timfusion.platform.registry import Registry
from timfusion.tasks.filters import box_mean, gaussian_filter, laplacian, sobel_magnitude

LOSS_TERMS: Registry[type[nn.Module]] = Registry("loss term")


def _check(a: Tensor, b: Tensor, fused: Tensor) -> None:
    if not (a.shape == b.shape == fused.shape) or a.dim() != 4:
        raise UserError(
            "loss inputs must be equal-shaped (N, C, H, W) tensors, got "
            f"a {tuple(a.shape)}, b {tuple(b.shape)}, fused {tuple(fused.shape)}"
        )


def _choice(label: str, value: str, known: tuple[str, ...]) -> str:
    if value not in known:
        raise UserError(f"unknown {label} {value!r}; known: {', '.join(known)}")
    return value


def _distance(x: Tensor, y: Tensor, norm: str) -> Tensor:
    diff = x - y
    return diff.abs().mean() if norm == "l1" else (diff * diff).mean()


@LOSS_TERMS.register("intensity")
class IntensityLoss(nn.Module):
    """Pixel intensity fidelity: ``L = mean |F - T(A, B)|`` (``l1``) or ``mean (F - T)^2`` (``l2``).

    ``T`` is ``max(A, B)`` (``max``), ``(A + B) / 2`` (``mean``), ``A`` (``a``) or ``B`` (``b``).
    """

    pixel_fidelity = True

    def __init__(self, target: str = "max", norm: str = "l1") -> None:
        super().__init__()
        self.target = _choice("intensity target", target, ("max", "mean", "a", "b"))
        self.norm = _choice("intensity norm", norm, ("l1", "l2"))

    def forward(self, a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
        _check(a, b, fused)
        return _distance(fused, self.target_image(a, b), self.norm)

    def target_image(self, a: Tensor, b: Tensor) -> Tensor:
        if self.target == "max":
            return torch.maximum(a, b)
        if self.target == "mean":
            return (a + b) / 2
        return a if self.target == "a" else b


@LOSS_TERMS.register("gradient")
class GradientLoss(nn.Module):
    """Texture fidelity: ``L = mean | |grad F| - max(|grad A|, |grad B|) |``.

    ``|grad X|`` is the Sobel magnitude, ``|gx| + |gy|`` (``magnitude="l1"``, default) or
    ``sqrt(gx^2 + gy^2 + 1e-12)`` (``"l2"``).
    """

    def __init__(self, magnitude: str = "l1") -> None:
        super().__init__()
        self.magnitude = _choice("gradient magnitude", magnitude, ("l1", "l2"))

    def forward(self, a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
        _check(a, b, fused)
        grads = sobel_magnitude(torch.cat([a, b, fused]), self.magnitude)
        ga, gb, gf = grads.chunk(3)
        return (gf - torch.maximum(ga, gb)).abs().mean()


@LOSS_TERMS.register("selection")
class SelectionLoss(nn.Module):
    """Source fidelity per pixel: ``L = mean min(|F - A|, |F - B|)``.

    Zero where every fused pixel equals one of the sources. With a ``select`` head
    (``F = w A + (1 - w) B``) it is ``mean min(w, 1 - w) |A - B|``: it makes the decision
    map decisive where the sources differ and costs nothing where they agree, so the
    fused image keeps the chosen source's own intensities and edges (what MI, Qabf and VIF
    reward) instead of a blur of both.
    """

    def forward(self, a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
        _check(a, b, fused)
        return torch.minimum((fused - a).abs(), (fused - b).abs()).mean()


SSIM_C1 = 0.01**2
SSIM_C2 = 0.03**2


def ssim(x: Tensor, y: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Per-image mean SSIM (N,) of images on [0, 1] (Wang et al. 2004).

    Gaussian window ``window`` x ``window`` of std ``sigma``, valid positions only,
    ``C1 = 0.01^2``, ``C2 = 0.03^2``. Images smaller than the window use the largest odd
    window that fits (a 1-pixel side gives the luminance/contrast terms of single pixels).
    """
    size = min(window, x.shape[-2], x.shape[-1])
    if size % 2 == 0:
        size -= 1
    c = x.shape[1]
    stats = gaussian_filter(torch.cat([x, y, x * x, y * y, x * y], dim=1), size, sigma, "valid")
    mu_x, mu_y, e_xx, e_yy, e_xy = stats.split(c, dim=1)
    var_x = e_xx - mu_x * mu_x
    var_y = e_yy - mu_y * mu_y
    cov = e_xy - mu_x * mu_y
    num = (2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_x * mu_x + mu_y * mu_y + SSIM_C1) * (var_x + var_y + SSIM_C2)
    return (num / den).flatten(1).mean(dim=1)


@LOSS_TERMS.register("ssim")
class SSIMLoss(nn.Module):
    """Structural fidelity: ``L = 1 - (w_a SSIM(F, A) + w_b SSIM(F, B))``, batch-averaged.

    ``SSIM`` is :func:`ssim` (Gaussian ``window``/``sigma``, C1 = 0.01^2, C2 = 0.03^2 on
    [0, 1]); weights default to 0.5 / 0.5 and should sum to one for a zero minimum.
    """

    def __init__(self, window: int = 11, sigma: float = 1.5, weight_a: float = 0.5, weight_b: float = 0.5):
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise UserError(f"ssim window must be odd and >= 1, got {window}")
        self.window, self.sigma = window, sigma
        self.weight_a, self.weight_b = weight_a, weight_b

    def forward(self, a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
        _check(a, b, fused)
        n = a.shape[0]
        s = ssim(torch.cat([fused, fused]), torch.cat([a, b]), self.window, self.sigma)
        return 1.0 - (self.weight_a * s[:n] + self.weight_b * s[n:]).mean()


@LOSS_TERMS.register("exposure")
class ExposureLoss(nn.Module):
    """Well-exposedness fidelity (Mertens, Kautz, Van Reeth 2007), for multi-exposure fusion.

    Per pixel ``w_i = exp(-(I_i - mu)^2 / (2 sigma^2))``, normalized over the two sources
    (computed as a softmax of the exponents, so it never divides 0 by 0), and

    ``L = mean |F - (w_a A + w_b B)| + lambda_b * mean |mean_k(F) - mu|``

    where ``mean_k`` is a sliding box mean of side ``2 * (brightness_window // 2) + 1``
    (replicate border): the optional brightness term (``brightness_weight = lambda_b``,
    default 0, i.e. off) pulls the local mean brightness towards ``mu`` as Zero-DCE's
    exposure-control loss does.
    """

    pixel_fidelity = True

    def __init__(
        self, mu: float = 0.5, sigma: float = 0.2, brightness_weight: float = 0.0, brightness_window: int = 16
    ) -> None:
        super().__init__()
        if sigma <= 0:
            raise UserError(f"exposure sigma must be > 0, got {sigma}")
        self.mu, self.sigma = mu, sigma
        self.brightness_weight, self.brightness_window = brightness_weight, brightness_window

    def weights(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """The normalized well-exposedness weights ``(w_a, w_b)``, summing to one per pixel."""
        logits = torch.stack([a, b]).sub(self.mu).square().div(-2.0 * self.sigma**2)
        w = torch.softmax(logits, dim=0)
        return w[0], w[1]

    def forward(self, a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
        _check(a, b, fused)
        w_a, w_b = self.weights(a, b)
        loss = (fused - (w_a * a + w_b * b)).abs().mean()
        if self.brightness_weight:
            local = box_mean(fused, self.brightness_window // 2)
            loss = loss + self.brightness_weight * (local - self.mu).abs().mean()
        return loss


@LOSS_TERMS.register("focus")
class FocusLoss(nn.Module):
    """Focus fidelity, for multi-focus fusion.

    Focus measure: local energy of the Laplacian, ``f_i = mean_window(lap(I_i)^2)`` over a
    ``window`` x ``window`` box (4-neighbour Laplacian, replicate border). Decision map
    ``m = sigmoid(sharpness * (f_a - f_b) / (f_a + f_b + 1e-8))`` (soft, scale-free; 0.5
    where both are flat) or ``m = [f_a >= f_b]`` (``hard=True``). Then

    ``L = mean |F - (m A + (1 - m) B)| + lambda_g * mean | |grad F| - (m |grad A| + (1 - m) |grad B|) |``

    with Sobel magnitudes ``|gx| + |gy|`` and ``lambda_g = gradient_weight`` (default 1).
    """

    pixel_fidelity = True

    def __init__(
        self, window: int = 7, sharpness: float = 10.0, hard: bool = False, gradient_weight: float = 1.0
    ) -> None:
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise UserError(f"focus window must be odd and >= 1, got {window}")
        self.window, self.sharpness, self.hard = window, sharpness, hard
        self.gradient_weight = gradient_weight

    def decision_map(self, a: Tensor, b: Tensor) -> Tensor:
        """``m`` on [0, 1]: how much the fused pixel should come from ``a``."""
        focus = box_mean(laplacian(torch.cat([a, b])).square(), self.window // 2)
        f_a, f_b = focus.chunk(2)
        if self.hard:
            return (f_a >= f_b).to(a.dtype)
        return torch.sigmoid(self.sharpness * (f_a - f_b) / (f_a + f_b + 1e-8))

    def forward(self, a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
        _check(a, b, fused)
        m = self.decision_map(a, b)
        loss = (fused - (m * a + (1 - m) * b)).abs().mean()
        if self.gradient_weight:
            ga, gb, gf = sobel_magnitude(torch.cat([a, b, fused])).chunk(3)
            loss = loss + self.gradient_weight * (gf - (m * ga + (1 - m) * gb)).abs().mean()
        return loss


@LOSS_TERMS.register("activity")
class ActivityLoss(FocusLoss):
    """Activity-level fidelity, for IR/VIS (and any pair whose salient content differs by source).

    The focus term's formula with a wide window: ``m`` is the soft choice of the source
    with the larger local Laplacian energy over a ``window`` x ``window`` box (default 23,
    sharpness 50), and ``F`` is pulled to ``m A + (1 - m) B`` in intensity and gradient.
    Thermal targets (strong edges in IR) and visible texture (strong edges in VIS) each
    come from the source that carries them, with that source's own contrast. On the 21
    VIFB pairs this rule alone scores MI 7.10, Qabf 0.717, VIF 0.973 (tang definition),
    above every classic baseline on each (``hard=True``, the ir_vis default: 7.45, 0.724,
    0.970). The compact genotype's activity head starts as this rule; training and the
    task guidance move it from there.
    """

    def __init__(
        self, window: int = 23, sharpness: float = 50.0, hard: bool = False, gradient_weight: float = 1.0
    ) -> None:
        super().__init__(window, sharpness, hard, gradient_weight)


class FusionLoss(nn.Module):
    """``L = sum_t w_t L_t(A, B, F)`` over the terms of :data:`LOSS_TERMS` with ``w_t != 0``.

    ``terms`` maps term names to weights (>= 0; 0 disables a term); per-term constructor
    options come from ``options`` (a nested dict) and/or keyword arguments named after the
    term, e.g. ``FusionLoss({"intensity": 1.0, "gradient": 10.0}, options={"intensity":
    {"target": "max"}})`` or ``FusionLoss({...}, intensity={"target": "max"})``.
    ``forward(a, b, fused)`` returns ``(total, parts)`` with ``parts`` the unweighted term
    values, so ``total == sum(weights[t] * parts[t])``.

    ``pixel_only=True`` sums only the pixel-fidelity terms (those whose class sets
    ``pixel_fidelity = True``: intensity, exposure, focus, activity), or every term when the loss has
    none. Training starts with it (``train.fidelity_warmup_steps``): from a random
    initialization whose output is near 0 or negative, the structural and gradient terms
    alone can settle in a contrast-inverted minimum (dark targets on a bright background)
    that the intensity term then cannot leave; a few pixel-only steps first avoid it.
    """

    def __init__(
        self,
        terms: Mapping[str, float],
        options: Mapping[str, Mapping[str, Any]] | None = None,
        **term_options: Mapping[str, Any],
    ) -> None:
        super().__init__()
        merged: dict[str, Mapping[str, Any]] = {**(options or {}), **term_options}
        for name in merged:
            LOSS_TERMS.get(name)  # an unknown name is a UserError listing the known ones
        self.weights: dict[str, float] = {}
        modules: dict[str, nn.Module] = {}
        for name, weight in terms.items():
            cls = LOSS_TERMS.get(name)
            try:
                weight = float(weight)
            except (TypeError, ValueError):
                raise UserError(f"loss term {name!r}: weight must be a number, got {weight!r}") from None
            if not weight >= 0.0 or weight == float("inf"):
                raise UserError(f"loss term {name!r}: weight must be finite and >= 0, got {weight}")
            if weight == 0.0:
                continue
            opts = dict(merged.get(name, {}))
            try:
                modules[name] = cls(**opts)
            except TypeError as err:
                raise UserError(f"loss term {name!r}: bad options {opts}: {err}") from None
            self.weights[name] = weight
        if not modules:
            raise UserError(f"no loss term has a non-zero weight in {dict(terms)}")
        self.terms = nn.ModuleDict(modules)

    def forward(
        self, a: Tensor, b: Tensor, fused: Tensor, pixel_only: bool = False
    ) -> tuple[Tensor, dict[str, Tensor]]:
        parts = {name: term(a, b, fused) for name, term in self.terms.items()}
        pixel = [n for n in parts if getattr(self.terms[n], "pixel_fidelity", False)]
        summed = (pixel or list(parts)) if pixel_only else list(parts)
        total = torch.stack([self.weights[name] * parts[name] for name in summed]).sum()
        return total, parts
