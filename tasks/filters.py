"""Small image filters shared by the classic fusers and the fusion losses.

Every function takes a float tensor shaped (N, C, H, W) of any H, W >= 1 and returns one
of the same shape (``valid`` Gaussian filtering excepted), is batched, vectorized,
differentiable and device-agnostic. Channels are filtered independently.

Borders: ``replicate`` repeats the edge pixel (a flat border has zero gradient);
``clip`` averages over the part of the window inside the image (He et al.'s guided-filter
box filter); ``valid`` keeps only fully covered positions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _correlate_1d(x: Tensor, kernel: Sequence[float], dim: int) -> Tensor:
    """Valid 1-D correlation along ``dim`` as a sum of shifted slices (fast on CPU for small taps)."""
    n = x.shape[dim] - len(kernel) + 1
    out = x.narrow(dim, 0, n) * float(kernel[0])
    for i in range(1, len(kernel)):
        if kernel[i] != 0.0:
            out = out.add_(x.narrow(dim, i, n), alpha=float(kernel[i]))
    return out


def separable_filter(
    x: Tensor,
    kernel_y: Sequence[float],
    kernel_x: Sequence[float],
    border: str = "replicate",
) -> Tensor:
    """Correlate with the outer product ``kernel_y (H) x kernel_x (W)`` (odd lengths).

    ``border``: ``replicate`` / ``reflect`` / ``zeros`` keep the size, ``valid`` shrinks it.
    """
    ry, rx = len(kernel_y) // 2, len(kernel_x) // 2
    if border in ("replicate", "reflect"):
        x = F.pad(x, (rx, rx, ry, ry), mode=border)
    elif border == "zeros":
        x = F.pad(x, (rx, rx, ry, ry))
    elif border != "valid":
        raise ValueError(f"unknown border {border!r}; known: replicate, reflect, zeros, valid")
    return _correlate_1d(_correlate_1d(x, kernel_x, -1), kernel_y, -2)


def sobel(x: Tensor) -> tuple[Tensor, Tensor]:
    """Unnormalized 3x3 Sobel derivatives, replicate border.

    ``gx`` correlates with ``[-1 0 1; -2 0 2; -1 0 1]`` (along W), ``gy`` with its transpose.
    """
    smooth, diff = (1.0, 2.0, 1.0), (-1.0, 0.0, 1.0)
    x = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return separable_filter(x, smooth, diff, "valid"), separable_filter(x, diff, smooth, "valid")


def sobel_magnitude(x: Tensor, form: str = "l1", eps: float = 1e-12) -> Tensor:
    """Sobel gradient magnitude: ``|gx| + |gy|`` (``l1``) or ``sqrt(gx^2 + gy^2 + eps)`` (``l2``)."""
    gx, gy = sobel(x)
    if form == "l1":
        return gx.abs() + gy.abs()
    if form == "l2":
        return torch.sqrt(gx * gx + gy * gy + eps)
    raise ValueError(f"unknown gradient magnitude form {form!r}; known: l1, l2")


def laplacian(x: Tensor) -> Tensor:
    """4-neighbour Laplacian ``[0 1 0; 1 -4 1; 0 1 0]``, replicate border."""
    h, w = x.shape[-2:]
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    vertical = p[..., :h, 1 : w + 1] + p[..., 2:, 1 : w + 1]
    horizontal = p[..., 1 : h + 1, :w] + p[..., 1 : h + 1, 2:]
    return vertical + horizontal - 4.0 * x


def gaussian_kernel1d(size: int, sigma: float) -> Tensor:
    """Normalized 1-D Gaussian of odd ``size`` (MATLAB ``fspecial('gaussian')`` separable factor)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"Gaussian window size must be odd and >= 1, got {size}")
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-(coords**2) / (2.0 * sigma * sigma))
    return k / k.sum()


def gaussian_filter(x: Tensor, size: int, sigma: float, border: str = "replicate") -> Tensor:
    """Separable Gaussian filter of odd ``size``; ``border`` as in :func:`separable_filter`."""
    k = gaussian_kernel1d(size, sigma).tolist()
    return separable_filter(x, k, k, border)


def _accumulator(x: Tensor) -> torch.dtype:
    # Running sums over a whole row lose float32 precision (the guided filter's eps can be
    # 1e-6), so sums are accumulated in float64 where the device has it.
    return x.dtype if x.device.type == "mps" else torch.float64


def _along(v: Tensor, dim: int) -> Tensor:
    """A 1-D tensor shaped to broadcast along ``dim`` (-1 or -2)."""
    return v if dim == -1 else v.unsqueeze(-1)


def _box_sum_1d(x: Tensor, r: int, dim: int, border: str) -> Tensor:
    """Windowed sums of width 2r+1 along ``dim`` (-1 or -2) from one cumulative sum.

    With ``C`` the inclusive cumulative sum, the window of pixel i sums
    ``C[min(i + r, n - 1)] - C[i - r - 1]`` (the second term only for i > r); written
    slice by slice, without padded copies.
    """
    n = x.shape[dim]
    c = torch.cumsum(x, dim=dim)
    out = torch.empty_like(c)
    k = max(n - r, 0)  # pixels whose window reaches no further than the last one
    if k:
        out.narrow(dim, 0, k).copy_(c.narrow(dim, r, k))
    if k < n:
        out.narrow(dim, k, n - k).copy_(c.narrow(dim, n - 1, 1))
    if n - r - 1 > 0:
        out.narrow(dim, r + 1, n - r - 1).sub_(c.narrow(dim, 0, n - r - 1))
    if border == "replicate":  # window positions beyond a border repeat the edge pixel
        m = min(r, n)
        excess = torch.arange(r, r - m, -1, device=x.device, dtype=x.dtype)  # r - i, i < m
        out.narrow(dim, 0, m).add_(_along(excess, dim) * x.narrow(dim, 0, 1))
        out.narrow(dim, n - m, m).add_(_along(excess.flip(0), dim) * x.narrow(dim, n - 1, 1))
    return out


def _clip_counts(n: int, r: int, like: Tensor) -> Tensor:
    i = torch.arange(n, device=like.device)
    return ((i + r).clamp(max=n - 1) - (i - r).clamp(min=0) + 1).to(like.dtype)


def box_mean(x: Tensor, radius: int, border: str = "replicate") -> Tensor:
    """Mean over the (2r+1)x(2r+1) window, O(1) per pixel; ``border`` is ``replicate`` or ``clip``."""
    if radius < 0:
        raise ValueError(f"box radius must be >= 0, got {radius}")
    if border not in ("replicate", "clip"):
        raise ValueError(f"unknown border {border!r}; known: replicate, clip")
    if radius == 0:
        return x
    h, w = x.shape[-2:]
    y = x.to(_accumulator(x))
    y = _box_sum_1d(_box_sum_1d(y, radius, -1, border), radius, -2, border)
    if border == "replicate":
        y = y / float((2 * radius + 1) ** 2)
    else:
        y = y / (_clip_counts(h, radius, y).view(-1, 1) * _clip_counts(w, radius, y).view(1, -1))
    return y.to(x.dtype)


def guided_filter(guide: Tensor, src: Tensor, radius: int, eps: float) -> Tensor:
    """He, Sun, Tang guided filter (gray guide), box windows clipped at the border as in their code.

    ``a = cov(I, p) / (var(I) + eps)``, ``b = mean(p) - a mean(I)``, ``q = mean(a) I + mean(b)``.
    Computed in float64 where the device has it (variances are compared with eps ~ 1e-6).
    """
    dtype, c = guide.dtype, guide.shape[1]
    guide, src = guide.to(_accumulator(guide)), src.to(_accumulator(guide))
    means = box_mean(torch.cat([guide, src, guide * src, guide * guide], dim=1), radius, "clip")
    mean_i, mean_p, mean_ip, mean_ii = means.split(c, dim=1)
    a = (mean_ip - mean_i * mean_p) / (mean_ii - mean_i * mean_i + eps)
    b = mean_p - a * mean_i
    mean_a, mean_b = box_mean(torch.cat([a, b], dim=1), radius, "clip").split(c, dim=1)
    return (mean_a * guide + mean_b).to(dtype)
