"""Procedural paired fusion data: one seeded scene, two complementary source images and a mask.

Real fusion sets are small and their licences forbid copying them into the project, so
tests, smoke runs and the meta-initialization's pretext tasks need data that can be made
anywhere, deterministically and fast. Each generator renders ONE procedural scene twice,
the way the two sensors of its fusion family see it, so that neither source alone is
complete and a fusion method has something real to combine:

=================  ===============  ==========================================================
family / variant   roles (a, b)     what differs
=================  ===============  ==========================================================
``ir_vis``         ir, vis          IR: warm people/vehicles bright on a smooth cool
                                    background, little texture, sensor noise. VIS: colour,
                                    rich texture and edges, but a dark, hazy night scene in
                                    which objects outside the lamp light are nearly hidden.
``mri_ct``         mri, ct          axial head phantom; MRI (L) shows soft tissue (grey/white
                                    matter, ventricles, lesion), CT (L) shows bright bone.
``mri_pet``        mri, pet         PET (RGB): blurred metabolic activity through a "hot"
                                    colour map, hot spots; registered with the MRI.
``mri_spect``      mri, spect       SPECT (RGB): blurrier, noisier perfusion through a
                                    "rainbow" colour map; registered with the MRI.
``multi_exposure`` under, over      one HDR radiance map through a camera response at two
                                    exposures: under has crushed shadows, over blown highlights.
``multi_focus``    near, far        one sharp layered scene with depth; near blurs the
                                    background, far blurs the foreground (depth-varying blur).
=================  ===============  ==========================================================

Mask classes (0 is always background; later-painted classes overwrite earlier ones):

- ``ir_vis``: 1 person, 2 bicycle, 3 car, 4 road (1..3 match :data:`labels.MSRS_CLASS_IDS`).
- medical variants: 1 bone (skull), 2 scalp / soft tissue, 3 grey matter, 4 white matter,
  5 CSF (ventricles, sulci, fissure), 6 lesion.
- ``multi_exposure``: 1 object, 2 light source (lamps, window: blown out in ``over``),
  3 deep shadow (crushed in ``under``).
- ``multi_focus``: 1 foreground (in focus in ``near``, blurred in ``far``).

Every generator has the signature ``(rng, height, width) -> SyntheticPair`` and uses only
``rng`` for randomness, so a seed fixes the pair. :func:`synthesize` writes a data set in
the layout of the real sets under ``shared/data`` (role folders, ``labels/`` and a
``MANIFEST.tsv``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from timfusion.platform.errors import UserError, check_size, is_integer
from timfusion.platform.registry import Registry
from timfusion.tasks.colour import rgb_to_gray
from timfusion.tasks.imageio import atomic_write_text, is_url, plain_mode, write_image

__all__ = [
    "FAMILIES",
    "MEDICAL_VARIANTS",
    "SyntheticPair",
    "PairGenerator",
    "classes",
    "roles",
    "synthesize",
]


@dataclass(frozen=True)
class SyntheticPair:
    """Two registered source images of one scene plus its object mask.

    ``a`` and ``b`` are float64 on 0..255, shaped (H, W) or (H, W, 3); ``mask`` is a uint8
    (H, W) class map (0 background); ``roles`` names the sources, e.g. ``("ir", "vis")``.
    """

    a: np.ndarray
    b: np.ndarray
    mask: np.ndarray
    roles: tuple[str, str]


PairGenerator = Callable[[np.random.Generator, int, int], SyntheticPair]

FAMILIES: Registry[PairGenerator] = Registry("synthetic generator")

MEDICAL_VARIANTS = ("mri_ct", "mri_pet", "mri_spect")

MIN_SIZE = 16


def roles(family: str) -> tuple[str, str]:
    """The two source roles of a registered family, e.g. ``("under", "over")``."""
    return tuple(FAMILIES.meta(family)["roles"])  # type: ignore[return-value]


def classes(family: str) -> tuple[str, ...]:
    """Class names of a family's mask, indexed by class id (index 0 is ``background``)."""
    return tuple(FAMILIES.meta(family)["classes"])


# --------------------------------------------------------------------------------------
# Drawing helpers
# --------------------------------------------------------------------------------------

Region = tuple[tuple[slice, slice], np.ndarray]


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """White noise smoothed by a Gaussian of about ``sigma`` pixels, zero mean, unit std.

    Wide kernels are made on a coarse grid (sigma 2 there) and interpolated up, which is
    indistinguishable for texture and much faster than a wide filter at full resolution.
    """
    h, w = shape
    if sigma <= 0:
        field = rng.standard_normal(shape)
    elif sigma <= 3:
        field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap", truncate=3.0)
    else:
        factor = sigma / 2.0
        small = (max(int(math.ceil(h / factor)), 1), max(int(math.ceil(w / factor)), 1))
        coarse = ndimage.gaussian_filter(rng.standard_normal(small), 2.0, mode="wrap", truncate=3.0)
        field = ndimage.zoom(coarse, (h / small[0], w / small[1]), order=1, mode="grid-wrap", grid_mode=True)
        field = field[:h, :w]
    return (field - field.mean()) / (field.std() + 1e-12)


def _fractal(
    rng: np.random.Generator, shape: tuple[int, int], sigmas: tuple[float, ...], decay: float = 0.7
) -> np.ndarray:
    """Sum of smoothed noises (coarse ones weighted ``decay`` less each), unit std."""
    total = np.zeros(shape)
    weight = 1.0
    for sigma in sigmas:
        total += weight * _noise(rng, shape, sigma)
        weight *= decay
    return total / (total.std() + 1e-12)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur over the two spatial axes only."""
    if sigma <= 0:
        return image.copy()
    sigmas = (sigma, sigma) + (0.0,) * (image.ndim - 2)
    return ndimage.gaussian_filter(image, sigmas, mode="nearest", truncate=3.0)


def _variable_blur(image: np.ndarray, sigma_map: np.ndarray, levels: int = 3) -> np.ndarray:
    """Spatially varying Gaussian blur: per pixel, interpolate linearly between uniform blurs.

    The uniform blurs span the map's own sigma range and are made incrementally (each one
    blurs the previous by the missing variance), which keeps the kernels short.
    """
    low, high = float(sigma_map.min()), float(sigma_map.max())
    if high < 0.05:
        return image.copy()
    if high - low < 0.05:
        return _blur(image, (low + high) / 2)
    pos = (sigma_map - low) / (high - low) * (levels - 1)
    out = np.zeros_like(image)
    current, previous = image, 0.0
    for k, sigma in enumerate(np.linspace(low, high, levels)):
        current = _blur(current, math.sqrt(max(sigma * sigma - previous * previous, 0.0)))
        previous = sigma
        weight = np.clip(1.0 - np.abs(pos - k), 0.0, None)
        out += (weight[..., None] if image.ndim == 3 else weight) * current
    return out


class _Canvas:
    """Named float layers of one scene painted together, plus the class mask.

    Shapes are anti-aliased coverage maps computed only inside their bounding box. Painting
    a region blends every named layer towards its value (a scalar, a colour, a full-frame
    array sampled inside the box, or an array of the box's own size) by the coverage, and
    writes ``label`` into the mask where the coverage exceeds one half. Surfaces are opaque:
    painting an ``albedo`` without an explicit ``emit`` also hides the emission behind it
    (sky, window) when both layers exist.
    """

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width
        self.layers: dict[str, np.ndarray] = {}
        self.mask = np.zeros((height, width), np.uint8)

    def add(self, name: str, value: float | tuple[float, ...] | np.ndarray, channels: int = 1) -> None:
        shape = (self.height, self.width) if channels == 1 else (self.height, self.width, channels)
        self.layers[name] = np.broadcast_to(np.asarray(value, np.float64), shape).copy()

    def _window(
        self, y0: float, x0: float, y1: float, x1: float
    ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
        """The pixel box covering a shape (one pixel of margin), with its centre coordinates."""
        r0, r1 = max(int(math.floor(y0)) - 1, 0), min(int(math.ceil(y1)) + 1, self.height)
        c0, c1 = max(int(math.floor(x0)) - 1, 0), min(int(math.ceil(x1)) + 1, self.width)
        if r0 >= r1 or c0 >= c1:
            return None
        yy = np.arange(r0, r1, dtype=np.float64)[:, None] + 0.5
        xx = np.arange(c0, c1, dtype=np.float64)[None, :] + 0.5
        return (slice(r0, r1), slice(c0, c1)), yy, xx

    def ellipse(self, cy: float, cx: float, ry: float, rx: float, angle: float = 0.0) -> Region | None:
        ry, rx = max(ry, 0.5), max(rx, 0.5)
        reach = max(ry, rx)
        win = self._window(cy - reach, cx - reach, cy + reach, cx + reach)
        if win is None:
            return None
        sl, yy, xx = win
        dy, dx = yy - cy, xx - cx
        if angle:
            cos, sin = math.cos(angle), math.sin(angle)
            dx, dy = cos * dx + sin * dy, -sin * dx + cos * dy
        dist = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)
        return sl, np.clip((1.0 - dist) * min(rx, ry) + 0.5, 0.0, 1.0)

    def ring(self, cy: float, cx: float, radius: float, thickness: float) -> Region | None:
        win = self._window(cy - radius, cx - radius, cy + radius, cx + radius)
        if win is None:
            return None
        sl, yy, xx = win
        dist = np.hypot(yy - cy, xx - cx)
        half = max(thickness / 2, 0.5)
        return sl, np.clip(half + 0.5 - np.abs(dist - (radius - half)), 0.0, 1.0)

    def rect(self, y0: float, x0: float, y1: float, x1: float, radius: float = 0.0) -> Region | None:
        win = self._window(y0, x0, y1, x1)
        if win is None:
            return None
        sl, yy, xx = win
        half_w, half_h = (x1 - x0) / 2, (y1 - y0) / 2
        radius = min(radius, half_w, half_h)
        qx = np.abs(xx - (x0 + x1) / 2) - half_w + radius
        qy = np.abs(yy - (y0 + y1) / 2) - half_h + radius
        outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)
        return sl, np.clip(0.5 - (outside - radius), 0.0, 1.0)

    def polygon(self, points: list[tuple[float, float]]) -> Region | None:
        """A convex polygon given as (y, x) corners in either winding order."""
        ys, xs = [p[0] for p in points], [p[1] for p in points]
        win = self._window(min(ys), min(xs), max(ys), max(xs))
        if win is None:
            return None
        sl, yy, xx = win
        area = sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(points)))
        sign = 1.0 if area > 0 else -1.0
        inside = np.full(np.broadcast_shapes(yy.shape, xx.shape), np.inf)
        for i in range(len(points)):
            (ya, xa), (yb, xb) = points[i - 1], points[i]
            length = math.hypot(yb - ya, xb - xa) or 1.0
            dist = sign * ((xb - xa) * (yy - ya) - (yb - ya) * (xx - xa)) / length
            inside = np.minimum(inside, -dist)
        return sl, np.clip(inside + 0.5, 0.0, 1.0)

    def line(self, y0: float, x0: float, y1: float, x1: float, width0: float, width1: float) -> Region | None:
        """A tapered segment (a quad) from (y0, x0) with ``width0`` to (y1, x1) with ``width1``."""
        length = math.hypot(y1 - y0, x1 - x0) or 1.0
        ny, nx = (x1 - x0) / length, -(y1 - y0) / length
        h0, h1 = width0 / 2, width1 / 2
        return self.polygon(
            [(y0 + ny * h0, x0 + nx * h0), (y1 + ny * h1, x1 + nx * h1),
             (y1 - ny * h1, x1 - nx * h1), (y0 - ny * h0, x0 - nx * h0)]
        )

    def paint(self, region: Region | None, label: int | None = None, opacity: float = 1.0, **values) -> None:
        if region is None:
            return
        sl, alpha = region
        alpha = alpha * opacity
        if "albedo" in values and "emit" not in values and "emit" in self.layers:
            values["emit"] = 0.0
        for name, value in values.items():
            layer = self.layers[name]
            value = np.asarray(value, np.float64)
            if value.ndim >= 2 and value.shape[:2] != alpha.shape:
                value = value[sl]  # a full-frame array; window-sized ones are used as they are
            target = layer[sl]
            weight = alpha if layer.ndim == 2 else alpha[..., None]
            layer[sl] = target + (value - target) * weight
        if label is not None:
            self.mask[sl][alpha > 0.5] = label

    def scale(self, region: Region | None, name: str, factor: float) -> None:
        """Multiply a layer by ``factor`` under the region (shadows, light pools)."""
        if region is None:
            return
        sl, alpha = region
        layer = self.layers[name]
        weight = alpha if layer.ndim == 2 else alpha[..., None]
        layer[sl] = layer[sl] * (1.0 + (factor - 1.0) * weight)


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    yy = np.arange(height, dtype=np.float64)[:, None] + 0.5
    xx = np.arange(width, dtype=np.float64)[None, :] + 0.5
    return yy, xx


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """One HSV colour (all in 0..1) as an RGB array."""
    k = (np.array([5.0, 3.0, 1.0]) + h * 6.0) % 6.0
    return v - v * s * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _colormap(values: np.ndarray, stops: list[tuple[float, tuple[float, float, float]]]) -> np.ndarray:
    """Map 0..1 values through a piecewise-linear colour map given as (position, rgb) stops."""
    pos = [s[0] for s in stops]
    return np.stack([np.interp(values, pos, [s[1][c] for s in stops]) for c in range(3)], axis=-1)


def _finish(image: np.ndarray) -> np.ndarray:
    return np.clip(image, 0.0, 255.0)


# --------------------------------------------------------------------------------------
# Infrared / visible
# --------------------------------------------------------------------------------------


def _person(canvas: _Canvas, rng: np.random.Generator, foot_y: float, cx: float, height: float,
            skin_temp: float, riding: bool = False) -> None:
    """A standing (or riding) person: head, torso, arms, legs; warm in IR, clothed in VIS."""
    h = height
    shirt = _hsv(rng.random(), rng.uniform(0.2, 0.8), rng.uniform(0.15, 0.8))
    trousers = _hsv(rng.random(), rng.uniform(0.1, 0.6), rng.uniform(0.08, 0.45))
    skin = _hsv(rng.uniform(0.03, 0.09), rng.uniform(0.3, 0.6), rng.uniform(0.35, 0.85))
    cloth_temp = skin_temp - rng.uniform(15, 35)
    top = foot_y - h
    leg_len = 0.47 * h * (0.75 if riding else 1.0)
    hip_y = foot_y - leg_len
    shoulder_y = top + 0.16 * h
    half = 0.13 * h
    stride = rng.uniform(-0.06, 0.06) * h
    for side in (-1, 1):
        canvas.paint(canvas.line(hip_y, cx + side * 0.06 * h, foot_y, cx + side * 0.07 * h + side * stride,
                                 0.11 * h, 0.08 * h),
                     label=1, temp=cloth_temp + 5, albedo=trousers, gain_fine=0.2, gain_med=0.15)
        arm_x = cx + side * (half + 0.02 * h)
        canvas.paint(canvas.line(shoulder_y + 0.02 * h, arm_x, shoulder_y + 0.32 * h,
                                 arm_x + side * rng.uniform(0, 0.08) * h, 0.07 * h, 0.055 * h),
                     label=1, temp=cloth_temp + 8, albedo=shirt, gain_fine=0.2, gain_med=0.15)
    canvas.paint(canvas.rect(shoulder_y, cx - half, hip_y + 0.03 * h, cx + half, radius=0.05 * h),
                 label=1, temp=cloth_temp, albedo=shirt, gain_fine=0.25, gain_med=0.2, irvar=4.0)
    canvas.paint(canvas.ellipse(top + 0.075 * h, cx, 0.075 * h, 0.06 * h),
                 label=1, temp=skin_temp, albedo=skin, gain_fine=0.08, gain_med=0.1)


def _car(canvas: _Canvas, rng: np.random.Generator, foot_y: float, cx: float, height: float) -> None:
    """A car seen from behind or the side: body, cabin, windows, wheels, lights."""
    h = height
    side_view = rng.random() < 0.5
    w = h * (rng.uniform(2.4, 3.0) if side_view else rng.uniform(1.25, 1.45))
    x0, x1 = cx - w / 2, cx + w / 2
    paint_colour = _hsv(rng.random(), rng.uniform(0.0, 0.8), rng.uniform(0.1, 0.85))
    body_temp = rng.uniform(125, 165)
    glass = np.array([0.05, 0.07, 0.09])
    tyre = np.array([0.04, 0.04, 0.04])
    body_top = foot_y - 0.62 * h
    if side_view:
        wheel_r = 0.2 * h
        front = rng.choice([-1, 1])
        cabin = [(foot_y - h, cx - 0.22 * w), (foot_y - h, cx + 0.18 * w),
                 (body_top, cx + 0.32 * w), (body_top, cx - 0.36 * w)]
        if front < 0:
            cabin = [(y, 2 * cx - x) for y, x in cabin]
        canvas.paint(canvas.polygon(cabin), label=3, temp=body_temp - 20, albedo=paint_colour,
                     gain_fine=0.05, gain_med=0.1)
        window = [(y + (0.12 * h if y < body_top else 0.02 * h), cx + (x - cx) * 0.88) for y, x in cabin]
        canvas.paint(canvas.polygon(window), label=3, temp=body_temp - 40, albedo=glass, gain_fine=0.1)
        canvas.paint(canvas.rect(body_top, x0, foot_y - 0.12 * h, x1, radius=0.12 * h), label=3,
                     temp=body_temp, albedo=paint_colour, gain_fine=0.04, gain_med=0.1, irvar=6.0)
        hood_x = cx + front * 0.35 * w
        canvas.paint(canvas.ellipse(foot_y - 0.4 * h, hood_x, 0.22 * h, 0.17 * w), temp=body_temp + 35)
        for wx in (cx - 0.31 * w, cx + 0.31 * w):
            canvas.paint(canvas.ellipse(foot_y - wheel_r, wx, wheel_r, wheel_r), label=3,
                         temp=body_temp + 25, albedo=tyre, gain_fine=0.1)
            canvas.paint(canvas.ellipse(foot_y - wheel_r, wx, 0.45 * wheel_r, 0.45 * wheel_r), label=3,
                         albedo=np.array([0.35, 0.35, 0.37]))
        if rng.random() < 0.7:
            lamp_x = cx + front * 0.47 * w
            canvas.paint(canvas.ellipse(foot_y - 0.45 * h, lamp_x, 0.05 * h, 0.03 * w), label=3,
                         emit=np.array([3.0, 2.8, 2.2]) * rng.uniform(0.5, 1.5))
    else:
        canvas.paint(canvas.rect(foot_y - h, cx - 0.38 * w, body_top + 0.02 * h, cx + 0.38 * w,
                                 radius=0.12 * h),
                     label=3, temp=body_temp - 20, albedo=paint_colour, gain_fine=0.05, gain_med=0.1)
        canvas.paint(canvas.rect(foot_y - 0.93 * h, cx - 0.32 * w, body_top - 0.03 * h, cx + 0.32 * w,
                                 radius=0.05 * h),
                     label=3, temp=body_temp - 45, albedo=glass, gain_fine=0.1)
        for side in (-1, 1):
            canvas.paint(canvas.rect(foot_y - 0.2 * h, cx + side * 0.42 * w - 0.1 * w, foot_y,
                                     cx + side * 0.42 * w + 0.1 * w, radius=0.04 * h),
                         label=3, temp=body_temp + 25, albedo=tyre)
        canvas.paint(canvas.rect(body_top, x0, foot_y - 0.14 * h, x1, radius=0.1 * h), label=3,
                     temp=body_temp, albedo=paint_colour, gain_fine=0.04, gain_med=0.1, irvar=6.0)
        canvas.paint(canvas.ellipse(foot_y - 0.16 * h, cx + 0.25 * w, 0.05 * h, 0.06 * w),
                     temp=body_temp + 60)  # exhaust pipe
        glow = rng.uniform(0.5, 2.0)
        for side in (-1, 1):
            canvas.paint(canvas.rect(body_top + 0.06 * h, cx + side * 0.4 * w - 0.07 * w,
                                     body_top + 0.18 * h, cx + side * 0.4 * w + 0.07 * w),
                         label=3, albedo=np.array([0.5, 0.05, 0.05]), emit=np.array([1.5, 0.1, 0.08]) * glow)


def _bicycle(canvas: _Canvas, rng: np.random.Generator, foot_y: float, cx: float, scale: float) -> None:
    """A side-view bicycle (wheels, frame) with its rider."""
    r = 0.23 * scale
    base = 0.7 * scale
    frame = _hsv(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.3, 0.9))
    thick = max(0.035 * scale, 1.0)
    wheel_y = foot_y - r
    rear, front = cx - base / 2, cx + base / 2
    for wx in (rear, front):
        canvas.paint(canvas.ring(wheel_y, wx, r, 1.6 * thick), label=2, temp=75, albedo=np.array([0.05] * 3))
    seat = (wheel_y - 0.55 * base, cx - 0.12 * base)
    bar = (wheel_y - 0.6 * base, front - 0.08 * base)
    crank = (wheel_y, cx)
    for (ya, xa), (yb, xb) in [((wheel_y, rear), seat), ((wheel_y, rear), crank), (seat, crank),
                               (crank, bar), (seat, bar), (bar, (wheel_y, front))]:
        canvas.paint(canvas.line(ya, xa, yb, xb, thick, thick), label=2, temp=70, albedo=frame)
    _person(canvas, rng, wheel_y + 0.1 * scale, cx - 0.05 * base, 1.15 * scale,
            rng.uniform(215, 240), riding=True)


@FAMILIES.register(
    "ir_vis", roles=("ir", "vis"), classes=("background", "person", "bicycle", "car", "road")
)
def ir_vis(rng: np.random.Generator, height: int, width: int) -> SyntheticPair:
    """A night street: IR sees warm people and cars, VIS sees texture, colour and lamps.

    The scene (sky, trees, buildings, a perspective road with lane markings, people, cars,
    cyclists, street lamps) is painted once into an IR temperature layer and a VIS
    reflectance/emission layer. IR is smooth, optically blurred and noisy; VIS is lit by
    a weak ambient light plus lamp pools, hazed with distance and gamma-encoded, so it is
    dark and objects away from the lamps are nearly invisible in it.
    """
    h, w = height, width
    c = _Canvas(h, w)
    yy, xx = _grid(h, w)
    horizon = h * rng.uniform(0.3, 0.45)
    ground = np.broadcast_to(np.clip((yy - horizon) / (h - horizon), 0.0, 1.0), (h, w))

    sky_temp = 15 + 20 * np.clip(yy / horizon, 0, 1)
    c.add("temp", np.broadcast_to(sky_temp, (h, w)))
    c.add("irvar", 2.0)
    c.add("albedo", 0.0, 3)
    sky_top, sky_low = np.array([0.02, 0.03, 0.08]), np.array([0.12, 0.09, 0.09]) * rng.uniform(0.7, 1.5)
    sky = sky_top + (sky_low - sky_top) * np.clip(yy / horizon, 0, 1)[..., None]
    c.add("emit", np.broadcast_to(sky, (h, w, 3)), 3)
    c.add("gain_fine", 0.0)
    c.add("gain_med", 0.1)

    grass = _hsv(rng.uniform(0.15, 0.3), rng.uniform(0.3, 0.7), rng.uniform(0.25, 0.45))
    below = c.rect(horizon, -2, h + 2, w + 2)
    c.paint(below, temp=55 + 10 * ground, albedo=grass, gain_fine=0.3, gain_med=0.25, irvar=5.0)

    # Skyline: buildings with window grids, and trees.
    x = rng.uniform(-0.1, 0.05) * w
    while x < w:
        bw = rng.uniform(0.08, 0.22) * w
        if rng.random() < 0.6:
            bh = rng.uniform(0.08, 0.28) * h
            region = c.rect(horizon - bh, x, horizon + 0.01 * h, x + bw)
            facade = _hsv(rng.random(), rng.uniform(0.05, 0.3), rng.uniform(0.2, 0.6))
            c.paint(region, temp=rng.uniform(70, 100), albedo=facade, emit=0.0, gain_fine=0.2, gain_med=0.2,
                    irvar=3.0)
            if region is not None:
                sl, alpha = region
                pitch_y, pitch_x = max(0.025 * h, 3.0), max(0.03 * w, 3.0)
                gy, gx = yy[sl[0]] - (horizon - bh), xx[:, sl[1]] - x
                cells = (np.floor(gy / pitch_y).astype(int) * 7919 + np.floor(gx / pitch_x).astype(int))
                hashed = (np.sin(cells * 12.9898 + rng.uniform(0, 100)) * 43758.5453) % 1.0
                lit = hashed < rng.uniform(0.1, 0.5)  # a random subset of windows is lit
                pane = ((gy % pitch_y) < 0.55 * pitch_y) & ((gx % pitch_x) < 0.5 * pitch_x)
                pane = pane & (gy > 0.3 * pitch_y) & (alpha > 0.99)
                c.paint((sl, pane * 1.0), albedo=np.array([0.08, 0.09, 0.12]), temp=rng.uniform(60, 80))
                c.paint((sl, (pane & lit) * 1.0), emit=np.array([1.6, 1.25, 0.7]) * rng.uniform(0.6, 1.3))
        else:
            r = rng.uniform(0.04, 0.09) * w
            trunk = c.rect(horizon - 0.6 * r, x + bw / 2 - 0.1 * r, horizon + 0.02 * h, x + bw / 2 + 0.1 * r)
            c.paint(trunk, temp=60, albedo=np.array([0.15, 0.1, 0.06]), emit=0.0, gain_fine=0.3)
            leaves = _hsv(rng.uniform(0.2, 0.4), rng.uniform(0.4, 0.8), rng.uniform(0.1, 0.3))
            for _ in range(4):
                c.paint(c.ellipse(horizon - 1.2 * r + rng.uniform(-0.4, 0.4) * r,
                                  x + bw / 2 + rng.uniform(-0.5, 0.5) * r, r * rng.uniform(0.6, 1.0),
                                  r * rng.uniform(0.7, 1.1)),
                        temp=45, albedo=leaves, emit=0.0, gain_fine=0.6, gain_med=0.3, irvar=3.0)
        x += bw + rng.uniform(0.0, 0.08) * w

    # Road in perspective, with edge lines and a dashed centre line.
    vp_x = w * rng.uniform(0.35, 0.65)
    left_b, right_b = w * rng.uniform(-0.25, 0.2), w * rng.uniform(0.8, 1.25)
    road_top = horizon + 0.004 * h

    def at(y: float, x_bottom: float) -> float:
        return vp_x + (x_bottom - vp_x) * (y - horizon) / (h - horizon)

    c.paint(c.polygon([(road_top, at(road_top, left_b)), (road_top, at(road_top, right_b)),
                       (h + 1, at(h + 1, right_b)), (h + 1, at(h + 1, left_b))]),
            label=4, temp=80 + 10 * ground, albedo=np.array([0.2, 0.2, 0.21]) * rng.uniform(0.7, 1.3),
            gain_fine=0.25, gain_med=0.15, irvar=3.0)
    road_w = right_b - left_b
    marking = np.array([0.85, 0.85, 0.8])
    for xb in (left_b + 0.04 * road_w, right_b - 0.04 * road_w):
        c.paint(c.line(h + 1, xb, road_top, at(road_top, xb), 0.012 * road_w, 0.0), label=4,
                albedo=marking, temp=84)
    z_near = 1.0
    z = z_near + rng.uniform(0, 1.5)
    mid = (left_b + right_b) / 2
    while z < 60:
        ya, yb = horizon + (h - horizon) * z_near / z, horizon + (h - horizon) * z_near / (z + 1.0)
        c.paint(c.line(ya, at(ya, mid), yb, at(yb, mid), 0.012 * road_w * z_near / z,
                       0.012 * road_w * z_near / (z + 1.0)),
                label=4, albedo=marking, temp=84)
        z += 2.5

    # Objects and street lamps, far to near so that near ones occlude far ones.
    objects = []
    for _ in range(int(rng.integers(1, 5))):
        foot = horizon + (h - horizon) * rng.uniform(0.12, 0.95)
        objects.append(("person", foot, w * rng.uniform(0.03, 0.97)))
    for _ in range(int(rng.integers(1, 4))):
        foot = horizon + (h - horizon) * rng.uniform(0.08, 0.6)
        objects.append(("car", foot, at(foot, left_b + road_w * rng.uniform(0.25, 0.75))))
    for _ in range(int(rng.integers(0, 2))):
        foot = horizon + (h - horizon) * rng.uniform(0.15, 0.8)
        objects.append(("bicycle", foot, at(foot, left_b + road_w * rng.uniform(0.1, 0.9))))
    for _ in range(int(rng.integers(1, 4))):
        objects.append(("lamp", horizon + (h - horizon) * rng.uniform(0.04, 0.3), w * rng.uniform(0.0, 1.0)))
    min_scale = 8.0 / 1.15
    illum = np.full((h, w), rng.uniform(0.05, 0.14))  # weak ambient light, plus lamp pools
    lamps = []
    for kind, foot, cx in sorted(objects, key=lambda o: o[1]):
        scale = max(foot - horizon, min_scale)
        if kind == "person":
            _person(c, rng, foot, cx, 1.15 * scale * rng.uniform(0.9, 1.1), rng.uniform(215, 245))
        elif kind == "car":
            _car(c, rng, foot, cx, 0.95 * scale)
        elif kind == "bicycle":
            _bicycle(c, rng, foot, cx, scale)
        else:  # a street lamp: pole, glowing head, and a pool of light on the ground
            top = foot - 3.0 * scale
            c.paint(c.rect(top, cx - 0.03 * scale, foot, cx + 0.03 * scale), temp=50,
                    albedo=np.array([0.2, 0.2, 0.2]))
            c.paint(c.ellipse(top, cx, 0.08 * scale, 0.2 * scale), temp=140, emit=np.array([6.0, 5.0, 3.5]))
            lamps.append((top, cx, scale))
            spread = 1.8 * scale + 0.05 * w
            illum += rng.uniform(1.0, 2.5) * np.exp(
                -(((xx - cx) / spread) ** 2) - (((yy - foot) / (0.5 * spread)) ** 2)
            )

    layers = c.layers
    # IR: smooth temperature texture, optics blur, fixed-pattern and sensor noise.
    ir = layers["temp"] + layers["irvar"] * _noise(rng, (h, w), 3.0 * max(h, w) / 256)
    ir = _blur(ir, rng.uniform(1.0, 1.5) * max(1.0, max(h, w) / 256))  # IR optics are soft
    ir += 6.0 * _noise(rng, (h, w), 40.0 * max(h, w) / 256)
    ir += rng.uniform(0.3, 1.0) * _noise(rng, (1, w), 0)  # column fixed-pattern noise
    ir += rng.uniform(1.0, 2.0) * rng.standard_normal((h, w))

    # VIS: textured reflectance x illumination + emission, lamp glow, haze, dark gamma.
    fine, med = _noise(rng, (h, w), 0.8), _fractal(rng, (h, w), (1.5, 3.0, 6.0))
    albedo = layers["albedo"] * np.clip(1.0 + layers["gain_fine"][..., None] * fine[..., None]
                                        + layers["gain_med"][..., None] * med[..., None], 0.0, None)
    radiance = albedo * illum[..., None] + layers["emit"]
    for top, lx, scale in lamps:
        radiance += np.array([0.5, 0.42, 0.3]) * np.exp(
            -((xx - lx) ** 2 + (yy - top) ** 2) / (2 * (0.6 * scale + 2) ** 2)
        )[..., None]
    t_far, t_near = rng.uniform(0.45, 0.7), rng.uniform(0.8, 0.95)
    transmission = (t_far + (t_near - t_far) * np.sqrt(ground))[..., None]
    airlight = np.array([0.1, 0.1, 0.12]) * rng.uniform(0.5, 1.2)
    radiance = radiance * transmission + airlight * (1 - transmission)
    exposure, gamma = rng.uniform(0.5, 0.9), rng.uniform(1.2, 1.6)
    vis = np.clip(radiance * exposure, 0.0, 1.0) ** (1 / gamma) * 255
    vis += rng.uniform(1.5, 3.0) * rng.standard_normal((h, w, 1)) + 0.8 * rng.standard_normal((h, w, 3))
    return SyntheticPair(_finish(ir), _finish(vis), c.mask, ("ir", "vis"))


# --------------------------------------------------------------------------------------
# Medical
# --------------------------------------------------------------------------------------

_BONE, _SCALP, _GREY, _WHITE, _CSF, _LESION = 1, 2, 3, 4, 5, 6
_MEDICAL_CLASSES = ("background", "bone", "scalp", "grey_matter", "white_matter", "csf", "lesion")


def _head_phantom(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """An axial head slice: (tissue class map, boolean map of the skull's spongy diploe).

    Nested ellipses with angular wobble give scalp, skull (with its spongy diploe),
    a thin CSF layer, a folded cortex (grey matter with sulci), white matter reaching into
    the gyri, lateral ventricles, a midline fissure, deep grey nuclei and maybe a lesion.
    """
    yy, xx = _grid(h, w)
    size = min(h, w) / 2
    cy, cx = h / 2 + rng.uniform(-0.03, 0.03) * h, w / 2 + rng.uniform(-0.03, 0.03) * w
    angle = rng.uniform(-0.15, 0.15)
    cos, sin = math.cos(angle), math.sin(angle)
    u0, v0 = (xx - cx) / size, (yy - cy) / size
    u, v = cos * u0 + sin * v0, -sin * u0 + cos * v0
    ry, rx = rng.uniform(0.85, 0.93), rng.uniform(0.68, 0.76)
    theta = np.arctan2(v, u)
    dist = np.sqrt((u / rx) ** 2 + (v / ry) ** 2)

    angles = np.linspace(-np.pi, np.pi, 1025)

    def periodic(k: int, amp: float) -> np.ndarray:
        """A smooth random function of the angle (k Fourier terms), sampled on the frame."""
        phases = rng.uniform(0, 2 * np.pi, k)
        weights = rng.uniform(0.5, 1.0, k)
        table = sum(weights[i] * np.cos((i + 2) * angles + phases[i]) / (i + 1) for i in range(k))
        return amp * np.interp(theta, angles, table)

    skull_out = 0.95 + periodic(3, 0.008)
    skull_in = 0.86 + periodic(3, 0.012)
    brain_out = 0.835 + periodic(3, 0.008)
    # Gyri: a folding wave whose phase and depth wander with the angle. Sulci are narrow
    # CSF crevices where the wave peaks; white matter reaches up into each gyrus, leaving a
    # grey-matter ribbon of roughly constant thickness under the surface.
    lobes = int(rng.integers(26, 40))
    bend = periodic(4, 2.0) * np.clip((brain_out - dist) / 0.1, 0, 1.5)  # curved sulci
    fold = np.cos(lobes * theta + rng.uniform(0, 2 * np.pi) + periodic(6, 3.0) + bend)
    depth = 0.08 + np.abs(periodic(5, 0.05))
    crevice = np.clip((fold - 0.75) / 0.25, 0, 1)
    sulcus = brain_out - depth * np.sqrt(crevice)
    cortex = rng.uniform(0.03, 0.045)
    white_edge = brain_out - cortex - (depth + 0.3 * cortex) * ((fold + 1) / 2) ** 3

    tissue = np.zeros((h, w), np.uint8)
    tissue[dist < 1.0] = _SCALP
    tissue[dist < skull_out] = _BONE
    tissue[dist < skull_in] = _CSF
    tissue[dist < sulcus] = _GREY
    tissue[dist < white_edge] = _WHITE
    diploe = (dist < skull_out - 0.025) & (dist > skull_in + 0.025)

    # Midline fissure (front and back).
    fissure = (np.abs(u) < 0.012 + 0.005 * rng.random()) & (np.abs(v) > 0.3) & (dist < skull_in)
    tissue[fissure] = _CSF

    # Deep grey nuclei, then the ventricles between them.
    for side in (-1, 1):
        for cyv, cxv, ryv, rxv in ((0.05, 0.2, 0.12, 0.07), (-0.1, 0.17, 0.09, 0.05)):
            du, dv = u - side * cxv * rx, v - cyv
            tissue[(du / rxv) ** 2 + (dv / ryv) ** 2 < 1] = _GREY
    spread = rng.uniform(0.07, 0.11)
    vsize = rng.uniform(0.8, 1.3)
    for side in (-1, 1):
        tilt = side * rng.uniform(0.1, 0.3)
        du, dv = u - side * spread, v + 0.02
        du, dv = math.cos(tilt) * du + math.sin(tilt) * dv, -math.sin(tilt) * du + math.cos(tilt) * dv
        horn = (du / (0.045 * vsize)) ** 2 + (dv / (0.26 * vsize)) ** 2 < 1
        tissue[horn] = _CSF
        du2, dv2 = u - side * (spread + 0.04), v - 0.2 * vsize
        tissue[(du2 / (0.06 * vsize)) ** 2 + (dv2 / (0.07 * vsize)) ** 2 < 1] = _CSF
    tissue[(np.abs(u) < 0.015) & (np.abs(v - 0.02) < 0.08)] = _CSF

    if rng.random() < 0.7:
        r = rng.uniform(0.3, 0.6)
        a = rng.uniform(0, 2 * np.pi)
        lu, lv = r * rx * math.cos(a), r * ry * math.sin(a)
        lr = rng.uniform(0.05, 0.12)
        lobe = ((u - lu) / lr) ** 2 + ((v - lv) / (lr * rng.uniform(0.7, 1.3))) ** 2
        lobe = lobe * (1 + 0.25 * np.cos(3 * np.arctan2(v - lv, u - lu) + rng.uniform(0, 6)))
        tissue[(lobe < 1) & (dist < brain_out)] = _LESION
    return tissue, diploe


def _mri(rng: np.random.Generator, tissue: np.ndarray, diploe: np.ndarray) -> np.ndarray:
    """T1- or T2-weighted MRI: soft-tissue contrast, dark cortical bone, bias field, Rician noise."""
    h, w = tissue.shape
    scale = min(h, w) / 256
    if rng.random() < 0.5:  # T1: white matter brighter than grey, CSF dark
        table = {0: 0, _SCALP: 150, _BONE: 22, _CSF: 30, _GREY: 100, _WHITE: 150, _LESION: 62}
        marrow = 120
    else:  # T2: CSF bright, white matter darker than grey
        table = {0: 0, _SCALP: 115, _BONE: 18, _CSF: 225, _GREY: 140, _WHITE: 88, _LESION: 205}
        marrow = 80
    lut = np.array([table[k] * rng.uniform(0.92, 1.08) if k else 0.0 for k in range(7)])
    image = lut[tissue]
    image[diploe] = marrow * rng.uniform(0.9, 1.1)
    inside = tissue > 0
    image += inside * 6.0 * _fractal(rng, (h, w), (1.0 * scale, 3.0 * scale))
    image = _blur(image, 0.7 * scale)
    image *= 1.0 + 0.12 * _noise(rng, (h, w), 60 * scale)
    sigma = rng.uniform(2.0, 4.0)
    noisy = np.hypot(image + sigma * rng.standard_normal((h, w)), sigma * rng.standard_normal((h, w)))
    return _finish(noisy)


def _ct(rng: np.random.Generator, tissue: np.ndarray, diploe: np.ndarray) -> np.ndarray:
    """CT in a bone-friendly window: bright skull, grey almost uniform soft tissue, black air."""
    h, w = tissue.shape
    scale = min(h, w) / 256
    table = {0: 0, _SCALP: 72, _BONE: 248, _CSF: 52, _GREY: 80, _WHITE: 76,
             _LESION: rng.choice([60.0, 95.0])}
    lut = np.array([table[k] * (rng.uniform(0.95, 1.03) if k else 0.0) for k in range(7)])
    image = lut[tissue]
    porous = _noise(rng, (h, w), 0.8 * scale)
    image[diploe] = 200 + 25 * porous[diploe]
    image = _blur(image, 0.6 * scale)
    image += 2.0 * rng.standard_normal((h, w)) * (tissue > 0)
    return _finish(image)


def _functional(rng: np.random.Generator, tissue: np.ndarray, kind: str) -> np.ndarray:
    """PET (FDG metabolism, hot map) or SPECT (perfusion, rainbow map) as RGB on 0..255."""
    h, w = tissue.shape
    scale = min(h, w) / 256
    if kind == "pet":
        act = np.array([0, 0.05, 0.12, 1.0, 0.35, 0.04, rng.uniform(1.6, 2.2)])
        blur, noise_level = 3.0, 0.04
        stops = [(0.0, (0, 0, 0)), (0.35, (0.75, 0.05, 0)), (0.65, (1, 0.55, 0)), (0.9, (1, 1, 0.4)),
                 (1.0, (1, 1, 1))]
    else:
        act = np.array([0, 0.02, 0.05, 1.0, 0.45, 0.0, rng.choice([0.2, 1.7])])
        blur, noise_level = 4.5, 0.08
        stops = [(0.0, (0, 0, 0)), (0.2, (0.1, 0.0, 0.5)), (0.4, (0, 0.4, 1)), (0.55, (0, 0.85, 0.3)),
                 (0.72, (1, 1, 0)), (0.88, (1, 0.3, 0)), (1.0, (1, 0.95, 0.9))]
    activity = act[tissue] * (1.0 + 0.2 * _noise(rng, (h, w), 8 * scale))
    yy, xx = _grid(h, w)
    cortex = np.argwhere(tissue == _GREY)
    for _ in range(int(rng.integers(2, 6))):
        if len(cortex) == 0:
            break
        py, px = cortex[rng.integers(len(cortex))]
        r = rng.uniform(5, 12) * scale
        activity += rng.uniform(0.3, 0.8) * np.exp(-((yy - py) ** 2 + (xx - px) ** 2) / (2 * r * r))
    activity *= tissue > 0
    activity += noise_level * _noise(rng, (h, w), 1.2 * scale) * (tissue > 0)
    activity = _blur(activity, blur * scale)
    level = np.clip(activity / (np.percentile(activity, 99.7) + 1e-9) * rng.uniform(0.85, 1.0), 0.0, 1.0)
    return _finish(_colormap(level, stops) * 255)


def _medical(variant: str) -> PairGenerator:
    other = variant.split("_")[1]

    def generate(rng: np.random.Generator, height: int, width: int) -> SyntheticPair:
        tissue, diploe = _head_phantom(rng, height, width)
        mri = _mri(rng, tissue, diploe)
        if other == "ct":
            second = _ct(rng, tissue, diploe)
        else:
            second = _functional(rng, tissue, other)
        return SyntheticPair(mri, second, tissue, ("mri", other))

    generate.__name__ = variant
    generate.__qualname__ = variant
    generate.__doc__ = (
        f"Axial head phantom seen by MRI (L, soft tissue) and {other.upper()} "
        + ("(L, bright bone, flat soft tissue)." if other == "ct" else "(RGB colour-mapped function).")
    )
    return generate


for _variant in MEDICAL_VARIANTS:
    FAMILIES.register(_variant, roles=("mri", _variant.split("_")[1]), classes=_MEDICAL_CLASSES)(
        _medical(_variant)
    )


# --------------------------------------------------------------------------------------
# Multi-exposure
# --------------------------------------------------------------------------------------


def _crf(exposed: np.ndarray, black: float, gamma: float) -> np.ndarray:
    """Camera response: subtract the black level, clip to the sensor range, gamma-encode."""
    linear = np.clip((exposed - black) / (1.0 - black), 0.0, 1.0)
    return 255.0 * linear ** (1.0 / gamma)


@FAMILIES.register(
    "multi_exposure", roles=("under", "over"), classes=("background", "object", "light", "shadow")
)
def multi_exposure(rng: np.random.Generator, height: int, width: int) -> SyntheticPair:
    """A room with a bright window, lamps and deep shadows, shot at two exposures.

    The HDR radiance (reflectance x illumination + emitters) spans about four decades.
    The camera response applies a black level, clipping and a gamma curve; ``under`` is
    exposed 2-3.5 stops below the mid-grey exposure (shadows crush to 0), ``over`` 1-2.2
    stops above it (window and lamps blow out to 255). Both are RGB.
    """
    h, w = height, width
    c = _Canvas(h, w)
    yy, xx = _grid(h, w)
    floor_y = h * rng.uniform(0.55, 0.75)
    wall = _hsv(rng.random(), rng.uniform(0.05, 0.4), rng.uniform(0.45, 0.8))
    c.add("albedo", wall, 3)
    c.add("gain", 0.25)
    c.add("emit", 0.0, 3)
    c.add("illum", 1.0)
    wood = _hsv(rng.uniform(0.05, 0.1), rng.uniform(0.4, 0.7), rng.uniform(0.25, 0.5))
    planks = 0.15 * np.sin(xx / (w * rng.uniform(0.01, 0.03)) + 3 * _noise(rng, (h, w), 4.0)) + 1.0
    c.paint(c.rect(floor_y, -2, h + 2, w + 2), albedo=wood[None, None, :] * planks[..., None], gain=0.35)
    c.layers["illum"] *= 0.4 + 1.2 * np.clip(1 - xx / w * rng.uniform(0.5, 1.2), 0, 1)

    # A window onto a bright sky with clouds (a light source).
    if rng.random() < 0.85:
        wx0, wy0 = w * rng.uniform(0.05, 0.6), h * rng.uniform(0.05, 0.2)
        ww, wh = w * rng.uniform(0.2, 0.35), (floor_y - wy0) * rng.uniform(0.45, 0.8)
        sky = np.array([0.6, 0.75, 1.0])[None, None, :] * np.clip(
            1.0 + 0.35 * _fractal(rng, (h, w), (3, 6, 12)), 0.3, None
        )[..., None]
        c.paint(c.rect(wy0, wx0, wy0 + wh, wx0 + ww), label=2, emit=sky * rng.uniform(15, 40), albedo=0.0)
        bar = max(0.012 * w, 1.5)
        frame = np.array([0.9, 0.9, 0.88])
        c.paint(c.rect(wy0, wx0 + ww / 2 - bar / 2, wy0 + wh, wx0 + ww / 2 + bar / 2), label=0, emit=0.0,
                albedo=frame)
        c.paint(c.rect(wy0 + wh / 2 - bar / 2, wx0, wy0 + wh / 2 + bar / 2, wx0 + ww), label=0, emit=0.0,
                albedo=frame)
        # sunlight patch on the floor
        c.scale(c.polygon([(floor_y + 0.1 * (h - floor_y), wx0), (floor_y + 0.1 * (h - floor_y), wx0 + ww),
                           (h, wx0 + ww * 1.6), (h, wx0 + ww * 0.4)]), "illum", rng.uniform(4, 10))

    # Furniture-like objects with cast shadows drawn first so objects cover their own shadow.
    for _ in range(int(rng.integers(3, 7))):
        ow, oh = w * rng.uniform(0.08, 0.3), h * rng.uniform(0.1, 0.4)
        ox = w * rng.uniform(-0.05, 0.95)
        base = floor_y + (h - floor_y) * rng.uniform(0.1, 0.9)
        direction = rng.choice([-1, 1])
        c.scale(c.polygon([(base, ox), (base, ox + ow), (base + 0.3 * oh, ox + ow + direction * 0.6 * ow),
                           (base + 0.3 * oh, ox + direction * 0.6 * ow)]), "illum", rng.uniform(0.005, 0.03))
        c.paint(c.polygon([(base, ox), (base, ox + ow), (base + 0.3 * oh, ox + ow + direction * 0.6 * ow),
                           (base + 0.3 * oh, ox + direction * 0.6 * ow)]), label=3)
        colour = _hsv(rng.random(), rng.uniform(0.2, 0.9), rng.uniform(0.2, 0.9))
        if rng.random() < 0.5:
            region = c.rect(base - oh, ox, base, ox + ow, radius=rng.uniform(0, 0.2) * ow)
        else:
            region = c.ellipse(base - oh / 2, ox + ow / 2, oh / 2, ow / 2)
        c.paint(region, label=1, albedo=colour, gain=rng.uniform(0.2, 0.6))

    # A dark corner / under-furniture region.
    cx0 = rng.choice([0.0, w * rng.uniform(0.6, 0.8)])
    c.scale(c.rect(floor_y - 0.2 * h, cx0 - 0.1 * w, h + 2, cx0 + w * rng.uniform(0.2, 0.4)),
            "illum", rng.uniform(0.01, 0.04))
    c.paint(c.rect(floor_y - 0.2 * h, cx0 - 0.1 * w, h + 2, cx0 + w * rng.uniform(0.15, 0.2)), label=3)

    # Lamps: a glowing shade, a very bright bulb and a halo of light on the wall.
    for _ in range(int(rng.integers(1, 4))):
        lx, ly = w * rng.uniform(0.1, 0.9), h * rng.uniform(0.1, floor_y / h - 0.1)
        size = min(h, w) * rng.uniform(0.04, 0.09)
        warm = np.array([1.0, 0.8, 0.55])
        halo = np.exp(-((xx - lx) ** 2 + (yy - ly) ** 2) / (2 * (4 * size) ** 2))
        c.layers["illum"] += rng.uniform(2, 6) * halo
        c.paint(c.polygon([(ly - size, lx - 0.6 * size), (ly - size, lx + 0.6 * size),
                           (ly + 0.5 * size, lx + 1.2 * size), (ly + 0.5 * size, lx - 1.2 * size)]),
                label=2, emit=warm * rng.uniform(40, 120), albedo=0.0)
        c.paint(c.ellipse(ly + 0.6 * size, lx, 0.45 * size, 0.45 * size), label=2,
                emit=warm * rng.uniform(300, 900), albedo=0.0)

    layers = c.layers
    texture = _fractal(rng, (h, w), (1.2, 2.5, 5.0))
    albedo = layers["albedo"] * np.clip(1.0 + layers["gain"] * texture, 0.05, None)[..., None]
    radiance = albedo * layers["illum"][..., None] + layers["emit"]
    grey = radiance.mean(axis=-1)
    mid = 0.18 / (np.median(grey) + 1e-9)
    gamma = rng.uniform(2.0, 2.4)
    black = rng.uniform(0.003, 0.008)
    shots = []
    for stops in (-rng.uniform(2.0, 3.5), rng.uniform(1.0, 2.2)):
        exposed = radiance * mid * 2.0**stops
        shot = 0.004 * np.sqrt(exposed) * rng.standard_normal((h, w, 3))
        exposed = exposed + shot + 0.002 * rng.standard_normal((h, w, 3))
        shots.append(_crf(exposed, black, gamma))
    return SyntheticPair(shots[0], shots[1], c.mask, ("under", "over"))


# --------------------------------------------------------------------------------------
# Multi-focus
# --------------------------------------------------------------------------------------


def _textured(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A colourful RGB texture (0..1) with both fine detail and edges."""
    base = _hsv(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.4, 0.9))
    other = _hsv(rng.random(), rng.uniform(0.3, 0.9), rng.uniform(0.2, 0.9))
    mix = np.clip(0.5 + 0.5 * _fractal(rng, (h, w), (1.0, 2.5, 6.0)), 0, 1)[..., None]
    image = base * (1 - mix) + other * mix
    kind = rng.integers(3)
    yy, xx = _grid(h, w)
    period = min(h, w) * rng.uniform(0.03, 0.08)
    if kind == 0:
        pattern = (np.floor(yy / period) + np.floor(xx / period)) % 2
    elif kind == 1:
        a = rng.uniform(0, np.pi)
        pattern = (np.sin((xx * math.cos(a) + yy * math.sin(a)) / period * np.pi) > 0) * 1.0
    else:
        pattern = (_noise(rng, (h, w), 1.2) > 0.3) * 1.0
    grain = 0.06 * _noise(rng, (h, w), 0.5)[..., None]
    return np.clip(image * (0.7 + 0.45 * pattern[..., None]) + grain, 0, 1)


@FAMILIES.register("multi_focus", roles=("near", "far"), classes=("background", "foreground"))
def multi_focus(
    rng: np.random.Generator, height: int, width: int, grayscale: bool | None = None
) -> SyntheticPair:
    """Foreground objects before a textured, slanted background, focused near and far.

    The scene is two layers: a background plane whose depth varies across the frame and
    foreground objects (with a coverage alpha) at a small depth. A camera focused at depth
    f blurs each layer with sigma proportional to |depth - f|, the background with a
    spatially varying blur; the blurred foreground is composited over the background, so
    its defocused edges bleed as they do in real lenses. ``grayscale=None`` draws it at
    random (a quarter of pairs, as in MFIFB); True/False forces it.
    """
    h, w = height, width
    scale = min(h, w) / 256
    c = _Canvas(h, w)
    background = _textured(rng, h, w)
    c.add("colour", background, 3)
    for _ in range(int(rng.integers(8, 20))):
        cy, cx = h * rng.random(), w * rng.random()
        size = min(h, w) * rng.uniform(0.03, 0.15)
        region = (c.rect(cy - size, cx - size * rng.uniform(0.5, 2), cy + size, cx + size)
                  if rng.random() < 0.5 else c.ellipse(cy, cx, size, size * rng.uniform(0.5, 2)))
        c.paint(region, colour=_hsv(rng.random(), rng.uniform(0.2, 1), rng.uniform(0.2, 1)))
    background = c.layers["colour"]

    fg = _Canvas(h, w)
    fg.add("alpha", 0.0)
    fg.add("colour", 0.0, 3)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = h * rng.uniform(0.2, 0.8), w * rng.uniform(0.15, 0.85)
        ry, rx = h * rng.uniform(0.12, 0.3), w * rng.uniform(0.1, 0.25)
        shape = rng.integers(3)
        if shape == 0:
            region = fg.ellipse(cy, cx, ry, rx, rng.uniform(-0.5, 0.5))
        elif shape == 1:
            region = fg.rect(cy - ry, cx - rx, cy + ry, cx + rx, radius=rng.uniform(0, 0.4) * min(rx, ry))
        else:
            n = int(rng.integers(3, 7))
            jitter = rng.uniform(-0.25, 0.25, n)
            angles = (np.arange(n) + jitter) * (2 * np.pi / n) + rng.uniform(0, 2 * np.pi)
            region = fg.polygon([(cy + ry * math.sin(a), cx + rx * math.cos(a)) for a in angles])
        if region is not None:
            fg.paint(region, label=1, alpha=1.0, colour=_textured(rng, *region[1].shape))
    if grayscale is None:
        grayscale = bool(rng.random() < 0.25)
    alpha = fg.layers["alpha"]
    if grayscale:
        background = rgb_to_gray(background)
        layered = np.stack([rgb_to_gray(fg.layers["colour"]) * alpha, alpha], axis=-1)
    else:
        layered = np.concatenate([fg.layers["colour"] * alpha[..., None], alpha[..., None]], axis=-1)

    yy, xx = _grid(h, w)
    tilt = rng.uniform(-1, 1, 2)
    bg_depth = 0.8 + 0.15 * np.clip(tilt[0] * (yy / h - 0.5) + tilt[1] * (xx / w - 0.5), -1, 1)
    fg_depth = rng.uniform(0.05, 0.15)
    strength = rng.uniform(4.0, 7.0) * scale
    shots = []
    for focus in (fg_depth, float(np.median(bg_depth))):
        bg = _variable_blur(background, strength * np.abs(bg_depth - focus))
        blurred = _blur(layered, strength * abs(fg_depth - focus))
        premult, cover = blurred[..., :-1], blurred[..., -1:]
        if grayscale:
            premult, cover = premult[..., 0], cover[..., 0]
        shot = (premult + (1 - cover) * bg) * 255.0
        shots.append(_finish(shot + 0.8 * rng.standard_normal(shot.shape)))
    return SyntheticPair(shots[0], shots[1], fg.mask, ("near", "far"))


# --------------------------------------------------------------------------------------
# Writing a data set
# --------------------------------------------------------------------------------------

MANIFEST_COLUMNS = ("pair", "a_path", "b_path", "label_path", "a_size", "a_mode", "b_size", "b_mode",
                    "task", "split")
VAL_FRACTION = 0.2


def _mode(image: np.ndarray) -> str:
    return "L" if image.ndim == 2 else "RGB"


def _check_pair(name: str, pair: SyntheticPair, height: int, width: int) -> None:
    for label, image in (("a", pair.a), ("b", pair.b)):
        if image.shape[:2] != (height, width) or image.ndim not in (2, 3):
            raise ValueError(f"generator {name!r} returned {label} of shape {image.shape}")
    if pair.mask.shape != (height, width) or pair.mask.dtype != np.uint8:
        raise ValueError(f"generator {name!r} returned a mask of shape {pair.mask.shape}, {pair.mask.dtype}")


def _old_manifest_paths(manifest: Path) -> set[str]:
    """Relative file paths an existing manifest names (best effort; empty if unreadable)."""
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return set()
    if not lines:
        return set()
    header = lines[0].split("\t")
    keep = [i for i, col in enumerate(header) if col in ("a_path", "b_path", "label_path")]
    return {cells[i] for line in lines[1:] for cells in [line.split("\t")] for i in keep if i < len(cells)
            and cells[i]}


def _check_request(family: str, n: int, seed: int, size: tuple[int, int], prefix: str) -> tuple[int, int]:
    """Refuse a bad generator name, ``n``, ``seed`` or ``size`` (settings named under ``prefix``)
    before anything is written; return (height, width)."""
    if family != "medical" and family not in FAMILIES:
        known = ", ".join(sorted([*FAMILIES.names(), "medical"]))
        raise UserError(f"unknown synthetic generator {family!r}; known: {known}")
    if not is_integer(n) or n < 1:
        raise UserError(f"{prefix}n: expected a positive number of pairs, got {n!r}")
    if not is_integer(seed) or seed < 0:
        raise UserError(f"{prefix}seed: expected a non-negative integer, got {seed!r}")
    return check_size(f"{prefix}size", size, MIN_SIZE)


def synthesize(
    family: str,
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    size: tuple[int, int] = (256, 256),
    overwrite: bool = False,
    prefix: str = "",
) -> Path:
    """Write ``n`` synthetic pairs of ``family`` under ``out_dir``; return the MANIFEST.tsv path.
    Errors name ``n``, ``seed`` and ``size`` under ``prefix`` (``data.synthetic.``: the setting).

    Layout: ``<role_a>/NAME.png``, ``<role_b>/NAME.png``, ``labels/NAME.png`` (the uint8
    class mask) and ``MANIFEST.tsv`` with columns :data:`MANIFEST_COLUMNS` (paths relative to
    ``out_dir``, sizes ``WxH``, PIL modes, ``task`` = generator name, ``split`` = train/val
    with about 20 % val, drawn from ``seed``). ``size`` is (height, width). ``family`` is a
    name of :data:`FAMILIES` or ``"medical"`` (the three medical variants in turn).

    Pair ``i`` comes from the ``i``-th child of ``SeedSequence(seed)``, so it does not
    depend on ``n``. Every file is written atomically and the manifest last, so an
    interrupted run never leaves a manifest pointing at missing or half-written files; an
    existing manifest is refused unless ``overwrite`` (then it is removed first, and files
    it named that the new set does not rewrite are deleted at the end).
    """
    height, width = _check_request(family, n, seed, size, prefix)
    if family == "medical":
        tasks = [MEDICAL_VARIANTS[i % len(MEDICAL_VARIANTS)] for i in range(n)]
    else:
        tasks = [family] * n
    if is_url(out_dir):
        raise UserError(f"{out_dir}: synthesize writes local directories only")
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: exists and is not a directory")
    manifest = root / "MANIFEST.tsv"
    stale: set[str] = set()
    if manifest.exists():
        if not overwrite:
            raise UserError(
                f"{root}: already holds a data set (MANIFEST.tsv); pass overwrite=True to replace it"
            )
        stale = _old_manifest_paths(manifest)
        manifest.unlink()

    digits = max(4, len(str(n - 1)))
    children = np.random.SeedSequence(seed).spawn(n)
    split_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2**32 - 1,)))
    n_val = int(round(VAL_FRACTION * n)) if n >= 5 else (1 if n >= 2 else 0)
    val = set(split_rng.permutation(n)[:n_val].tolist())

    rows = ["\t".join(MANIFEST_COLUMNS)]
    written: set[str] = set()
    for i, (task, child) in enumerate(zip(tasks, children, strict=True)):
        name = f"synth_{i:0{digits}d}"
        pair = FAMILIES.get(task)(np.random.default_rng(child), height, width)
        _check_pair(task, pair, height, width)
        role_a, role_b = pair.roles
        paths = (f"{role_a}/{name}.png", f"{role_b}/{name}.png", f"labels/{name}.png")
        for rel, image in zip(paths, (pair.a, pair.b, pair.mask), strict=True):
            write_image(root / rel, image, png_compress_level=1)
        written.update(paths)
        size_text = f"{width}x{height}"
        rows.append("\t".join([name, *paths, size_text, _mode(pair.a), size_text, _mode(pair.b), task,
                               "val" if i in val else "train"]))
    atomic_write_text(manifest, "\n".join(rows) + "\n")

    resolved_root = root.resolve()
    for rel in sorted(stale - written):
        old = (root / rel).resolve()
        if old.is_relative_to(resolved_root) and old.is_file():
            old.unlink()
    return manifest


def synthesized_once(
    family: str, parent: str | Path, n: int, seed: int, size: tuple[int, int], label: str = "synthetic",
    prefix: str = "",
) -> Path:
    """The folder of a seeded synthetic set under ``parent``, generated the first time it is
    asked for: aside, then renamed into place, so jobs running at once share one complete copy.
    Errors name the settings under ``prefix``, as :func:`synthesize` does."""
    import shutil
    import tempfile

    parent = Path(parent)
    height, width = _check_request(family, n, seed, size, prefix)
    root = parent / f"{label}_{family}_{n}_{seed}_{height}x{width}"
    if (root / "MANIFEST.tsv").exists():
        return root
    parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=parent))
    try:
        partial.chmod(plain_mode(directory=True))  # mkdtemp's folder is owner-only
        synthesize(family, partial, n=n, seed=seed, size=(height, width), overwrite=True, prefix=prefix)
    except BaseException:  # interrupted or failed: leave no hidden half-written copy behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if root.exists() and not (root / "MANIFEST.tsv").exists():
        shutil.rmtree(root, ignore_errors=True)  # left half-written by an interrupted older run
    try:
        partial.rename(root)
    except OSError:  # another job made it first
        shutil.rmtree(partial, ignore_errors=True)
    return root

