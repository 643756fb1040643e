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


# Full-range BT.601 (JPEG) RGB -> YCbCr; the inverse is computed, so a round trip is exact.
_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])
_YCBCR_INV = np.linalg.inv(_YCBCR)


def rgb_to_ycbcr(rgb: np.ndarray, peak: float = 255.0) -> np.ndarray:
    """Full-range BT.601 YCbCr of an (..., 3) RGB array on 0..peak."""
    ycbcr = rgb @ _YCBCR.T
    ycbcr[..., 1:] += peak * 128.0 / 255.0
    return ycbcr


def ycbcr_to_rgb(ycbcr: np.ndarray, peak: float = 255.0) -> np.ndarray:
    """Inverse of :func:`rgb_to_ycbcr`."""
    centred = ycbcr.astype(np.float64, copy=True)
    centred[..., 1:] -= peak * 128.0 / 255.0
    return centred @ _YCBCR_INV.T


def luminance(image: np.ndarray, peak: float = 255.0) -> np.ndarray:
    """The Y channel of a colour image, or the image itself when it is single-channel."""
    return image if image.ndim == 2 else rgb_to_ycbcr(image, peak)[..., 0]
