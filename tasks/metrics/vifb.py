"""The VIFB benchmark's 13 metrics, as coded in xingchenzhang/VIFB @ 22b2ea9 (``metrics/metrics*.m``).

VIFB's driver ``compute_metrics.m`` reads the pair and the fused image with ``imread``
(uint8, colour kept as stored) and calls ``metricsX(imgVI, imgIR, fused)``: the *visible*
image comes first. The functions here take ``(a, b, fused)`` = (ir, vi, fused) as every
registered metric does: float64 (N, C, H, W) on 0..255, C = 1 or 3 for each input
independently, the images as read from disk (VIFB's IR JPEGs are stored RGB); they return
(N,) float64.

Colour handling (every metric but SF, whose quirk is documented on it): VIFB loops over
the channels of the fused image.

- colour F: the metric is computed on (VI(:,:,k), IR(:,:,k), F(:,:,k)) for k = 1..3, a
  single-channel IR being passed whole, and the three values are averaged. (A
  single-channel VI with a colour F makes the MATLAB code fail on ``img1(:,:,k)``; any
  single-channel source is simply used for every channel here.)
- single-channel F: the sources are passed whole and each metric's helper converts a
  colour source with MATLAB ``rgb2gray``: rounded to uint8 where the MATLAB code hands it
  the uint8 image (MI, CE, SSIM), unrounded where it had already called ``double()``
  (PSNR, RMSE, Qabf). Qcb and Qcv have no ``rgb2gray`` and fail in MATLAB for that case;
  unrounded ``rgb2gray`` sources are used here.

Computation: every metric is a function of one (H, W) plane of F and the matching source
planes. :func:`_planewise` runs it over blocks of planes (on the CPU, blocks small enough
to stay in cache). The sources are usually shared by a batch of fused images (one pair,
several methods): a source passed as an expanded tensor (batch stride 0, e.g.
``ir.expand(n, -1, -1, -1)``) has its per-plane quantities computed once; the results are
the same as for materialised copies.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from timfusion.tasks.metrics import matlab as M
from timfusion.tasks.metrics.registry import register_metric

_SOBEL_SMOOTH = (1.0, 2.0, 1.0)
_SOBEL_DIFF = (-1.0, 0.0, 1.0)
_CPU_BLOCK_ELEMENTS = 1 << 19  # planes per block on the CPU: about this many pixels

Features = tuple[Tensor, ...]

# ----------------------------------------------------------------------------- plumbing


def _check(a: Tensor, b: Tensor, fused: Tensor) -> None:
    for name, x in (("a", a), ("b", b), ("fused", fused)):
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"vifb metrics take (N, 1|3, H, W) tensors; {name} is {tuple(x.shape)}")
    if not (a.shape[0] == b.shape[0] == fused.shape[0] and a.shape[2:] == b.shape[2:] == fused.shape[2:]):
        raise ValueError(
            f"vifb metrics: shapes differ: {tuple(a.shape)}, {tuple(b.shape)}, {tuple(fused.shape)}"
        )


def _shared(x: Tensor) -> Tensor:
    """``x`` without its broadcast copies: an expanded batch / channel dim is kept at size 1."""
    if x.shape[0] > 1 and x.stride(0) == 0:
        x = x[:1]
    if x.shape[1] > 1 and x.stride(1) == 0:
        x = x[:, :1]
    return x


def _channels(a: Tensor, b: Tensor, fused: Tensor, gray_uint8: bool) -> tuple[Tensor, Tensor]:
    """The sources (vi, ir) as VIFB's channel loop hands them to a metric's helper.

    Each broadcasts against F's (N, K): batch 1 or N, channels 1 or K. With a colour F,
    channel k of a colour source goes with channel k of F and a single-channel source
    with every channel; with a single-channel F, colour sources go through ``rgb2gray``,
    rounded to uint8 when ``gray_uint8``.
    """
    _check(a, b, fused)
    vi, ir = _shared(b), _shared(a)
    if fused.shape[1] == 1:
        vi, ir = (M.rgb2gray(x, uint8=gray_uint8) if x.shape[1] == 3 else x for x in (vi, ir))
    return vi, ir


def _identity(x: Tensor) -> Features:
    return (x,)


def _planewise(
    fused: Tensor,
    sources: Sequence[Tensor],
    body: Callable[..., Tensor],
    prep: Callable[[Tensor], Features] = _identity,
) -> Tensor:
    """Per-image values: ``body(f, *features)`` over the planes of F, averaged over channels.

    ``fused`` is (N, K, H, W); each source broadcasts against its (N, K) (see
    :func:`_channels`). ``prep(source_planes)`` turns (B, H, W) source planes into a tuple
    of per-plane features (each (B, ...)), computed once for a shared source; ``body``
    gets a block of F's planes (B, H, W) and, for each source in turn, its features for
    those planes, and returns the (B,) per-plane values.
    """
    n, k, h, w = fused.shape
    planes = fused.reshape(n * k, h, w)
    count = n * k
    step = max(1, _CPU_BLOCK_ELEMENTS // (h * w)) if fused.device.type == "cpu" else count
    image = torch.arange(n, device=fused.device).repeat_interleave(k)
    channel = torch.arange(k, device=fused.device).repeat(n)
    prepared = []
    for src in sources:
        ns, ks = src.shape[:2]
        index = (image if ns > 1 else 0) * ks + (channel if ks > 1 else 0)
        flat = src.reshape(ns * ks, h, w)
        prepared.append((index, prep(flat) if ns == 1 else None, flat))
    out = fused.new_empty(count)
    for start in range(0, count, step):
        stop = min(start + step, count)
        args: list[Tensor] = []
        for index, feats, flat in prepared:
            rows = index[start:stop] if isinstance(index, Tensor) else torch.full((stop - start,), index)
            rows = rows.to(fused.device)
            if feats is None:
                args.extend(prep(flat.index_select(0, rows)))
            else:
                args.extend(feat.index_select(0, rows) for feat in feats)
        out[start:stop] = body(planes[start:stop], *args)
    return out.reshape(n, k).mean(dim=-1)


def _sum2(x: Tensor) -> Tensor:
    return x.sum(dim=(-2, -1))


def _sobel(x: Tensor, padding: str | float = 0.0) -> tuple[Tensor, Tensor]:
    """Correlation 'same' with [-1 0 1; -2 0 2; -1 0 1] (x) and its transpose (y)."""
    gx = M.imfilter_separable(x, _SOBEL_SMOOTH, _SOBEL_DIFF, padding)
    gy = M.imfilter_separable(x, _SOBEL_DIFF, _SOBEL_SMOOTH, padding)
    return gx, gy


def _plogp(p: Tensor, log: Callable[[Tensor], Tensor]) -> Tensor:
    """``p log p`` with 0 where p == 0."""
    return torch.where(p > 0, p * log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))


# ----------------------------------------------------------------------------- EN SD SF AG EI


def _en_plane(f: Tensor) -> Tensor:
    idx = torch.floor(f.clamp(0.0, 255.0)).to(torch.int64).reshape(f.shape[0], -1)
    return M.entropy_from_counts(M.bincount_rows(idx, 256).to(f.dtype))


@register_metric("EN", definition="vifb", higher_is_better=True, colour=True)
def en(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """``metricsEntropy``: Shannon entropy (log2) of F's 256-bin histogram, per channel, averaged.

    The bin of a pixel is ``floor(F) + 1`` (a value outside 0..255 would fail in MATLAB; it
    is clamped here).
    """
    _check(a, b, fused)
    return _planewise(fused, [], _en_plane)


@register_metric("SD", definition="vifb", higher_is_better=True, colour=True)
def sd(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """``metricsVariance`` (a standard deviation despite its name): population SD of F.

    ``sqrt(sum((F - mean)^2) / (HW))`` per channel, averaged over the channels.
    """
    _check(a, b, fused)
    return _planewise(fused, [], M.std2_population)


@register_metric("SF", definition="vifb", higher_is_better=True, colour=True)
def sf(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """``metricsSpatial_frequency``: ``sqrt(RF + CF)`` with both sums divided by MN.

    RF / CF are the sums of squared horizontal / vertical neighbour differences divided by
    ``M*N`` (not by the number of differences). Quirk: the MATLAB code takes
    ``[m, n] = size(fused)``, which for an H x W x 3 image gives ``n = 3W``, and reads
    ``fused(i, j)`` for ``j`` up to 3W (linear indexing over the trailing dims). So a
    colour F is *not* averaged over its channels: it is treated as one H x 3W image, the
    channels side by side [R G B]; the horizontal differences include the two seams
    (last column of R to first of G, last of G to first of B) and both sums are divided
    by H * 3W.
    """
    _check(a, b, fused)
    n, k, h, w = fused.shape
    out = fused.new_empty(n)
    for i in range(n):  # one image at a time: the work is tiny, the temporaries are not
        wide = fused[i].permute(1, 0, 2).reshape(h, k * w)
        rf = torch.diff(wide, dim=-1).square_().sum() / (h * k * w)
        cf = torch.diff(wide, dim=-2).square_().sum() / (h * k * w)
        out[i] = torch.sqrt(rf + cf)
    return out


def _ag_plane(f: Tensor) -> Tensor:
    h, w = f.shape[-2:]
    gx, gy = M.gradient(f)
    s = torch.sqrt(gx.square_().add_(gy.square_()).div_(2))
    return _sum2(s) / ((h - 1) * (w - 1))


@register_metric("AG", definition="vifb", higher_is_better=True, colour=True)
def ag(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """``metricsAvg_gradient``: ``sum(sqrt((gx^2 + gy^2) / 2)) / ((H-1)(W-1))`` per channel, averaged.

    gx, gy are MATLAB ``gradient`` (central differences, one-sided on the borders); the
    sum runs over all H*W pixels but is divided by (H-1)(W-1).
    """
    _check(a, b, fused)
    return _planewise(fused, [], _ag_plane)


def _ei_plane(f: Tensor) -> Tensor:
    gx, gy = _sobel(f, "replicate")
    return M.mean2(torch.sqrt(gx.square_().add_(gy.square_())))


@register_metric("EI", definition="vifb", higher_is_better=True, colour=True)
def ei(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """``metricsEdge_intensity``: mean of ``sqrt(gx^2 + gy^2)`` over all pixels and channels.

    ``gx = imfilter(F, fspecial('sobel'), 'replicate')`` and ``gy`` the same with the
    transposed kernel (correlation with replicate padding, on every channel of F);
    ``mean(mean(mean(g)))`` over the whole H x W x C array.
    """
    _check(a, b, fused)
    return _planewise(fused, [], _ei_plane)


# ----------------------------------------------------------------------------- MI CE


def _mi_levels(x: Tensor) -> Tensor:
    """``mutinf``'s bins (0-based), (B, H, W) -> (B, HW): ``int16(255 (x - min) / (max - min))``.

    A constant plane gets bin 0 everywhere (the MATLAB code sets it to zeros).
    """
    flat = x.reshape(x.shape[0], -1)
    hi = flat.amax(dim=-1, keepdim=True)
    lo = flat.amin(dim=-1, keepdim=True)
    span = torch.where(hi != lo, hi - lo, torch.full_like(hi, math.inf))  # constant: (x - lo) / inf = 0
    return M.matlab_round((flat - lo).div_(span).mul_(255.0)).to(torch.int64)


def _entropy_nats(counts: Tensor) -> Tensor:
    p = counts / counts.sum(dim=-1, keepdim=True)
    return -_plogp(p, torch.log).sum(dim=-1)


def _mi_prep(x: Tensor) -> Features:
    levels = _mi_levels(x)
    return levels, _entropy_nats(M.bincount_rows(levels, 256).to(x.dtype))


def _mi_plane(f: Tensor, lv: Tensor, hv: Tensor, li: Tensor, hi: Tensor) -> Tensor:
    lf, hf = _mi_prep(f)
    total = torch.zeros_like(hf)
    for ls, hs in ((lv, hv), (li, hi)):
        hj = _entropy_nats(M.bincount_rows(ls * 256 + lf, 256 * 256).to(f.dtype))
        total += hs + hf - hj
    return total


@register_metric("MI", definition="vifb", higher_is_better=True, colour=True)
def mi(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """``metricsMutinf``: ``MI(VI, F) + MI(IR, F)`` in nats, per channel, averaged.

    ``mutinf`` min-max rescales each image to 0..1 (a constant image becomes all zeros)
    and bins it as ``int16(x * 255) + 1`` (round half away from zero): 256 levels, whatever
    the input range. MI = H(x) + H(F) - H(x, F) with natural-log entropies of the marginal
    and 256 x 256 joint histograms. With a single-channel F, colour sources are
    ``rgb2gray``-ed as uint8 (rounded).
    """
    vi, ir = _channels(a, b, fused, gray_uint8=True)
    return _planewise(fused, [vi, ir], _mi_plane, _mi_prep)


def _ce_prep(x: Tensor) -> Features:
    """Normalised 256-bin histogram of integer grey levels, (B, H, W) -> (B, 256)."""
    idx = M.im2uint8_values(x).reshape(x.shape[0], -1)
    return (M.bincount_rows(idx, 256).to(x.dtype) / idx.shape[1],)


def _ce_plane(f: Tensor, pv: Tensor, pi: Tensor) -> Tensor:
    (q,) = _ce_prep(f)
    total = torch.zeros(f.shape[0], dtype=f.dtype, device=f.device)
    one = torch.ones_like(q)
    for p in (pv, pi):
        both = (p > 0) & (q > 0)
        terms = p * torch.log2(torch.where(both, p, one) / torch.where(both, q, one))
        total += torch.where(both, terms, 0.0).sum(dim=-1)
    return total / 2.0


@register_metric("CE", definition="vifb", higher_is_better=False, colour=True)
def ce(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """``metricsCross_entropy``: ``(CE(VI, F) + CE(IR, F)) / 2`` per channel, averaged.

    ``CE(x, F) = sum_k p_x(k) log2(p_x(k) / p_F(k))`` over the bins where *both* 256-bin
    histograms are non-zero (a KL divergence with the infinite terms dropped). The MATLAB
    code indexes the histogram with the pixel values themselves, so they must be integers
    0..255 (other values fail there; they are rounded to uint8 here). With a
    single-channel F, colour sources are ``rgb2gray``-ed as uint8 (rounded).
    """
    vi, ir = _channels(a, b, fused, gray_uint8=True)
    return _planewise(fused, [vi, ir], _ce_plane, _ce_prep)


# ----------------------------------------------------------------------------- PSNR RMSE


def _vifb_mse(x: Tensor, f: Tensor) -> Tensor:
    """VIFB's ``mse``: ``sqrt(sum((x - F)^2)) / (HW)``, a root of the sum, not a mean square."""
    return torch.sqrt(_sum2((x - f).square_())) / (f.shape[-2] * f.shape[-1])


def _rmse_plane(f: Tensor, vi: Tensor, ir: Tensor) -> Tensor:
    return (_vifb_mse(vi, f) + _vifb_mse(ir, f)) / 2.0


def _psnr_plane(f: Tensor, vi: Tensor, ir: Tensor) -> Tensor:
    return 20.0 * torch.log10(255.0 / torch.sqrt(_rmse_plane(f, vi, ir)))


@register_metric("PSNR", definition="vifb", higher_is_better=True, colour=True)
def psnr(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """``metricsPsnr`` as coded: ``20 log10(255 / sqrt(MES))`` per channel, averaged.

    ``MES = (e(VI, F) + e(IR, F)) / 2`` with VIFB's ``mse`` ``e(x, F) = sqrt(SSE) / (HW)``,
    which is not a mean squared error, so the values sit far above a standard PSNR. With a
    single-channel F, colour sources are ``rgb2gray``-ed unrounded (already double).
    """
    vi, ir = _channels(a, b, fused, gray_uint8=False)
    return _planewise(fused, [vi, ir], _psnr_plane)


@register_metric("RMSE", definition="vifb", higher_is_better=False, colour=True)
def rmse(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """``metricsRmse`` as coded: ``(sqrt(SSE(VI, F)) + sqrt(SSE(IR, F))) / (2HW)`` per channel, averaged.

    The mean of VIFB's two ``mse`` values (see :func:`psnr`), not a root mean square error.
    With a single-channel F, colour sources are ``rgb2gray``-ed unrounded.
    """
    vi, ir = _channels(a, b, fused, gray_uint8=False)
    return _planewise(fused, [vi, ir], _rmse_plane)


# ----------------------------------------------------------------------------- SSIM

_SSIM_WINDOW = M.gaussian_1d(11, 1.5)
_SSIM_C1 = (0.01 * 255) ** 2
_SSIM_C2 = (0.03 * 255) ** 2


def _ssim_filter(x: Tensor) -> Tensor:
    return M.filter2_separable(_SSIM_WINDOW, _SSIM_WINDOW, x, "valid")


def _ssim_prep(x: Tensor) -> Features:
    mu = _ssim_filter(x)
    mu_sq = mu * mu
    return x, mu, mu_sq, _ssim_filter(x * x).sub_(mu_sq)


def _ssim_plane(f: Tensor, *sources: Tensor) -> Tensor:
    _, mu_f, mu_ff, var_f = _ssim_prep(f)
    total = torch.zeros(f.shape[0], dtype=f.dtype, device=f.device)
    for i in range(0, len(sources), 4):
        x, mu_x, mu_xx, var_x = sources[i : i + 4]
        mu_xf = mu_x * mu_f
        cov = _ssim_filter(x * f).sub_(mu_xf)
        num = mu_xf.mul_(2).add_(_SSIM_C1).mul_(cov.mul_(2).add_(_SSIM_C2))
        den = (mu_xx + mu_ff).add_(_SSIM_C1).mul_((var_x + var_f).add_(_SSIM_C2))
        total += M.mean2(num.div_(den))
    return total


@register_metric("SSIM", definition="vifb", higher_is_better=True, colour=True)
def ssim(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """``metricsSsim``: ``ssim(VI, F) + ssim(IR, F)`` (a sum, up to 2), per channel, averaged.

    ``ssim`` is Wang's ``ssim_index``, not MATLAB's built-in: window
    ``fspecial('gaussian', 11, 1.5)`` (normalised), ``filter2(..., 'valid')``, L = 255,
    C1 = (0.01 L)^2, C2 = (0.03 L)^2, variances as ``E[x^2] - mu^2``, the mean of the
    (H-10) x (W-10) map. With a single-channel F, colour sources are ``rgb2gray``-ed as
    uint8 (rounded).
    """
    vi, ir = _channels(a, b, fused, gray_uint8=True)
    return _planewise(fused, [vi, ir], _ssim_plane, _ssim_prep)


# ----------------------------------------------------------------------------- Qabf


def _qabf_prep(x: Tensor) -> Features:
    """Qabf's Sobel strength and orientation of ``255 * x``: ``conv2(., h, 'same')``, zero padding.

    h3 = [-1 0 1; -2 0 2; -1 0 1] (x), h1 = [1 2 1; 0 0 0; -1 -2 -1] (y); the angle is
    ``atan(Sy / Sx)``, set to pi/2 where Sx == 0.
    """
    x = x * 255.0
    sx = M.conv2_separable(x, _SOBEL_SMOOTH, _SOBEL_DIFF, "same")
    sy = M.conv2_separable(x, (1.0, 0.0, -1.0), _SOBEL_SMOOTH, "same")
    g = torch.sqrt(sx * sx + sy * sy)
    zero = sx == 0
    angle = torch.atan(sy.div_(sx.masked_fill_(zero, 1.0))).masked_fill_(zero, math.pi / 2)
    return g, angle


def _qabf_plane(f: Tensor, g_v: Tensor, a_v: Tensor, g_i: Tensor, a_i: Tensor) -> Tensor:
    tg, kg, dg, ta, ka, da = 0.9994, -15.0, 0.5, 0.9879, -22.0, 0.8
    g_f, a_f = _qabf_prep(f)
    num = torch.zeros(f.shape[0], dtype=f.dtype, device=f.device)
    for g_s, a_s in ((g_v, a_v), (g_i, a_i)):
        ratio = torch.minimum(g_s, g_f).div_(torch.maximum(g_s, g_f))
        ratio = torch.where(g_s == g_f, g_f, ratio)
        align = (a_s - a_f).abs_().div_(math.pi / 2).neg_().add_(1.0)
        q_g = ratio.sub_(dg).mul_(kg).exp_().add_(1.0).reciprocal_().mul_(tg)
        q_a = align.sub_(da).mul_(ka).exp_().add_(1.0).reciprocal_().mul_(ta)
        num += _sum2(q_g.mul_(q_a).mul_(g_s))
    return num / (_sum2(g_v) + _sum2(g_i))


@register_metric("Qabf", definition="vifb", higher_is_better=True, colour=True)
def qabf(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """``metricsQabf``: Xydeas-Petrovic Q^{AB/F} per channel, averaged.

    As coded: the images are ``double``-ed (so a single-channel F gets unrounded
    ``rgb2gray`` sources) and then passed through ``255*im2double``, a no-op for doubles
    except the factor: the values go up to 65025. Sobel by ``conv2(..., 'same')`` (zero
    padding), x = [-1 0 1; -2 0 2; -1 0 1], y = [1 2 1; 0 0 0; -1 -2 -1]; orientation
    ``atan(Sy/Sx)``, pi/2 where Sx == 0; strength ratio min/max except that it is set to
    gF (not 1) where gA == gF (with the x255 scaling gF is then >= 255, so Qg = Tg up to
    rounding; where both are 0 the ratio is 0); Tg = 0.9994, kg = -15, Dg = 0.5,
    Ta = 0.9879, ka = -22, Da = 0.8; Q = sum(QAF gA + QBF gB) / sum(gA + gB) (L = 1).
    """
    vi, ir = _channels(a, b, fused, gray_uint8=False)
    return _planewise(fused, [vi, ir], _qabf_plane, _qabf_prep)


# ----------------------------------------------------------------------------- Qcb Qcv


def _normalize1(x: Tensor) -> Tensor:
    """Z. Liu's ``normalize1``, per plane: ``round(255 (x - min) / (max - min))``.

    An all-zero plane is returned unchanged; any other constant plane becomes NaN (0/0),
    as in MATLAB.
    """
    hi = x.amax(dim=(-2, -1), keepdim=True)
    lo = x.amin(dim=(-2, -1), keepdim=True)
    out = M.matlab_round((x - lo).div_(hi - lo).mul_(255.0))
    zero = (hi == 0) & (lo == 0)
    return torch.where(zero, x, out) if bool(zero.any()) else out


def _chen_blum_sd(r: Tensor) -> Tensor:
    return torch.exp(-((r / 15.3870) ** 2)) - 0.7622 * torch.exp(-((r / 1.3456) ** 2))


def _mannos_sakrison(r: Tensor) -> Tensor:
    return 2.6 * (0.0192 + 0.144 * r) * torch.exp(-((0.144 * r) ** 1.1))


_RESPONSES = {"chen_blum": (_chen_blum_sd, 30.0), "mannos_sakrison": (_mannos_sakrison, 8.0)}


@functools.lru_cache(maxsize=16)
def _shifted_response(name: str, h: int, w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The first ``w // 2 + 1`` columns of ``ifftshift(response(r))``, r on ``freqspace([h w])``
    scaled by (w/s, h/s) (Chen-Blum s = 30: ``u = lie/30 * u``; Chen-Varshney s = 8).

    The code filters with ``ifft2(ifftshift(fftshift(fft2(x)) .* response))``. r depends
    on u^2 + v^2 only, and in FFT order ``freqspace``'s grid is exactly symmetric (for even
    sizes the lone -1 sits on the Nyquist index, its own mirror), so the response is
    exactly even, the filtered image of a real x is real and MATLAB's complex result
    differs from it by FFT rounding only (imaginary parts ~1e-16 relative). This is why
    the filtering is done here with ``rfft2`` / ``irfft2`` and this half of the response.
    """
    response, scale = _RESPONSES[name]
    u, v = M.freqspace(h, w, dtype=dtype, device=device)
    u = (w / scale) * u
    v = (h / scale) * v
    full = torch.fft.ifftshift(response(torch.sqrt(u * u + v * v)), dim=(-2, -1))
    return full[:, : w // 2 + 1].contiguous()


def _csf_filter(spectrum: Tensor, name: str, h: int, w: int) -> Tensor:
    """The real image ``ifft2(fft2(x) .* response)`` from ``spectrum = rfft2(x)``."""
    response = _shifted_response(name, h, w, spectrum.real.dtype, spectrum.device)
    return torch.fft.irfft2(spectrum * response, s=(h, w))


@functools.lru_cache(maxsize=4)
def _liu_gaussians(dtype: torch.dtype, device: torch.device) -> Tensor:
    """Liu's ``gaussian2d`` for sigma 2 and 4, stacked: ``exp(-(x^2 + y^2) / (2 s^2)) / (2 pi s^2)``
    on -15..15, *not* normalised."""
    x = torch.arange(-15, 16, dtype=dtype, device=device)
    r2 = x[None, :] ** 2 + x[:, None] ** 2
    return torch.stack([torch.exp(-r2 / (2 * s * s)) / (2 * math.pi * s * s) for s in (2.0, 4.0)])


def _qcb_prep(x: Tensor) -> Features:
    """``C^p / (h C^q + Z)`` (k = h = 1, p = 3, q = 2, Z = 1e-4) of Chen-Blum's local contrast C."""
    h, w = x.shape[-2:]
    filtered = _csf_filter(torch.fft.rfft2(_normalize1(x)), "chen_blum", h, w)
    kernels = _liu_gaussians(x.dtype, x.device)
    buff, buff1 = M.filter2_fft(kernels, filtered, "same").unbind(dim=-3)
    c = (buff / buff1 - 1).abs()
    return (c.pow(3.0).div_(c.pow(2.0).add_(0.0001)),)


def _qcb_plane(f: Tensor, c1p: Tensor, c2p: Tensor) -> Tensor:
    (cfp,) = _qcb_prep(f)

    def preservation(cp: Tensor) -> Tensor:
        mask = (cp < cfp).to(cp.dtype)
        return (cp / cfp).mul_(mask).add_((cfp / cp).mul_(1 - mask))

    s1, s2 = c1p * c1p, c2p * c2p
    total = s1 + s2
    quality = preservation(c1p).mul_(s1.div_(total)).add_(preservation(c2p).mul_(s2.div_(total)))
    return M.mean2(quality)


@register_metric("Qcb", definition="vifb", higher_is_better=True, colour=True)
def qcb(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """``metricsQcb``: Chen-Blum (Z. Liu's ``metricChenBlum``), per channel, averaged.

    As coded: every image is ``normalize1``-ed (min-max to 0..255, rounded); filtered in the
    frequency domain with ``Sd = exp(-(r/15.3870)^2) - 0.7622 exp(-(r/1.3456)^2)``, r on
    MATLAB's ``freqspace`` grid scaled by (W/30, H/30) (``ifft2`` of the product: complex in
    MATLAB, but only through FFT rounding, see :func:`_shifted_response`; its real part is
    used here); local contrast
    ``|filter2(G1, x) ./ filter2(G2, x) - 1|`` with Liu's *unnormalised* 31 x 31 Gaussians
    (sigma 2 and 4, 'same', zero padding); ``CP = C^3 / (C^2 + 1e-4)``; preservation
    ``Q1F = (C1P/CfP) mask + (CfP/C1P)(1 - mask)`` with ``mask = C1P < CfP`` (computed
    arithmetically, so a zero CP gives NaN as in MATLAB); saliency weights
    ``C1P^2 / (C1P^2 + C2P^2)``; the mean of the map. The 31 x 31 filtering is done by FFT
    here (differences ~1e-14 relative).
    """
    vi, ir = _channels(a, b, fused, gray_uint8=False)
    return _planewise(fused, [vi, ir], _qcb_plane, _qcb_prep)


_QCV_WINDOW = 16


def _qcv_prep(x: Tensor) -> Features:
    """normalize1-ed plane's spectrum and Chen-Varshney saliency (block sums of strength^5)."""
    xn = _normalize1(x)
    gx, gy = _sobel(xn)
    strength = torch.sqrt(gx.square_().add_(gy.square_()))
    saliency = M.blkproc_blocks(strength.pow_(5), _QCV_WINDOW).sum(dim=(-2, -1))
    return torch.fft.rfft2(xn), saliency


def _qcv_plane(f: Tensor, spec_v: Tensor, sal_v: Tensor, spec_i: Tensor, sal_i: Tensor) -> Tensor:
    h, w = f.shape[-2:]
    spec_f = torch.fft.rfft2(_normalize1(f))
    num = torch.zeros(f.shape[0], dtype=f.dtype, device=f.device)
    for spec, sal in ((spec_v, sal_v), (spec_i, sal_i)):
        # fft2(x - F) = fft2(x) - fft2(F): the difference of the spectra, filtered.
        filtered = _csf_filter(spec - spec_f, "mannos_sakrison", h, w)
        distortion = M.blkproc_blocks(filtered.square_(), _QCV_WINDOW).sum(dim=(-2, -1)) / (_QCV_WINDOW**2)
        num += _sum2(sal * distortion)
    return num / _sum2(sal_v + sal_i)


@register_metric("Qcv", definition="vifb", higher_is_better=False, colour=True)
def qcv(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """``metricsQcv``: Chen-Varshney (Z. Liu's ``metricChen``), per channel, averaged; lower is better.

    As coded: every image ``normalize1``-ed (min-max to 0..255, rounded); edge strength from
    ``filter2`` Sobel 'same' (zero padding); saliency = ``blkproc`` sum of strength^5 over
    16 x 16 blocks (partial blocks zero-padded); the differences VI - F and IR - F filtered
    in the frequency domain with the Mannos-Sakrison CSF
    ``2.6 (0.0192 + 0.144 r) exp(-(0.144 r)^1.1)``, r on ``freqspace`` scaled by (W/8, H/8);
    distortion = ``blkproc`` ``mean2(x.^2)`` over the zero-padded 16 x 16 block (a partial
    block is still divided by 256); ``Q = sum(l1 D1 + l2 D2) / sum(l1 + l2)``. In MATLAB the
    filtered differences come out of ``ifft2`` complex, with imaginary parts at rounding
    level only (the CSF is exactly even on ``freqspace``'s grid, see
    :func:`_shifted_response`), so ``x.^2`` and Q are complex too (the golden values note
    imaginary parts ~1e-14); VIFB writes the real part, which is what is computed here (with
    real FFTs). The Sobel orientations and the Daly / Ahumada filters the code computes
    are unused.
    """
    vi, ir = _channels(a, b, fused, gray_uint8=False)
    return _planewise(fused, [vi, ir], _qcv_plane, _qcv_prep)
