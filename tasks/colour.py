"""Colour handling shared by tasks, baselines, metrics and networks.

Fusion works on luminance. ``rgb_to_ycbcr`` / ``ycbcr_to_rgb`` are the full-range
BT.601 (JPEG) transform, on 0..255 or 0..1 alike since chroma offsets are scaled by
``peak``. ``rgb_to_gray`` is MATLAB's ``rgb2gray`` (the weights the golden metric
values were produced with), rounded as MATLAB rounds when ``round_uint8`` is set.
"""

from __future__ import annotations

import numpy as np

MATLAB_GRAY_WEIGHTS = (0.298936021293776, 0.587043074451121, 0.114020904255103)


def rgb_to_gray(rgb: np.ndarray, round_uint8: bool = False) -> np.ndarray:
    """MATLAB ``rgb2gray`` of an (..., 3) array; (H, W) arrays are returned unchanged."""
    if rgb.ndim == 2:
        return rgb
    r, g, b = MATLAB_GRAY_WEIGHTS
    gray = r * rgb[..., 0] + g * rgb[..., 1] + b * rgb[..., 2]
    if round_uint8:
        gray = np.floor(np.clip(gray, 0, 255) + 0.5)
    return gray


def rgb_to_ycbcr(rgb: np.ndarray, peak: float = 255.0) -> np.ndarray:
    """Full-range BT.601 YCbCr of an (..., 3) RGB array on 0..peak."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = -0.168736 * r - 0.331264 * g + 0.5 * b + peak * 128.0 / 255.0
    cr = 0.5 * r - 0.418688 * g - 0.081312 * b + peak * 128.0 / 255.0
    return np.stack([y, cb, cr], axis=-1)


def ycbcr_to_rgb(ycbcr: np.ndarray, peak: float = 255.0) -> np.ndarray:
    """Inverse of :func:`rgb_to_ycbcr`."""
    y = ycbcr[..., 0]
    cb = ycbcr[..., 1] - peak * 128.0 / 255.0
    cr = ycbcr[..., 2] - peak * 128.0 / 255.0
    r = y + 1.402 * cr
    g = y - 0.344136 * cb - 0.714136 * cr
    b = y + 1.772 * cb
    return np.stack([r, g, b], axis=-1)


def luminance(image: np.ndarray, peak: float = 255.0) -> np.ndarray:
    """The Y channel of a colour image, or the image itself when it is single-channel."""
    return image if image.ndim == 2 else rgb_to_ycbcr(image, peak)[..., 0]
