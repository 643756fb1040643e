"""MATLAB semantics in batched, device-agnostic torch: the primitives the reference codes call.

Every function works on float tensors shaped ``(..., H, W)`` (any leading batch / channel
dimensions), runs on the device of its input and keeps its dtype (use float64 to match
MATLAB's doubles). Functions are named after the MATLAB function they reproduce and
document where they differ from it (only ever in the last bits of floating-point
rounding).

Filtering. MATLAB's ``filter2`` / ``imfilter`` correlate (``conv2`` convolves, i.e.
flips the kernel). Every kernel the fusion metrics use is separable (Gaussian, box,
Sobel), and on the CPU float64 ``conv2d`` is slow, so :func:`filter2_separable` and
:func:`imfilter_separable` apply a column then a row kernel by shift-and-add, a cache-sized
block of image planes at a time. With integer-valued images and integer (or power-of-two
scaled) kernels such as Sobel, every partial sum is exact, so the results are identical
to MATLAB's whatever the summation order. :func:`filter2` / :func:`conv2` take any 2-D
kernel (``conv2d``), for the non-separable case.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

MATLAB_EPS = 2.220446049250313e-16  # MATLAB ``eps`` (= float64 machine epsilon)

# Shift-and-add filtering is memory-bound: on the CPU it runs on blocks of planes of about
# this many elements so that each block stays in cache between the column and row passes.
_CPU_BLOCK_ELEMENTS = 1 << 19

Kernel1d = Sequence[float] | Tensor


# ----------------------------------------------------------------------------- kernels


def fspecial_gaussian(
    size: int | tuple[int, int], sigma: float, *, dtype: torch.dtype = torch.float64, device=None
) -> Tensor:
    """``fspecial('gaussian', size, sigma)``: a normalised 2-D Gaussian kernel.

    As MATLAB: ``exp(-(x^2+y^2)/(2 sigma^2))`` on an integer grid centred on the kernel,
    values below ``eps * max`` set to 0, then divided by the sum.
    """
    rows, cols = (size, size) if isinstance(size, int) else size
    y = torch.arange(rows, dtype=dtype, device=device) - (rows - 1) / 2
    x = torch.arange(cols, dtype=dtype, device=device) - (cols - 1) / 2
    h = torch.exp(-(x[None, :] ** 2 + y[:, None] ** 2) / (2 * sigma * sigma))
    h = torch.where(h < MATLAB_EPS * h.max(), torch.zeros_like(h), h)
    total = h.sum()
    return h / total if total != 0 else h


def gaussian_1d(size: int, sigma: float) -> list[float]:
    """The 1-D factor ``g`` of :func:`fspecial_gaussian`: ``outer(g, g)`` equals the 2-D kernel.

    ``fspecial``'s ``eps * max`` cut-off never bites for the sizes used (``size <= 6 sigma``
    or so), so the separable and 2-D kernels agree to rounding.
    """
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma * sigma))
    return (g / g.sum()).tolist()


def fspecial_sobel() -> list[list[float]]:
    """``fspecial('sobel')``: ``[1 2 1; 0 0 0; -1 -2 -1]`` (emphasises horizontal edges)."""
    return [[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]]


# ----------------------------------------------------------------------------- padding


def padarray(x: Tensor, pad: tuple[int, int, int, int], method: str | float = 0.0) -> Tensor:
    """``padarray`` on the last two dims; ``pad = (top, bottom, left, right)``.

    ``method``: a number (constant), ``'replicate'``, ``'symmetric'`` (mirror including
    the border pixel: MATLAB's and numpy's ``symmetric``), ``'reflect'`` (mirror excluding
    it; not a MATLAB option, but what hand-written "periodic extensions" such as
    Shreyamsha Kumar's ``per_extn_im_fn`` actually do) or ``'circular'``.
    """
    top, bottom, left, right = pad
    if not any(pad):
        return x
    if not isinstance(method, str):
        return F.pad(x, (left, right, top, bottom), mode="constant", value=float(method))
    if method == "symmetric":
        return _pad_symmetric(x, top, bottom, left, right)
    mode = {"replicate": "replicate", "reflect": "reflect", "circular": "circular"}[method]
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, *x.shape[-2:])
    out = F.pad(flat, (left, right, top, bottom), mode=mode)
    return out.reshape(*lead, *out.shape[-2:])


def _pad_symmetric(x: Tensor, top: int, bottom: int, left: int, right: int) -> Tensor:
    h, w = x.shape[-2:]
    rows = _symmetric_index(h, top, bottom, x.device)
    cols = _symmetric_index(w, left, right, x.device)
    return x.index_select(-2, rows).index_select(-1, cols)


def _symmetric_index(n: int, before: int, after: int, device) -> Tensor:
    idx = torch.arange(-before, n + after, device=device)
    period = 2 * n
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - 1 - idx, idx)


# ----------------------------------------------------------------------------- filtering


def _kernel_list(k: Kernel1d) -> list[float]:
    return k.detach().reshape(-1).tolist() if isinstance(k, Tensor) else [float(v) for v in k]


def _correlate_valid_planes(
    planes: Tensor, col: list[float], row: list[float], out: Tensor, scratch: Tensor | None = None
) -> None:
    """'valid' correlation of (B, H, W) planes with ``outer(col, row)`` into ``out``."""
    kh, kw = len(col), len(row)
    ho, wo = out.shape[-2:]
    b, _, w = planes.shape
    tmp = scratch[: b * ho * w].view(b, ho, w) if scratch is not None else planes.new_empty(b, ho, w)
    torch.mul(planes[:, 0:ho, :], col[0], out=tmp)
    for i in range(1, kh):
        if col[i] != 0.0:
            tmp.add_(planes[:, i : i + ho, :], alpha=col[i])
    torch.mul(tmp[:, :, 0:wo], row[0], out=out)
    for j in range(1, kw):
        if row[j] != 0.0:
            out.add_(tmp[:, :, j : j + wo], alpha=row[j])


def _fill_padded(dst: Tensor, x: Tensor, pad: tuple[int, int, int, int], method: str | float) -> None:
    """Write ``padarray(x, pad, method)`` into the preallocated ``dst`` (B, H+top+bottom, W+left+right)."""
    top, bottom, left, right = pad
    h, w = x.shape[-2:]
    dst[:, top : top + h, left : left + w].copy_(x)
    if not isinstance(method, str):
        if top:
            dst[:, :top].fill_(float(method))
        if bottom:
            dst[:, top + h :].fill_(float(method))
        if left:
            dst[:, :, :left].fill_(float(method))
        if right:
            dst[:, :, left + w :].fill_(float(method))
        return
    if method == "circular":
        dst.copy_(padarray(x, pad, "circular"))
        return
    # Rows first (inner columns only), then whole columns, so that corners follow MATLAB.
    inner = dst[:, :, left : left + w]
    for i in range(top):  # destination row top-1-i
        inner[:, top - 1 - i].copy_(inner[:, top + _mirror(i, h, method)])
    for i in range(bottom):  # destination row top+h+i
        inner[:, top + h + i].copy_(inner[:, top + h - 1 - _mirror(i, h, method)])
    for j in range(left):
        dst[:, :, left - 1 - j].copy_(dst[:, :, left + _mirror(j, w, method)])
    for j in range(right):
        dst[:, :, left + w + j].copy_(dst[:, :, left + w - 1 - _mirror(j, w, method)])


def _mirror(i: int, n: int, method: str) -> int:
    """Offset from the border of the source pixel for the i-th padded pixel (0 = nearest)."""
    if method == "replicate":
        return 0
    if method == "symmetric":
        return i  # callers keep the padding within the image (i < n)
    if method == "reflect":
        if i + 1 >= n:
            raise ValueError(f"reflect padding by {i + 1} needs more than {n} pixels")
        return i + 1
    raise ValueError(f"unknown padding {method!r}")


def _separable_valid(
    x: Tensor,
    col: list[float],
    row: list[float],
    pad: tuple[int, int, int, int] = (0, 0, 0, 0),
    method: str | float = 0.0,
) -> Tensor:
    """'valid' separable correlation of ``padarray(x, pad, method)``, a block of planes at a time."""
    *lead, h, w = x.shape
    top, bottom, left, right = pad
    hp, wp = h + top + bottom, w + left + right
    kh, kw = len(col), len(row)
    if hp < kh or wp < kw:
        raise ValueError(f"image {hp}x{wp} (padded) is smaller than the {kh}x{kw} kernel")
    if method == "symmetric" and (max(top, bottom) > h or max(left, right) > w):
        x = padarray(x, pad, "symmetric")  # padding wider than the image: the general path
        pad, (h, w) = (0, 0, 0, 0), (hp, wp)
    planes = x.reshape(-1, h, w)
    n = planes.shape[0]
    ho, wo = hp - kh + 1, wp - kw + 1
    out = x.new_empty(n, ho, wo)
    block = max(1, _CPU_BLOCK_ELEMENTS // (hp * wp)) if x.device.type == "cpu" else n
    block = min(block, n)
    scratch = x.new_empty(block * ho * wp)
    padded = x.new_empty(block, hp, wp) if any(pad) else None
    for start in range(0, n, block):
        src = planes[start : start + block]
        if padded is not None:
            dst = padded[: src.shape[0]]
            _fill_padded(dst, src, pad, method)
            src = dst
        _correlate_valid_planes(src, col, row, out[start : start + block], scratch)
    return out.reshape(*lead, ho, wo)


def filter2_separable(col: Kernel1d, row: Kernel1d, x: Tensor, shape: str = "same") -> Tensor:
    """``filter2(col(:) * row(:)', x, shape)``: correlation with a separable kernel, zero padding.

    ``shape`` is ``'same'``, ``'valid'`` or ``'full'`` as in MATLAB (for even kernel sizes
    'same' keeps MATLAB's centre ``floor((size + 1) / 2)``).
    """
    col_l, row_l = _kernel_list(col), _kernel_list(row)
    kh, kw = len(col_l), len(row_l)
    if shape == "valid":
        pad = (0, 0, 0, 0)
    elif shape == "same":
        pad = ((kh - 1) // 2, kh // 2, (kw - 1) // 2, kw // 2)
    elif shape == "full":
        pad = (kh - 1, kh - 1, kw - 1, kw - 1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return _separable_valid(x, col_l, row_l, pad, 0.0)


def imfilter_separable(
    x: Tensor, col: Kernel1d, row: Kernel1d, padding: str | float = 0.0, shape: str = "same"
) -> Tensor:
    """``imfilter(x, col(:) * row(:)', padding, shape)`` (correlation, MATLAB's default).

    ``padding``: a number, ``'replicate'``, ``'symmetric'`` or ``'circular'``; ``shape``:
    ``'same'`` or ``'full'``. The kernel centre is ``floor((size + 1) / 2)`` (1-based), so
    an even-sized kernel such as ``ones(2)/4`` looks forward: ``out(i,j)`` averages
    ``x(i:i+1, j:j+1)``.
    """
    col_l, row_l = _kernel_list(col), _kernel_list(row)
    kh, kw = len(col_l), len(row_l)
    if shape == "same":
        pad = ((kh - 1) // 2, kh // 2, (kw - 1) // 2, kw // 2)
    elif shape == "full":
        pad = (kh - 1, kh - 1, kw - 1, kw - 1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return _separable_valid(x, col_l, row_l, pad, padding)


def filter2(h: Tensor, x: Tensor, shape: str = "same") -> Tensor:
    """``filter2(h, x, shape)`` for any 2-D kernel ``h`` (correlation, zero padding)."""
    h = h.to(dtype=x.dtype, device=x.device)
    kh, kw = h.shape
    if shape == "same":
        x = padarray(x, ((kh - 1) // 2, kh // 2, (kw - 1) // 2, kw // 2), 0.0)
    elif shape == "full":
        x = padarray(x, (kh - 1, kh - 1, kw - 1, kw - 1), 0.0)
    elif shape != "valid":
        raise ValueError(f"unknown shape {shape!r}")
    *lead, hh, ww = x.shape
    out = F.conv2d(x.reshape(-1, 1, hh, ww), h[None, None])
    return out.reshape(*lead, *out.shape[-2:])


def conv2(x: Tensor, h: Tensor, shape: str = "full") -> Tensor:
    """``conv2(x, h, shape)``: true convolution (``filter2`` with the kernel rotated 180°).

    For 'same' with an even-sized kernel MATLAB's ``conv2`` centre differs from
    ``filter2``'s; both are handled as MATLAB does.
    """
    hr = torch.flip(h, dims=(-2, -1))
    if shape != "same":
        return filter2(hr, x, shape)
    kh, kw = h.shape
    full = filter2(hr, x, "full")
    top, left = kh // 2, kw // 2
    return full[..., top : top + x.shape[-2], left : left + x.shape[-1]]


def conv2_separable(x: Tensor, col: Kernel1d, row: Kernel1d, shape: str = "full") -> Tensor:
    """``conv2(x, col(:) * row(:)', shape)`` (convolution) via :func:`filter2_separable`."""
    col_l, row_l = _kernel_list(col)[::-1], _kernel_list(row)[::-1]
    if shape != "same":
        return filter2_separable(col_l, row_l, x, shape)
    kh, kw = len(col_l), len(row_l)
    full = filter2_separable(col_l, row_l, x, "full")
    top, left = kh // 2, kw // 2
    return full[..., top : top + x.shape[-2], left : left + x.shape[-1]]


def imgaussfilt(x: Tensor, sigma: float, filter_size: int | None = None, padding: str | float = "replicate"):
    """``imgaussfilt(x, sigma, 'FilterSize', n, 'Padding', padding)`` (spatial domain).

    Default size ``2*ceil(2*sigma)+1`` as MATLAB; the kernel is ``fspecial``'s, applied
    separably.
    """
    n = filter_size if filter_size is not None else 2 * math.ceil(2 * sigma) + 1
    g = gaussian_1d(n, sigma)
    return imfilter_separable(x, g, g, padding, "same")


# ----------------------------------------------------------------------------- derivatives


def gradient(x: Tensor) -> tuple[Tensor, Tensor]:
    """``[gx, gy] = gradient(x)`` with unit spacing.

    ``gx`` differentiates along columns (the second MATLAB dimension, W) and ``gy`` along
    rows: central differences ``(f(i+1) - f(i-1)) / 2`` inside, one-sided differences
    ``f(2) - f(1)`` and ``f(n) - f(n-1)`` on the borders.
    """
    return _gradient_along(x, -1), _gradient_along(x, -2)


def _gradient_along(x: Tensor, dim: int) -> Tensor:
    n = x.shape[dim]
    out = torch.empty_like(x)
    if n < 2:
        return out.zero_()
    out.narrow(dim, 0, 1).copy_(x.narrow(dim, 1, 1) - x.narrow(dim, 0, 1))
    out.narrow(dim, n - 1, 1).copy_(x.narrow(dim, n - 1, 1) - x.narrow(dim, n - 2, 1))
    if n > 2:
        out.narrow(dim, 1, n - 2).copy_((x.narrow(dim, 2, n - 2) - x.narrow(dim, 0, n - 2)) / 2)
    return out


def edge_sobel(x: Tensor, thinning: bool = True) -> Tensor:
    """``edge(x)`` = ``edge(x, 'sobel')``: automatic threshold, thinning; a bool map.

    MATLAB (edge.m, R2013+ and its ``edgethinning`` library): ``op = fspecial('sobel')/8``,
    ``bx = imfilter(x, op', 'replicate')``, ``by = imfilter(x, op, 'replicate')``,
    ``b = bx.^2 + by.^2``, ``cutoff = 4 * mean(b(:))`` (threshold ``sqrt(cutoff)``) and,
    with thinning, an edge pixel needs ``b > cutoff`` and to be a horizontal local maximum
    (``|bx| >= |by| - 100*eps``, ``b(r,c-1) <= b(r,c) > b(r,c+1)``) or a vertical one
    (``|by| >= |bx| - 100*eps``, ``b(r-1,c) <= b(r,c) > b(r+1,c)``); a neighbour outside
    the image counts as satisfied. Integer-valued images reproduce MATLAB exactly: all
    partial sums are exact.
    """
    # op' = [1 0 -1; 2 0 -2; 1 0 -1]/8 = [1 2 1]' * [1 0 -1] / 8; op = [1 0 -1]' * [1 2 1] / 8.
    bx = _separable_valid(x, [1.0, 2.0, 1.0], [0.125, 0.0, -0.125], (1, 1, 1, 1), "replicate")
    by = _separable_valid(x, [1.0, 0.0, -1.0], [0.125, 0.25, 0.125], (1, 1, 1, 1), "replicate")
    b = bx * bx + by * by
    h, w = b.shape[-2:]
    cutoff = 4 * b.sum(dim=(-2, -1), keepdim=True) / (h * w)
    if not thinning:
        return b > cutoff
    ax, ay = bx.abs(), by.abs()
    tol = 100 * MATLAB_EPS
    true_col = torch.ones_like(b[..., :, :1], dtype=torch.bool)
    true_row = torch.ones_like(b[..., :1, :], dtype=torch.bool)
    left = torch.cat([true_col, b[..., :, :-1] <= b[..., :, 1:]], dim=-1)
    right = torch.cat([b[..., :, :-1] > b[..., :, 1:], true_col], dim=-1)
    up = torch.cat([true_row, b[..., :-1, :] <= b[..., 1:, :]], dim=-2)
    down = torch.cat([b[..., :-1, :] > b[..., 1:, :], true_row], dim=-2)
    horizontal = (ax >= ay - tol) & left & right
    vertical = (ay >= ax - tol) & up & down
    return (b > cutoff) & (horizontal | vertical)


# ----------------------------------------------------------------------------- transforms


def dct_matrix(n: int, *, dtype: torch.dtype = torch.float64, device=None) -> Tensor:
    """The orthonormal DCT-II matrix ``C`` of MATLAB's ``dct``: ``dct(x) = C @ x``."""
    k = torch.arange(n, dtype=dtype, device=device)[:, None]
    i = torch.arange(n, dtype=dtype, device=device)[None, :]
    c = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] = 1.0 / math.sqrt(n)
    return c


def dct2(x: Tensor) -> Tensor:
    """``dct2(x)``: orthonormal 2-D DCT-II of each (H, W) plane, by two matrix products."""
    h, w = x.shape[-2:]
    ch = dct_matrix(h, dtype=x.dtype, device=x.device)
    cw = dct_matrix(w, dtype=x.dtype, device=x.device)
    return ch @ x @ cw.T


# ----------------------------------------------------------------------------- statistics


def im2uint8_values(x: Tensor) -> Tensor:
    """The values ``uint8(x)`` would hold, as int64: clip to 0..255, round half away from 0."""
    return torch.floor(x.clamp(0, 255) + 0.5).to(torch.int64)


def imhist(x: Tensor, nbins: int = 256) -> Tensor:
    """``imhist`` of uint8 data: counts of the values 0..255 of each (H, W) plane.

    ``x`` holds (or is rounded to, as :func:`im2uint8_values`) uint8 values; returns
    float64 counts shaped ``(..., 256)``. Only ``nbins = 256`` is supported.
    """
    if nbins != 256:
        raise ValueError("only 256-bin histograms of uint8 data are supported")
    v = im2uint8_values(x)
    lead = v.shape[:-2]
    flat = v.reshape(-1, v.shape[-2] * v.shape[-1])
    return bincount_rows(flat, 256).to(torch.float64).reshape(*lead, 256)


def bincount_rows(index: Tensor, nbins: int) -> Tensor:
    """Per-row ``bincount``: ``index`` (B, K) int64 in ``0..nbins-1`` -> counts (B, nbins)."""
    b = index.shape[0]
    offset = torch.arange(b, device=index.device, dtype=index.dtype)[:, None] * nbins
    return torch.bincount((index + offset).reshape(-1), minlength=b * nbins).reshape(b, nbins)


def entropy_from_counts(counts: Tensor) -> Tensor:
    """Shannon entropy in bits of histograms ``counts`` (summed over the last dim)."""
    total = counts.sum(dim=-1, keepdim=True)
    p = counts / total
    terms = torch.where(counts > 0, -p * torch.log2(torch.where(counts > 0, p, torch.ones_like(p))), 0.0)
    return terms.sum(dim=-1)


def entropy(x: Tensor) -> Tensor:
    """``entropy(I)`` of uint8 images: -sum p log2 p over the 256-bin ``imhist``; shape ``(...)``."""
    return entropy_from_counts(imhist(x))


def mean2(x: Tensor) -> Tensor:
    """``mean2``: the mean over the last two dims."""
    return x.mean(dim=(-2, -1))


def std2_population(x: Tensor) -> Tensor:
    """``sqrt(sum((x - mean2(x)).^2) / numel)``: the population standard deviation per plane."""
    mu = mean2(x)[..., None, None]
    return torch.sqrt(((x - mu) ** 2).sum(dim=(-2, -1)) / (x.shape[-2] * x.shape[-1]))


def corr2(a: Tensor, b: Tensor) -> Tensor:
    """``corr2(a, b)``: the Pearson correlation of two images, per plane."""
    a = a - mean2(a)[..., None, None]
    b = b - mean2(b)[..., None, None]
    return (a * b).sum(dim=(-2, -1)) / torch.sqrt((a * a).sum(dim=(-2, -1)) * (b * b).sum(dim=(-2, -1)))


def ssim(
    a: Tensor, ref: Tensor, dynamic_range: float = 1.0, radius: float = 1.5, return_map: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """The built-in ``ssim(A, ref)`` (Image Processing Toolbox, R2014a+), default options.

    Gaussian weighting with standard deviation ``radius`` on a ``2*ceil(3*radius)+1``
    window (11x11), replicate padding, ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``,
    ``C3 = C2/2`` and unit exponents, so that the map is
    ``(2 mu_a mu_r + C1)(2 s_ar + C2) / ((mu_a^2 + mu_r^2 + C1)(s_a^2 + s_r^2 + C2))`` with
    variances ``E[x^2] - mu^2``; the value is the mean of the full-size map.
    ``dynamic_range`` L is the class range: 1 for double images *whatever their values*
    (so 0..255 doubles get C1 = 1e-4, C2 = 9e-4), 255 for uint8.
    """
    if return_map:
        return _ssim_maps(a, [ref], dynamic_range, radius, keep_maps=True)[0]
    return _ssim_maps(a, [ref], dynamic_range, radius)[0]


def ssim_multi(
    a: Tensor, refs: list[Tensor], dynamic_range: float = 1.0, radius: float = 1.5
) -> list[Tensor]:
    """``[ssim(a, ref) for ref in refs]`` (see :func:`ssim`), filtering ``a``'s moments once."""
    return _ssim_maps(a, refs, dynamic_range, radius)


def _ssim_maps(a: Tensor, refs: list[Tensor], dynamic_range: float, radius: float, keep_maps: bool = False):
    size = 2 * math.ceil(3 * radius) + 1
    g = gaussian_1d(size, radius)
    c1 = (0.01 * dynamic_range) ** 2
    c2 = (0.03 * dynamic_range) ** 2

    def filt(x: Tensor) -> Tensor:
        return imfilter_separable(x, g, g, "replicate", "same")

    mu_a = filt(a)
    mu_aa = mu_a * mu_a
    var_a = filt(a * a).sub_(mu_aa)
    results = []
    for ref in refs:
        mu_r = filt(ref)
        mu_rr = mu_r * mu_r
        var_r = filt(ref * ref).sub_(mu_rr)
        mu_ar = mu_r.mul_(mu_a)
        cov = filt(a * ref).sub_(mu_ar)
        num = (2 * mu_ar + c1).mul_(cov.mul_(2).add_(c2))
        den = mu_rr.add_(mu_aa).add_(c1).mul_(var_r.add_(var_a).add_(c2))
        smap = num.div_(den)
        results.append((mean2(smap), smap) if keep_maps else mean2(smap))
    return results


# --- added for vifb ---


def matlab_round(x: Tensor) -> Tensor:
    """MATLAB ``round`` (and the rounding of ``int16(x)`` etc. before saturation): half away
    from zero, exactly (no ``floor(x + 0.5)`` double rounding); NaN and Inf are kept."""
    t = torch.trunc(x)
    return t + torch.sign(x) * ((x - t).abs() >= 0.5).to(x.dtype)


def rgb2gray(x: Tensor, uint8: bool = False) -> Tensor:
    """``rgb2gray`` of (..., 3, H, W) -> (..., 1, H, W), MATLAB's weights.

    ``uint8=True`` for a uint8 input (the result is rounded half away from zero, as MATLAB
    returns uint8); ``False`` for a double input (unrounded).
    """
    from timfusion.tasks.colour import MATLAB_GRAY_WEIGHTS

    r, g, b = MATLAB_GRAY_WEIGHTS
    gray = r * x[..., 0:1, :, :] + g * x[..., 1:2, :, :] + b * x[..., 2:3, :, :]
    return matlab_round(gray.clamp(0.0, 255.0)) if uint8 else gray


def freqspace(h: int, w: int, *, dtype: torch.dtype = torch.float64, device=None) -> tuple[Tensor, Tensor]:
    """``[u, v] = freqspace([h w], 'meshgrid')``: each (h, w).

    ``u`` varies along columns, ``((0:w-1) - floor(w/2)) * (2/w)``, ``v`` along rows: the
    grid runs from -1 (even sizes) or -1+1/n (odd) to just below 1, so for even sizes it
    is not symmetric about 0.
    """
    f1 = (torch.arange(w, dtype=dtype, device=device) - (w // 2)) * (2.0 / w)
    f2 = (torch.arange(h, dtype=dtype, device=device) - (h // 2)) * (2.0 / h)
    return f1.expand(h, w), f2[:, None].expand(h, w)


def blkproc_blocks(x: Tensor, block: int | tuple[int, int]) -> Tensor:
    """The distinct blocks ``blkproc(x, [m n], fun)`` hands to ``fun``: (..., Hb, Wb, m, n).

    As ``blkproc``, the image is zero-padded at the bottom / right to whole blocks, so a
    reduction over the last two dims reproduces ``blkproc(x, [m n], fun)`` for a ``fun``
    reducing its block (e.g. ``mean2`` of a partial block still divides by ``m*n``).
    """
    m, n = (block, block) if isinstance(block, int) else block
    h, w = x.shape[-2:]
    x = F.pad(x, (0, (-w) % n, 0, (-h) % m))
    hb, wb = x.shape[-2] // m, x.shape[-1] // n
    return x.reshape(*x.shape[:-2], hb, m, wb, n).transpose(-3, -2)


def _fft_length(n: int) -> int:
    """The smallest 2,3,5-smooth integer >= n (a fast FFT size)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def filter2_fft(h: Tensor, x: Tensor, shape: str = "same") -> Tensor:
    """``filter2(h, x, shape)`` (correlation, zero padding) by FFT, for large kernels.

    ``x`` real or complex (..., H, W); ``h`` one kernel (kh, kw) or a stack (m, kh, kw),
    which adds a dim of size m before the last two of the result. Exact linear filtering
    (the FFT is padded past any wrap-around); it differs from the direct sum only by FFT
    rounding (~1e-16 of the largest magnitudes).
    """
    real = not x.is_complex()
    hs = h.to(device=x.device, dtype=x.dtype if real else x.real.dtype)
    stacked = hs.ndim == 3
    hs = hs if stacked else hs[None]
    kh, kw = hs.shape[-2:]
    rows, cols = x.shape[-2:]
    # Offsets into the full correlation (length rows + kh - 1) and output sizes.
    if shape == "full":
        (r0, oh), (c0, ow) = (0, rows + kh - 1), (0, cols + kw - 1)
    elif shape == "same":
        (r0, oh), (c0, ow) = (kh // 2, rows), (kw // 2, cols)
    elif shape == "valid":
        (r0, oh), (c0, ow) = (kh - 1, rows - kh + 1), (kw - 1, cols - kw + 1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    size = (
        _fft_length(max(rows + kh - 1 - r0, r0 + oh)),
        _fft_length(max(cols + kw - 1 - c0, c0 + ow)),
    )
    kernel = torch.flip(hs, dims=(-2, -1))  # correlation = convolution with the flipped kernel
    if real:
        spec = torch.fft.rfft2(x, s=size)[..., None, :, :] * torch.fft.rfft2(kernel, s=size)
        out = torch.fft.irfft2(spec, s=size)
    else:
        spec = torch.fft.fft2(x, s=size)[..., None, :, :] * torch.fft.fft2(kernel, s=size)
        out = torch.fft.ifft2(spec)
    out = out[..., r0 : r0 + oh, c0 : c0 + ow]
    return out if stacked else out[..., 0, :, :]
