"""Sample-quality metrics: PSNR and SSIM between paired sample sets, Fréchet distance between feature sets.

PSNR and SSIM compare a cached plan's samples with the uncached model's samples drawn
from the same noise and labels (pairs, image by image). The Fréchet distance compares
two *sets* through the means and covariances of their features (Heusel et al. 2017,
https://arxiv.org/abs/1706.08500), here in the feature space of the digits classifier.

All three accept torch tensors or numpy arrays and compute in float64 on the CPU, so a
result does not depend on the device or dtype the samples came from.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from tcgraph.errors import TcgraphError

# PSNR of identical images is infinite; a finite cap keeps means and JSON reports finite.
# 100 dB is an MSE of 4e-10 on range 2, far below any float32 sampling difference that
# matters, so the cap never hides a real difference.
PSNR_CAP = 100.0

# SSIM constants of Wang et al. 2004 ("Image quality assessment: from error visibility
# to structural similarity", IEEE TIP), https://doi.org/10.1109/TIP.2003.819861
SSIM_WIN_SIZE = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

# Samples live in [-1, 1].
DATA_RANGE = 2.0
DATA_MIN = -1.0


def _as_float64(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.asarray(x, dtype=np.float64))
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64)
    raise TcgraphError(f"{name}: expected a torch.Tensor or numpy array, got {type(x).__name__}; "
                       "pass the samples as a tensor or array")


def _paired_images(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets as float64 (N, C, H, W), after checking that they pair up image by image."""
    a, b = _as_float64(a, "a"), _as_float64(b, "b")
    if a.shape != b.shape:
        raise TcgraphError(f"paired metrics need two sample sets of the same shape; got a {tuple(a.shape)} "
                           f"and b {tuple(b.shape)}; pass samples drawn from the same noise and labels")
    if a.dim() != 4 or a.shape[0] == 0:
        raise TcgraphError(f"paired metrics need non-empty images shaped (N, C, H, W); got {tuple(a.shape)}; "
                           "add a batch or channel axis")
    return a, b


def psnr(a, b, data_range: float = DATA_RANGE) -> float:
    """Mean over images of the per-image PSNR in dB, each capped at `PSNR_CAP`.

    Per image: 10 * log10(data_range**2 / MSE) over all its channels and pixels. An
    identical pair (MSE 0) counts as `PSNR_CAP` instead of infinity, so the mean of a set
    where only some images are identical stays finite and meaningful.
    """
    a, b = _paired_images(a, b)
    mse = (a - b).pow(2).flatten(1).mean(dim=1)  # (N,)
    values = [PSNR_CAP if m == 0.0 else min(PSNR_CAP, 10.0 * math.log10(data_range ** 2 / m))
              for m in mse.tolist()]
    return float(np.mean(values))


def _gaussian_window(win_size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(win_size, dtype=torch.float64) - (win_size - 1) / 2
    g = torch.exp(-coords.pow(2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]  # (win, win), sums to 1


def ssim(a, b, data_range: float = DATA_RANGE, win_size: int = SSIM_WIN_SIZE,
         sigma: float = SSIM_SIGMA, k1: float = SSIM_K1, k2: float = SSIM_K2,
         data_min: float = DATA_MIN) -> float:
    """Mean SSIM over images, channels and window positions (Wang et al. 2004).

    The local statistics use a gaussian window (`win_size`, `sigma`) applied with 'valid'
    filtering, as in the authors' reference ssim.m: only windows that lie fully inside
    the image count. Padding would invent pixels, and on 16x16 digits a reflected border
    would be a large share of every window; 'valid' keeps 6x6 = 36 windows per 16x16
    image with the default 11x11 window. Pass a smaller odd `win_size` (e.g. 7) for more
    windows per image. Identical sets give exactly 1.0.

    SSIM is not shift-invariant: its luminance term assumes intensities >= 0. Values are
    measured from `data_min` (the bottom of the range, -1 for samples in [-1, 1]), which
    gives the same number as SSIM on the images mapped to [0, 1] or [0, 255]. On the raw
    signed values a 0.1 offset on a mid-grey window (mean ~0) would score ~0.04.
    """
    a, b = _paired_images(a, b)
    a, b = a - data_min, b - data_min
    if win_size < 1 or win_size % 2 == 0:
        raise TcgraphError(f"ssim: win_size must be a positive odd integer, got {win_size}; use e.g. 7 or 11")
    h, w = a.shape[-2:]
    if h < win_size or w < win_size:
        raise TcgraphError(f"ssim: images of {h}x{w} are smaller than the {win_size}x{win_size} window; "
                           f"pass win_size <= {min(h, w)} (odd)")
    n, c = a.shape[:2]
    window = _gaussian_window(win_size, sigma).expand(c, 1, win_size, win_size)  # (C, 1, win, win)

    def filt(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, groups=c)  # (N, C, H - win + 1, W - win + 1), 'valid'

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a * mu_a
    var_b = filt(b * b) - mu_b * mu_b
    cov_ab = filt(a * b) - mu_a * mu_b
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    # Written so that a == b gives numerator == denominator bit for bit (x*x*2 == x*x + x*x).
    num = (2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)
    den = (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    ssim_map = num / den
    per_image = ssim_map.flatten(1).mean(dim=1)  # (N,)
    return float(per_image.mean())


def _features_2d(x, name: str) -> np.ndarray:
    f = _as_float64(x, name).numpy()
    if f.ndim != 2:
        raise TcgraphError(f"frechet_distance: {name} must be features shaped (N, D), got {f.shape}; "
                           "flatten or take classifier features first")
    if f.shape[0] < 2:
        raise TcgraphError(f"frechet_distance: {name} has {f.shape[0]} sample(s), a covariance needs at least 2; "
                           "pass more samples (a few hundred for a stable estimate)")
    return f


def _sqrtm_trace_eigh(cov_a: np.ndarray, cov_b: np.ndarray) -> float:
    """tr(sqrt(cov_a @ cov_b)) without scipy.

    cov_a @ cov_b is similar to S B S with S = sqrt(cov_a), which is symmetric PSD, so
    its square-root trace is the sum of square roots of the eigenvalues of S B S.
    Negative eigenvalues from rounding are clipped to 0.
    """
    w, v = np.linalg.eigh(cov_a)
    s = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = s @ cov_b @ s
    m = (m + m.T) / 2
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(m), 0.0, None)).sum())


def _sqrtm_trace_scipy(cov_a: np.ndarray, cov_b: np.ndarray, linalg) -> float:
    """tr(sqrt(cov_a @ cov_b)) with scipy.linalg.sqrtm, as the reference FID code does."""
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        # Singular product (e.g. fewer samples than dimensions): shift both covariances
        # by a tiny multiple of the identity, as pytorch-fid does.
        eps = 1e-6 * max(np.trace(cov_a), np.trace(cov_b), 1.0) / cov_a.shape[0]
        off = np.eye(cov_a.shape[0]) * eps
        covmean = linalg.sqrtm((cov_a + off) @ (cov_b + off))
    # The product of two PSD matrices has real non-negative eigenvalues; an imaginary
    # part is rounding, so it is dropped. The trace of the real part is what counts.
    return float(np.real(np.trace(covmean)))


def frechet_distance(feat_a, feat_b) -> float:
    """Fréchet distance between gaussians fitted to two feature sets (N_a, D) and (N_b, D).

    ||mu_a - mu_b||^2 + tr(C_a + C_b - 2 sqrt(C_a C_b)), with unbiased covariances. The
    matrix square root uses scipy.linalg.sqrtm when scipy is importable, otherwise an
    eigen-decomposition of the equivalent symmetric matrix. The result is clipped at 0:
    a set against itself can come out at -1e-12 from rounding.
    """
    fa, fb = _features_2d(feat_a, "feat_a"), _features_2d(feat_b, "feat_b")
    if fa.shape[1] != fb.shape[1]:
        raise TcgraphError(f"frechet_distance: feature sizes differ, feat_a {fa.shape} vs feat_b {fb.shape}; "
                           "take both sets' features from the same model layer")
    mu_a, mu_b = fa.mean(axis=0), fb.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(fa, rowvar=False))
    cov_b = np.atleast_2d(np.cov(fb, rowvar=False))
    try:
        from scipy import linalg
    except ImportError:
        tr_covmean = _sqrtm_trace_eigh(cov_a, cov_b)
    else:
        tr_covmean = _sqrtm_trace_scipy(cov_a, cov_b, linalg)
    diff = mu_a - mu_b
    fd = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean)
    return max(fd, 0.0)
