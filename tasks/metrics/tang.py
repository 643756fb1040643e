"""The ``tang`` metric definitions: Linfeng-Tang/Evaluation-for-Image-Fusion, to the last digit.

This is the MATLAB code behind most published TNO / RoadScene / MSRS tables
(``analysis_Reference.m`` at 0e87153 and the ``analysis_*.m`` / ``*_evaluation.m`` files
it calls). Its current ``analysis_Reference`` receives uint8 images, computes EN and MI on
the uint8 values, and everything else on ``im2double(x) * 255`` (float64 on 0..255; MSE
and PSNR rescale to 0..1 themselves). Each function below documents the quirks of the
reference code that it reproduces on purpose; see ``../shared/metrics/README.md`` and
``golden.tsv`` for the values it is tested against.

Every metric is ``fn(a, b, fused) -> Tensor[N]`` with ``a`` = ir (first source),
``b`` = vi (second source) and ``fused`` float64 tensors shaped (N, 1, H, W) on 0..255
(a batch of same-size single-channel images; colour images must be converted with
MATLAB ``rgb2gray`` and rounded first, as the reference code does). Computation is
batched torch on the inputs' device. The MATLAB primitives (``filter2``, ``imfilter``,
``gradient``, ``edge``, ``dct2``, ``ssim``, histograms) live in :mod:`.matlab`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from timfusion.tasks.metrics import matlab as M
from timfusion.tasks.metrics.registry import register_metric

DEFINITION = "tang"


# On the CPU a batch of large images is evaluated one image at a time: the metrics are
# memory-bound chains of whole-image operations, and one image's planes stay in cache
# where a batch's do not (1.2-1.7x faster per image on a 2-core CPU at 640x480).
_CPU_PER_IMAGE_PIXELS = 1 << 16


def _cpu_per_image(
    fn: Callable[[Tensor, Tensor, Tensor], Tensor],
) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """Run ``fn`` image by image for CPU batches of large images (same results, better locality)."""

    @functools.wraps(fn)
    def wrapper(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
        n = fused.shape[0] if fused.dim() >= 3 else 1
        if (
            fused.device.type == "cpu"
            and n > 1
            and fused.shape[-1] * fused.shape[-2] >= _CPU_PER_IMAGE_PIXELS
        ):
            return torch.cat([fn(a[i : i + 1], b[i : i + 1], fused[i : i + 1]) for i in range(n)])
        return fn(a, b, fused)

    return wrapper


def _plane(x: Tensor) -> Tensor:
    """(N, 1, H, W) (or (N, H, W) / (H, W)) -> float64 (N, H, W)."""
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(
                f"tang metrics take single-channel images shaped (N, 1, H, W), got {tuple(x.shape)}; "
                "convert colour images with MATLAB rgb2gray (timfusion.tasks.colour.rgb_to_gray) first"
            )
        x = x[:, 0]
    elif x.dim() == 2:
        x = x[None]
    elif x.dim() != 3:
        raise ValueError(f"expected images shaped (N, 1, H, W), got {tuple(x.shape)}")
    return x.to(torch.float64)


def _planes(a: Tensor, b: Tensor, fused: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    a, b, f = _plane(a), _plane(b), _plane(fused)
    if not (a.shape == b.shape == f.shape):
        raise ValueError(f"images must have the same shape, got {a.shape}, {b.shape}, {f.shape}")
    return a, b, f


def _sum2(x: Tensor) -> Tensor:
    return x.sum(dim=(-2, -1))


# ----------------------------------------------------------------------------- simple statistics


@register_metric("EN", definition=DEFINITION, higher_is_better=True)
@_cpu_per_image
def en(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """Entropy (bits) of the fused image: MATLAB ``entropy(uint8 F)``, a 256-bin ``imhist``.

    The reference passes the uint8 image, so non-integer inputs are first rounded as
    ``uint8()`` does (clip to 0..255, half away from zero).
    """
    return M.entropy(_plane(fused))


@register_metric("SD", definition=DEFINITION, higher_is_better=True)
@_cpu_per_image
def sd(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """Population standard deviation of F: ``sqrt(sum((F - mean)^2) / (M N))`` (SD_evaluation.m)."""
    return M.std2_population(_plane(fused))


@register_metric("SF", definition=DEFINITION, higher_is_better=True)
@_cpu_per_image
def sf(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """Spatial frequency ``sqrt(RF^2 + CF^2)`` (SF_evaluation.m).

    ``RF^2`` is the mean of the squared vertical differences ``diff(F, 1, 1)`` over their
    (M-1) N entries and ``CF^2`` that of the horizontal ones over M (N-1) (not over M N as
    in VIFB's code).
    """
    f = _plane(fused)
    rf = ((f[..., 1:, :] - f[..., :-1, :]) ** 2).mean(dim=(-2, -1))
    cf = ((f[..., :, 1:] - f[..., :, :-1]) ** 2).mean(dim=(-2, -1))
    return torch.sqrt(rf + cf)


@register_metric("AG", definition=DEFINITION, higher_is_better=True)
@_cpu_per_image
def ag(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """Average gradient (AG_evaluation.m).

    MATLAB ``[gx, gy] = gradient(F)`` (central differences inside, one-sided on the
    borders), ``sum(sqrt((gx^2 + gy^2) / 2))`` divided by ``(M-1)(N-1)`` although the sum
    runs over all M N pixels (quirk kept: the value is slightly larger than a mean).
    """
    f = _plane(fused)
    gx, gy = M.gradient(f)
    h, w = f.shape[-2:]
    return _sum2(torch.sqrt((gx * gx + gy * gy) / 2)) / ((h - 1) * (w - 1))


def _mutual_information(v_src: Tensor, v_f: Tensor, h_src: Tensor, h_f: Tensor) -> Tensor:
    """MI in bits of uint8 value maps (N, HW) with their marginal histograms (N, 256)."""
    # Hab.m indexes counter(a + 1, f + 1) with a, f uint8: 255 + 1 saturates to 255, so
    # the values 254 and 255 share the last joint bin (1-based 255 = 0-based 254).
    joint_index = v_src.clamp(max=254) * 256 + v_f.clamp(max=254)
    joint = M.bincount_rows(joint_index, 256 * 256).to(torch.float64)
    return M.entropy_from_counts(h_src) + M.entropy_from_counts(h_f) - M.entropy_from_counts(joint)


@register_metric("MI", definition=DEFINITION, higher_is_better=True)
@_cpu_per_image
def mi(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """Mutual information ``MI(A, F) + MI(B, F)`` in bits (MI_evaluation.m on uint8 images).

    Marginal entropies are MATLAB ``entropy`` (256-bin ``imhist``). Quirk: the joint
    histogram (``Hab.m``) is indexed with ``uint8(x) + 1``, which saturates at 255, so
    grey levels 254 and 255 are merged in the joint histogram only (not in the
    marginals); images with many 254/255 pixels get a slightly different MI than a
    textbook implementation.
    """
    va, vb, vf = (M.im2uint8_values(x).flatten(1) for x in _planes(a, b, fused))
    ha, hb, hf = (M.bincount_rows(v, 256).to(torch.float64) for v in (va, vb, vf))
    return _mutual_information(va, vf, ha, hf) + _mutual_information(vb, vf, hb, hf)


@register_metric("CC", definition=DEFINITION, higher_is_better=True)
@_cpu_per_image
def cc(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """Correlation coefficient ``(r(A,F) + r(B,F)) / 2`` (CC_evaluation.m).

    Quirk reproduced: the numerator of ``r(B,F)`` centres B with ``mean(A)``, i.e.
    ``sum((B - mean(A)) .* (F - mean(F)))``; since ``sum(F - mean(F))`` is zero this
    equals Pearson's r up to rounding (~1e-15 relative).
    """
    a, b, f = _planes(a, b, fused)
    ma, mb, mf = (M.mean2(x)[..., None, None] for x in (a, b, f))
    fc = f - mf
    sff = _sum2(fc * fc)
    r_af = _sum2((a - ma) * fc) / torch.sqrt(_sum2((a - ma) ** 2) * sff)
    r_bf = _sum2((b - ma) * fc) / torch.sqrt(_sum2((b - mb) ** 2) * sff)
    return (r_af + r_bf) / 2


@register_metric("SCD", definition=DEFINITION, higher_is_better=True)
@_cpu_per_image
def scd(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """Sum of the correlations of differences ``corr2(F - B, A) + corr2(F - A, B)`` (analysis_SCD.m)."""
    a, b, f = _planes(a, b, fused)
    return M.corr2(f - b, a) + M.corr2(f - a, b)


def _mse01(a: Tensor, b: Tensor, f: Tensor) -> Tensor:
    a, b, f = a / 255.0, b / 255.0, f / 255.0
    h, w = f.shape[-2:]
    mse_af = _sum2((f - a) ** 2) / (h * w)
    mse_bf = _sum2((f - b) ** 2) / (h * w)
    return 0.5 * mse_af + 0.5 * mse_bf


@register_metric("MSE", definition=DEFINITION, higher_is_better=False)
@_cpu_per_image
def mse(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """``(MSE(F,A) + MSE(F,B)) / 2`` on the [0, 1] scale (MSE_evaluation.m divides by 255 first).

    So the value is 65025 times smaller than an MSE on 0..255.
    """
    return _mse01(*_planes(a, b, fused))


@register_metric("PSNR", definition=DEFINITION, higher_is_better=True)
@_cpu_per_image
def psnr(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """``20 log10(255 / sqrt(MSE))`` with the [0, 1]-scale MSE of :func:`mse` (PSNR_evaluation.m).

    Quirk: the peak is 255 while the MSE is on [0, 1], so the value is the standard PSNR
    (peak 255, MSE on 0..255) plus ``20 log10(255) = 48.13`` dB.
    """
    return 20 * torch.log10(255.0 / torch.sqrt(_mse01(*_planes(a, b, fused))))


# ----------------------------------------------------------------------------- VIF


def _vifp_mscale(refs: list[Tensor], dist: Tensor, scales: int = 4, sigma_nsq: float = 2.0) -> list[Tensor]:
    """``vifp_mscale(ref, dist)`` of each reference in ``refs`` (N, H, W) against the same ``dist``.

    The maps of ``dist`` are filtered once; each reference is processed on its own so
    that the working set of image planes stays cache-sized.
    """
    num = [dist.new_zeros(dist.shape[:-2]) for _ in refs]
    den = [dist.new_zeros(dist.shape[:-2]) for _ in refs]
    for scale in range(1, scales + 1):
        n = 2 ** (scales - scale + 1) + 1
        g = M.gaussian_1d(n, n / 5.0)

        def filt(x: Tensor, g: list[float] = g) -> Tensor:
            return M.filter2_separable(g, g, x, "valid")

        if scale > 1:
            refs = [filt(x)[..., ::2, ::2].contiguous() for x in refs]
            dist = filt(dist)[..., ::2, ::2].contiguous()
        mu2 = filt(dist)
        sigma2_sq = filt(dist * dist).sub_(mu2 * mu2).clamp_(min=0)
        low2 = sigma2_sq < 1e-10
        for k, ref in enumerate(refs):
            mu1 = filt(ref)
            sigma1_sq = filt(ref * ref).sub_(mu1 * mu1).clamp_(min=0)
            sigma12 = filt(ref * dist).sub_(mu1.mul_(mu2))
            # vifp_mscale.m zeroes g where sigma1_sq < 1e-10, sigma2_sq < 1e-10 or g < 0, and
            # then the information term log10(1 + g^2 sigma1_sq / (sv_sq + sigma_nsq)) is
            # exactly 0 whatever sv_sq is; elsewhere sv_sq = max(sigma2_sq - g sigma12, 1e-10).
            g_map = sigma12 / (sigma1_sq + 1e-10)
            sv_sq = sigma12.mul_(g_map).neg_().add_(sigma2_sq).clamp_(min=1e-10)
            low1 = sigma1_sq < 1e-10
            no_info = low1 | low2 | (g_map < 0)
            info = g_map.mul_(g_map).mul_(sigma1_sq).div_(sv_sq.add_(sigma_nsq)).masked_fill_(no_info, 0.0)
            num[k] += _sum2(info.add_(1).log10_())
            # sigma1_sq < 1e-10 is set to 0 before the denominator term.
            den[k] += _sum2(sigma1_sq.masked_fill_(low1, 0.0).div_(sigma_nsq).add_(1).log10_())
    return [n_ / d_ for n_, d_ in zip(num, den, strict=True)]


@register_metric("VIF", definition=DEFINITION, higher_is_better=True)
@_cpu_per_image
def vif(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """``vifp_mscale(A, F) + vifp_mscale(B, F)``: Sheikh-Bovik pixel-domain VIF, summed (not averaged).

    4 scales with ``fspecial('gaussian', N, N/5)`` windows, N = 17, 9, 5, 3; 'valid'
    ``filter2``; at scales 2-4 the images are first filtered ('valid') and decimated by 2
    (``x(1:2:end, 1:2:end)``); sigma_nsq = 2 and the 1e-10 guards of vifp_mscale.m.
    The result is a sum of two VIFs, so it ranges over 0..2 (and above 2 for
    contrast-enhancing fusion).
    """
    a, b, f = _planes(a, b, fused)
    vif_af, vif_bf = _vifp_mscale([a, b], f)
    return vif_af + vif_bf


# ----------------------------------------------------------------------------- Qabf


def _sobel_qabf(x: Tensor) -> tuple[Tensor, Tensor]:
    # conv2(x, h3, 'same'), h3 = [-1 0 1; -2 0 2; -1 0 1] -> correlation with the flipped
    # kernel [1 2 1]' * [1 0 -1]; conv2(x, h1, 'same'), h1 = [1 2 1; 0 0 0; -1 -2 -1] ->
    # correlation with [-1 0 1]' * [1 2 1]. Zero padding.
    xp = M.padarray(x, (1, 1, 1, 1), 0.0)
    sx = M.filter2_separable([1.0, 2.0, 1.0], [1.0, 0.0, -1.0], xp, "valid")
    sy = M.filter2_separable([-1.0, 0.0, 1.0], [1.0, 2.0, 1.0], xp, "valid")
    g = torch.addcmul(sx * sx, sy, sy).sqrt_()
    # atan(Sy/Sx), pi/2 where Sx == 0; computed as atan2(sign(Sx) Sy, |Sx|), which is the
    # same angle in (-pi/2, pi/2) (to an ulp: there is no rounded quotient) and cheaper.
    zero = sx == 0
    angle = torch.atan2(sy.mul_(torch.sign(sx)), sx.abs_()).masked_fill_(zero, math.pi / 2)
    return g, angle


def _qabf_edge_preservation(g_src: Tensor, a_src: Tensor, g_f: Tensor, a_f: Tensor) -> Tensor:
    tg, kg, dg, ta, ka, da = 0.9994, -15.0, 0.5, 0.9879, -22.0, 0.8
    # min(gA,gF)/max(gA,gF), except the quirk of analysis_Qabf.m: gF (not 1) where gA == gF.
    g_rel = torch.minimum(g_src, g_f).div_(torch.maximum(g_src, g_f))
    g_rel = torch.where(g_src == g_f, g_f, g_rel)
    a_rel = (a_src - a_f).abs_().div_(-math.pi / 2).add_(1)
    qg = g_rel.sub_(dg).mul_(kg).exp_().add_(1).reciprocal_().mul_(tg)
    qa = a_rel.sub_(da).mul_(ka).exp_().add_(1).reciprocal_().mul_(ta)
    return qg.mul_(qa)


@register_metric("Qabf", definition=DEFINITION, higher_is_better=True)
@_cpu_per_image
def qabf(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """Xydeas-Petrovic edge-information transfer Q^{AB/F} (analysis_Qabf.m).

    Sobel responses by zero-padded 'same' ``conv2`` with x = [-1 0 1; -2 0 2; -1 0 1] and
    y = [1 2 1; 0 0 0; -1 -2 -1]; strength ``sqrt(Sx^2 + Sy^2)``, angle ``atan(Sy/Sx)``
    (pi/2 where Sx == 0); Tg = 0.9994, kg = -15, Dg = 0.5, Ta = 0.9879, ka = -22, Da = 0.8;
    weights gA, gB (L = 1). Quirk: the relative strength ``min(gA,gF)/max(gA,gF)`` is set
    to ``gF`` (not 1) where ``gA == gF``. That only matters where gA == gF != 0 (e.g. the
    fused image copies a source locally): Q_g is then ``Tg/(1+exp(-15 (gF - 0.5)))``, about
    Tg = 0.9994 for gF >= 1, instead of ``Tg/(1+e^-7.5)`` = 0.99884 (and it would drop for
    gradients below 1, which integer images do not have). The images are 0..255 doubles
    (``im2double(x) * 255``), so gradients are in grey levels.
    """
    a, b, f = _planes(a, b, fused)
    g_f, angle_f = _sobel_qabf(f)
    numerator = torch.zeros_like(f[..., 0, 0])
    denominator = torch.zeros_like(numerator)
    for src in (a, b):
        g_s, angle_s = _sobel_qabf(src)
        numerator += _sum2(_qabf_edge_preservation(g_s, angle_s, g_f, angle_f).mul_(g_s))
        denominator += _sum2(g_s)
    return numerator / denominator


# ----------------------------------------------------------------------------- Nabf


def _sobel_nabf(x: Tensor) -> tuple[Tensor, Tensor]:
    # sobel_fn.m: per_extn_im_fn extends by one pixel mirroring *without* repeating the
    # border (row 0 := row 2), then correlates with vtemp = [-1 0 1; -2 0 2; -1 0 1]/8
    # (= [1 2 1]' * [-1 0 1] / 8) and htemp = [-1 -2 -1; 0 0 0; 1 2 1]/8.
    xp = M.padarray(x, (1, 1, 1, 1), "reflect")
    gv = M.filter2_separable([1.0, 2.0, 1.0], [-0.125, 0.0, 0.125], xp, "valid")
    gh = M.filter2_separable([-1.0, 0.0, 1.0], [0.125, 0.25, 0.125], xp, "valid")
    return gv, gh


def _nabf(fused: Tensor, x1: Tensor, x2: Tensor) -> Tensor:
    """``analysis_nabf(f, I1, I2)``: Shreyamsha Kumar's modified fusion-artifact measure N_ABF."""
    td, wt_min, lg = 2.0, 0.001, 1.5
    nrg, kg, sigmag = 0.9999, 19.0, 0.5
    nra, ka, sigmaa = 0.9995, 22.0, 0.5
    gv, gh = _sobel_nabf(torch.stack([x1, x2, fused]))
    g = torch.sqrt(gh * gh + gv * gv)
    angle = torch.where((gv == 0) & (gh == 0), 0.0, torch.atan(gv / gh))
    g_a, g_b, g_f = g[0], g[1], g[2]

    def preservation(g_s: Tensor, a_s: Tensor) -> Tensor:
        g_rel = torch.where((g_s == 0) | (g_f == 0), 0.0, torch.where(g_s > g_f, g_f / g_s, g_s / g_f))
        a_rel = torch.abs(torch.abs(a_s - angle[2]) - math.pi / 2) * 2 / math.pi
        qg = nrg / (1 + torch.exp(-kg * (g_rel - sigmag)))
        qa = nra / (1 + torch.exp(-ka * (a_rel - sigmaa)))
        return torch.sqrt(qg * qa)

    q_af = preservation(g_a, angle[0])
    q_bf = preservation(g_b, angle[1])
    wt_a = torch.where(g_a >= td, g_a**lg, wt_min)
    wt_b = torch.where(g_b >= td, g_b**lg, wt_min)
    wt_sum = _sum2(wt_a + wt_b)
    artifact = (g_f > g_a) & (g_f > g_b)
    return _sum2(torch.where(artifact, (1 - q_af) * wt_a + (1 - q_bf) * wt_b, 0.0)) / wt_sum


@register_metric("Nabf", definition=DEFINITION, higher_is_better=False)
@_cpu_per_image
def nabf(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """N_ABF exactly as Tang's current code computes it: ``analysis_nabf(ir, vi, F)``.

    Argument-order bug reproduced: ``analysis_nabf(f, I1, I2)`` expects the fused image
    first, but ``analysis_Reference.m`` passes (A, B, F), so this measures artifacts of
    the *infrared* image with respect to (vi, F). Published "Nabf" columns computed with
    that code are this number; :func:`nabf_fused_first` is the documented metric.
    Sobel/8 with mirror extension, Td = 2, wt_min = 0.001, Lg = 1.5, kg = 19, ka = 22,
    sigma = 0.5, Nrg = 0.9999, Nra = 0.9995.
    """
    a, b, f = _planes(a, b, fused)
    return _nabf(a, b, f)


@register_metric("Nabf_fused_first", definition=DEFINITION, higher_is_better=False)
@_cpu_per_image
def nabf_fused_first(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """Shreyamsha Kumar's modified N_ABF with the documented argument order ``analysis_nabf(F, A, B)``.

    Fraction of edge strength (weighted by ``g^1.5`` where ``g >= 2``, else 0.001) where
    the fused image has stronger gradients than both sources, times the loss of edge
    preservation; see :func:`nabf` for the constants and the argument-order bug.
    """
    a, b, f = _planes(a, b, fused)
    return _nabf(f, a, b)


# ----------------------------------------------------------------------------- SSIM


@register_metric("SSIM_F_ir", definition=DEFINITION, higher_is_better=True)
@_cpu_per_image
def ssim_f_ir(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """MATLAB built-in ``ssim(F, A)`` on 0..255 doubles (dynamic range 1; see :func:`ssim`)."""
    a, _, f = _planes(a, b, fused)
    return M.ssim(f, a, dynamic_range=1.0)


@register_metric("SSIM_F_vi", definition=DEFINITION, higher_is_better=True)
@_cpu_per_image
def ssim_f_vi(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """MATLAB built-in ``ssim(F, B)`` on 0..255 doubles (dynamic range 1; see :func:`ssim`)."""
    _, b, f = _planes(a, b, fused)
    return M.ssim(f, b, dynamic_range=1.0)


@register_metric("SSIM", definition=DEFINITION, higher_is_better=True)
@_cpu_per_image
def ssim(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """``0.5 ssim(F, A) + 0.5 ssim(F, B)`` with MATLAB's built-in ``ssim``.

    Quirk: the images are 0..255 *doubles*, for which MATLAB's ``ssim`` assumes a dynamic
    range of 1, so C1 = 1e-4 and C2 = 9e-4 (instead of 6.5 and 58.5): the stabilising
    constants are negligible and dark, flat regions weigh as much as textured ones.
    Gaussian sigma 1.5 on an 11x11 window, replicate padding, mean of the full map.
    """
    a, b, f = _planes(a, b, fused)
    ssim_fa, ssim_fb = M.ssim_multi(f, [a, b], dynamic_range=1.0)
    return 0.5 * ssim_fa + 0.5 * ssim_fb


# ----------------------------------------------------------------------------- MEF-SSIM ("MS_SSIM")


def _flat_windows(x: Tensor, size: int) -> Tensor:
    """True where the ``size`` x ``size`` 'valid' window of x is constant."""
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, *x.shape[-2:])
    hi = F.max_pool2d(flat, size, stride=1)
    lo = -F.max_pool2d(-flat, size, stride=1)
    return (hi == lo).reshape(*lead, *hi.shape[-2:])


def _mef_ssim_level(seq: Tensor, f: Tensor, k: float = 0.03, size: int = 11, sigma: float = 1.5) -> Tensor:
    """``mef_ssim(imgSeq, fI)`` of Ma et al. for two sources: ``seq`` (2, N, H, W), ``f`` (N, H, W).

    Closed form of the per-window loop of mef_ssim.m: the reference block
    ``r = sum_k w_k (X_k - mu_k) / ed_k`` rescaled to norm ``max_k ed_k`` is a linear
    combination of the two mean-removed source blocks, so its Gaussian-weighted variance
    and covariance with F follow from (co)variances of the sources, computed with
    separable 'valid' filters. Windows where a source is constant have that source's
    (co)variances set to exactly 0 (MATLAB gets ~1e-13 rounding noise there, whose effect
    on the index is below 1e-9).
    """
    eps = M.MATLAB_EPS
    xa, xb = seq[0], seq[1]
    n2 = float(size * size)
    box = [1.0 / size] * size
    g = M.gaussian_1d(size, sigma)

    bx = M.filter2_separable(box, box, torch.stack([xa, xb, xa * xa, xb * xb, xa * xb]), "valid")
    mu_a, mu_b, e_aa, e_bb, e_ab = bx.unbind(0)
    gx = M.filter2_separable(
        g, g, torch.stack([xa, xb, f, xa * xa, xb * xb, f * f, xa * xb, xa * f, xb * f]), "valid"
    )
    ga, gb, gf, g_aa, g_bb, g_ff, g_ab, g_af, g_bf = gx.unbind(0)

    flat_a, flat_b = _flat_windows(seq, size).unbind(0)
    zero = torch.zeros((), dtype=xa.dtype, device=xa.device)
    var_a = torch.where(flat_a, zero, e_aa - mu_a * mu_a)  # box variance (sigmaSq)
    var_b = torch.where(flat_b, zero, e_bb - mu_b * mu_b)
    cov_ab = torch.where(flat_a | flat_b, zero, e_ab - mu_a * mu_b)
    ed_a = torch.sqrt(torch.clamp(n2 * var_a, min=0)) + 0.001
    ed_b = torch.sqrt(torch.clamp(n2 * var_b, min=0)) + 0.001

    # Structural consistency R = (||sum_k x_k - mean|| + eps) / (sum_k ||x_k - mu_k|| + eps).
    numerator = torch.sqrt(torch.clamp(n2 * (var_a + var_b + 2 * cov_ab), min=0))
    denominator = torch.sqrt(torch.clamp(n2 * var_a, min=0)) + torch.sqrt(torch.clamp(n2 * var_b, min=0))
    r = (numerator + eps) / (denominator + eps)
    r = torch.where(r > 1, 1 - eps, r)
    r = torch.where(r < 0, 0 + eps, r)
    p = torch.tan(math.pi / 2 * r).clamp(max=10)

    w_a = (ed_a / size) ** p + eps
    w_b = (ed_b / size) ** p + eps
    total = w_a + w_b
    alpha_a = (w_a / total) / ed_a
    alpha_b = (w_b / total) / ed_b
    max_ed = torch.maximum(ed_a, ed_b)

    # ||r||^2 over the box window, then the rescaling to norm max_ed.
    norm_sq = n2 * (alpha_a * alpha_a * var_a + 2 * alpha_a * alpha_b * cov_ab + alpha_b * alpha_b * var_b)
    norm = torch.sqrt(torch.clamp(norm_sq, min=0))
    scale = torch.where(norm > 0, max_ed / torch.where(norm > 0, norm, 1.0), 0.0)

    cg_aa = torch.where(flat_a, zero, g_aa - ga * ga)
    cg_bb = torch.where(flat_b, zero, g_bb - gb * gb)
    cg_ab = torch.where(flat_a | flat_b, zero, g_ab - ga * gb)
    cg_af = torch.where(flat_a, zero, g_af - ga * gf)
    cg_bf = torch.where(flat_b, zero, g_bf - gb * gf)
    sigma1_sq = (
        scale
        * scale
        * (alpha_a * alpha_a * cg_aa + 2 * alpha_a * alpha_b * cg_ab + alpha_b * alpha_b * cg_bb)
    )
    sigma2_sq = g_ff - gf * gf
    sigma12 = scale * (alpha_a * cg_af + alpha_b * cg_bf)

    c = (k * 255) ** 2
    q_map = (2 * sigma12 + c) / (sigma1_sq + sigma2_sq + c)
    return M.mean2(q_map)


@register_metric("MS_SSIM", definition=DEFINITION, higher_is_better=True)
@_cpu_per_image
def ms_ssim(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """The "MS_SSIM" as coded: ``analysis_ms_ssim([A, B], F)``, i.e. Ma et al.'s multi-scale MEF-SSIM.

    Quirk: this is *not* Wang's MS-SSIM. It is the multi-exposure-fusion quality index
    of Ma, Zeng & Wang (2015) with the image stack [A, B] as reference: per 11x11 window
    a reference patch is synthesised from the sources' structures (weighted by a
    consistency-dependent power of their contrast) and compared with F by the SSIM
    structure term with C = (0.03 * 255)^2; 3 levels (2x2 mean with symmetric padding,
    then decimation) combined as ``prod(Q_l ^ w_l)``, w = [0.0448 0.2856 0.3001]
    normalised. Images smaller than 44 pixels on a side return -inf, as the reference. A
    negative level score (F anti-correlated with the sources) gives NaN, where MATLAB's
    ``Q.^weight`` returns a complex number.
    """
    a, b, f = _planes(a, b, fused)
    levels, size = 3, 11
    weight = torch.tensor([0.0448, 0.2856, 0.3001], dtype=torch.float64, device=f.device)
    weight = weight / weight.sum()
    if min(f.shape[-2:]) / 2 ** (levels - 1) < size:
        return torch.full(f.shape[:1], -math.inf, dtype=torch.float64, device=f.device)
    seq = torch.stack([a, b])
    q = []
    for level in range(levels):
        q.append(_mef_ssim_level(seq, f))
        if level < levels - 1:
            both = torch.cat([seq, f[None]], dim=0)
            both = M.imfilter_separable(both, [0.5, 0.5], [0.5, 0.5], "symmetric", "same")[..., ::2, ::2]
            seq, f = both[:2], both[2]
    q_all = torch.stack(q, dim=-1)
    return torch.prod(q_all**weight, dim=-1)


# ----------------------------------------------------------------------------- FMI


_FMI_BLOCK = 4096  # windows per block in the vectorised fast-FMI (~10 MB per temporary)


def _column_major_windows(x: Tensor, w: int) -> Tensor:
    """(N, H, W) -> (N, L, w*w): every w x w window flattened column-major (MATLAB ``X(:)``)."""
    if min(x.shape[-2:]) < w:
        raise ValueError(f"image {x.shape[-2]}x{x.shape[-1]} is smaller than the {w}x{w} window")
    xt = x.transpose(-2, -1).unsqueeze(1).contiguous()
    return F.unfold(xt, w).transpose(1, 2)


def _minmax_normalise(x: Tensor) -> Tensor:
    hi = x.amax(dim=-1, keepdim=True)
    lo = x.amin(dim=-1, keepdim=True)
    return torch.where(hi == lo, torch.ones_like(x), (x - lo) / (hi - lo))


def _sequential_sum(x: Tensor) -> Tensor:
    """Sum over the last dim strictly left to right, as MATLAB's ``sum`` of a short vector."""
    total = x[..., 0].clone()
    for k in range(1, x.shape[-1]):
        total += x[..., k]
    return total


def _pdf_stats(s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """pdf, cdf, centred pdf, population sd of the index distribution and entropy of windows (..., w*w).

    Sums follow MATLAB's order exactly: ``sum(sum(sub))`` adds each column top to bottom
    and then the column sums; ``mean`` and the moments add left to right. This matters:
    a constant window has the pdf ``fl(1/9)`` everywhere, whose sequential mean is one ulp
    above it, so its centred pdf is ~-3e-17 rather than 0 and ``sum(aTemp .* fTemp)`` is
    not exactly 0; the correlation c of two constant windows is then 1 (not 0), and the
    fast-FMI of the pair 1 rather than ~0.
    """
    l = s.shape[-1]
    w = math.isqrt(l)
    columns = [_sequential_sum(s[..., c * w : (c + 1) * w]) for c in range(w)]
    window_sum = columns[0]
    for col in columns[1:]:
        window_sum = window_sum + col
    pdf = s / window_sum[..., None]
    cdf = torch.cumsum(pdf, dim=-1)
    centred = pdf - (_sequential_sum(pdf) / l)[..., None]
    i = torch.arange(1, l + 1, dtype=s.dtype, device=s.device)
    sd = torch.sqrt(_sequential_sum(i * i * pdf) - _sequential_sum(i * pdf) ** 2)
    nz = pdf != 0
    ent = _sequential_sum(torch.where(nz, -pdf * torch.log2(torch.where(nz, pdf, 1.0)), 0.0))
    return pdf, cdf, centred, sd, ent


def _fmi_pair(xs: Tensor, f_stats: tuple[Tensor, ...]) -> Tensor:
    """Normalised feature MI of min-max normalised source windows ``xs`` (..., l) and F's."""
    x_pdf, x_cdf, x_c, x_sd, x_entropy = _pdf_stats(xs)
    f_pdf, f_cdf, f_c, f_sd, f_entropy = f_stats
    sxf = _sequential_sum(x_c * f_c)
    norms = _sequential_sum(x_c * x_c) * _sequential_sum(f_c * f_c)
    corr = torch.where(sxf == 0, 0.0, sxf / torch.sqrt(norms))

    # Frechet bounds of the joint cdf, fused index i (rows) x source index j (columns):
    # upper 0.5 (F_i + X_j - |F_i - X_j|) = min, lower 0.5 (F_i + X_j - 1 + |F_i + X_j - 1|).
    fc = f_cdf[..., :, None]
    xc = x_cdf[..., None, :]
    total = fc + xc
    positive = (corr >= 0)[..., None, None]
    upper = (total - (fc - xc).abs_()).mul_(0.5)
    lower = total.sub_(1)
    lower = lower.add_(lower.abs()).mul_(0.5)
    bound = torch.where(positive, upper, lower)
    independent = fc * xc
    # phi (c >= 0) or theta (c < 0): c / (cov of the bound / (sd_F sd_X)); 0 when degenerate.
    cov = (bound - independent).sum(dim=(-2, -1))
    degenerate = (x_sd == 0) | (f_sd == 0) | (corr == 0)
    coef = torch.where(degenerate, 0.0, corr / (cov / (f_sd * x_sd)))[..., None, None]

    # Joint pdf mass of each cell: 2-D difference of the bound (zero before the first row/col).
    padded = F.pad(bound, (1, 0, 1, 0))
    cell = ((padded[..., 1:, 1:] - padded[..., :-1, 1:]) - padded[..., 1:, :-1]) + padded[..., :-1, :-1]
    jpdf = (coef * cell).add_(((1 - coef) * f_pdf[..., :, None]) * x_pdf[..., None, :])
    # real(-p log2 p): for negative p MATLAB's complex log keeps -p log2|p| as real part.
    nz = jpdf != 0
    joint_entropy = (-jpdf * torch.log2(torch.where(nz, jpdf.abs(), 1.0))).sum(dim=(-2, -1))
    mutual = x_entropy + f_entropy - joint_entropy
    return torch.where(mutual == 0, 0.0, 2 * mutual / (x_entropy + f_entropy))


def _fmi(a_feat: Tensor, b_feat: Tensor, f_feat: Tensor, w: int = 3) -> Tensor:
    """``analysis_fmi`` on feature maps (N, H, W): Haghighat's fast-FMI with a w x w sliding window.

    For each window the source and fused features are min-max normalised (a constant
    window becomes all ones), turned into pdfs over the w*w pixels in MATLAB's
    column-major order, and their joint pdf is built with the simplified Nelsen method
    (Frechet upper or lower bound, chosen by the sign of the Pearson correlation c of the
    two pdfs, mixed with independence by c / corr(bound)); FMI = 2 MI / (H_X + H_F), and 1
    where the raw windows are identical. The value is the mean over the (M-2)(N-2)
    windows of (FMI_AF + FMI_BF) / 2. Quirks reproduced:

    - the B branch compares the raw B window with the F window *already normalised* by
      the A branch (unless A and F were equal), so "identical" is tested against it;
    - two constant windows have c = 1, not 0, because MATLAB's sequential mean of the
      pdf fl(1/9) is an ulp off (see :func:`_pdf_stats`), so they score 1;
    - ``real(-p log2 p)`` for negative joint masses (the Nelsen mixture can go below 0),
      and the ``mi == 0`` test.
    """
    n = a_feat.shape[0]
    wa, wb, wf = (_column_major_windows(x, w).flatten(0, 1) for x in (a_feat, b_feat, f_feat))
    per_window = a_feat.new_empty(wa.shape[0])
    for start in range(0, wa.shape[0], _FMI_BLOCK):
        sa, sb, sf_ = (t[start : start + _FMI_BLOCK] for t in (wa, wb, wf))
        equal_af = (sa == sf_).all(dim=-1)
        fn = _minmax_normalise(sf_)
        # Quirk: the A branch overwrites fSub with its normalised version, so the B branch
        # compares bSub with the *normalised* F window unless A and F were equal (and
        # normalising again leaves it unchanged: its min is exactly 0 and its max 1).
        equal_bf = (sb == torch.where(equal_af[..., None], sf_, fn)).all(dim=-1)
        pair = _fmi_pair(_minmax_normalise(torch.stack([sa, sb])), _pdf_stats(fn))
        fmi_af = torch.where(equal_af, 1.0, pair[0])
        fmi_bf = torch.where(equal_bf, 1.0, pair[1])
        per_window[start : start + _FMI_BLOCK] = (fmi_af + fmi_bf) / 2
    return per_window.view(n, -1).mean(dim=-1)


@register_metric("FMI_edge", definition=DEFINITION, higher_is_better=True)
@_cpu_per_image
def fmi_edge(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """Fast-FMI (3x3 windows, see :func:`_fmi`) of MATLAB ``edge(x)`` maps: what Tang's code calls FMI_pixel.

    Quirk of the naming: ``analysis_Reference`` reports ``analysis_fmi(A, B, F)`` as
    "FMI_pixel", but ``analysis_fmi``'s default feature is 'edge', not raw pixels. Edges
    are ``edge(x)`` = Sobel with the automatic threshold and thinning
    (:func:`matlab.edge_sobel`), as 0/1 features.
    """
    a, b, f = _planes(a, b, fused)
    edges = M.edge_sobel(torch.stack([a, b, f])).to(torch.float64)
    return _fmi(edges[0], edges[1], edges[2])


@register_metric("FMI_dct", definition=DEFINITION, higher_is_better=True)
@_cpu_per_image
def fmi_dct(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """Fast-FMI (3x3 windows, see :func:`_fmi`) of the orthonormal 2-D DCT of the whole image (``dct2``)."""
    a, b, f = _planes(a, b, fused)
    d = M.dct2(torch.stack([a, b, f]))
    return _fmi(d[0], d[1], d[2])


@register_metric("FMI_pixel", definition=DEFINITION, higher_is_better=True)
@_cpu_per_image
def fmi_pixel(a: Tensor, b: Tensor, fused: Tensor) -> Tensor:
    """Fast-FMI (3x3 windows, see :func:`_fmi`) of the raw pixels: ``analysis_fmi(A, B, F, 'none')``."""
    a, b, f = _planes(a, b, fused)
    return _fmi(a, b, f)
