"""PSNR, SSIM and Fréchet distance: closed forms, limits, monotonicity, input checks."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch

from tcgraph.data import digits_split
from tcgraph.errors import TcgraphError
from tcgraph.eval import PSNR_CAP, frechet_distance, load_classifier, psnr, ssim
from tcgraph.eval.metrics import SSIM_K1, SSIM_K2, _gaussian_window

NOISE_LEVELS = (0.0, 0.1, 0.3, 1.0)


@pytest.fixture(scope="module")
def test_images() -> torch.Tensor:
    return digits_split()["test"][0]  # (359, 1, 16, 16) in [-1, 1]


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def _noisy(x: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    return x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- PSNR


def test_psnr_identical_is_cap(test_images):
    assert psnr(test_images, test_images.clone()) == PSNR_CAP


def test_psnr_constant_offset_matches_closed_form(test_images):
    # MSE = 0.1**2 for every image, so PSNR = 10 log10(2**2 / 0.1**2) = 20 log10(2 / 0.1).
    # float64, because in float32 the offset itself is only exact to ~1e-8.
    test_images = test_images.double()
    assert psnr(test_images + 0.1, test_images) == pytest.approx(20 * math.log10(2 / 0.1), abs=1e-9)
    assert psnr(test_images + 0.1, test_images, data_range=1.0) == pytest.approx(20 * math.log10(1 / 0.1), abs=1e-9)


def test_psnr_caps_per_image_before_the_mean(test_images):
    a = test_images[:2].double()
    b = a.clone()
    b[1] += 0.1  # image 0 identical, image 1 offset
    assert psnr(a, b) == pytest.approx((PSNR_CAP + 20 * math.log10(2 / 0.1)) / 2, abs=1e-9)


def test_psnr_accepts_numpy_and_matches_torch(test_images):
    b = _noisy(test_images, 0.1)
    assert psnr(test_images.numpy(), b.numpy()) == pytest.approx(psnr(test_images, b), rel=1e-12)


# ---------------------------------------------------------------- SSIM


def test_ssim_identical_is_one(test_images):
    assert ssim(test_images, test_images.clone()) == pytest.approx(1.0, abs=1e-12)
    assert ssim(test_images, test_images.clone(), win_size=7) == pytest.approx(1.0, abs=1e-12)


def test_ssim_decreases_as_noise_grows(test_images):
    values = [ssim(_noisy(test_images, s), test_images) for s in (0.0, 0.03, 0.1, 0.3, 1.0)]
    assert values[0] == pytest.approx(1.0, abs=1e-12)
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[-1] < 0.5


def _ssim_reference(a: np.ndarray, b: np.ndarray, win: int, sigma: float, data_range: float) -> float:
    """Direct transcription of Wang et al. eqs. 14-16, window by window, for one (H, W) image."""
    w = _gaussian_window(win, sigma).numpy()
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    vals = []
    for i in range(a.shape[0] - win + 1):
        for j in range(a.shape[1] - win + 1):
            pa, pb = a[i:i + win, j:j + win], b[i:i + win, j:j + win]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cab = (w * (pa - ma) * (pb - mb)).sum()
            vals.append((2 * ma * mb + c1) * (2 * cab + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


@pytest.mark.parametrize("win", [7, 11])
def test_ssim_matches_windowwise_reference(test_images, win):
    a = test_images[:1].double()
    b = _noisy(a, 0.2).clamp(-1, 1)
    # Intensities are measured from the bottom of the range, i.e. as images in [0, 2].
    expected = _ssim_reference(a[0, 0].numpy() + 1, b[0, 0].numpy() + 1, win, 1.5, 2.0)
    assert ssim(a, b, win_size=win) == pytest.approx(expected, abs=1e-10)


def test_ssim_is_unchanged_by_mapping_to_unit_range(test_images):
    test_images = test_images.double()  # (x + 1) / 2 is exact in float64, not in float32
    b = _noisy(test_images, 0.1)
    on_unit = ssim((test_images + 1) / 2, (b + 1) / 2, data_range=1.0, data_min=0.0)
    assert ssim(test_images, b) == pytest.approx(on_unit, abs=1e-12)


def test_ssim_window_checks(test_images):
    with pytest.raises(TcgraphError, match="smaller than the 17x17 window"):
        ssim(test_images, test_images, win_size=17)
    with pytest.raises(TcgraphError, match="odd"):
        ssim(test_images, test_images, win_size=8)


@pytest.mark.parametrize("metric", [psnr, ssim])
def test_shape_mismatch_names_both_shapes(metric):
    with pytest.raises(TcgraphError, match=r"\(4, 1, 16, 16\).*\(3, 1, 16, 16\)"):
        metric(torch.zeros(4, 1, 16, 16), torch.zeros(3, 1, 16, 16))


@pytest.mark.parametrize("metric", [psnr, ssim])
def test_non_image_input_is_rejected(metric):
    with pytest.raises(TcgraphError, match="N, C, H, W"):
        metric(torch.zeros(16, 16), torch.zeros(16, 16))
    with pytest.raises(TcgraphError, match="torch.Tensor or numpy"):
        metric([[0.0]], [[0.0]])


# ---------------------------------------------------------------- Fréchet distance


def _with_exact_moments(mu: np.ndarray, cov_sqrt: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n samples whose sample mean is exactly mu and unbiased sample covariance exactly cov_sqrt @ cov_sqrt.T."""
    z = np.random.default_rng(seed).standard_normal((n, len(mu)))
    z -= z.mean(axis=0)
    # Whiten so that the unbiased sample covariance of z is the identity.
    w, v = np.linalg.eigh(np.cov(z, rowvar=False))
    z = z @ v @ np.diag(w ** -0.5) @ v.T
    return mu + z @ cov_sqrt.T


def test_fd_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    d = 8
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)  # variances
    a = _with_exact_moments(mu1, np.diag(np.sqrt(s1)), 500, seed=1)
    b = _with_exact_moments(mu2, np.diag(np.sqrt(s2)), 300, seed=2)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(torch.from_numpy(a).float(), torch.from_numpy(b).float()) == pytest.approx(expected, rel=1e-5)


def test_fd_matches_closed_form_for_shared_eigenbasis():
    # C1 = Q diag(s1) Q^T, C2 = Q diag(s2) Q^T commute, so sqrt(C1 C2) = Q diag(sqrt(s1 s2)) Q^T.
    rng = np.random.default_rng(3)
    d = 6
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s1, s2 = rng.uniform(0.1, 2.0, size=d), rng.uniform(0.1, 2.0, size=d)
    a = _with_exact_moments(np.zeros(d), q @ np.diag(np.sqrt(s1)), 400, seed=4)
    b = _with_exact_moments(np.ones(d), q @ np.diag(np.sqrt(s2)), 400, seed=5)
    expected = d + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_fd_fallback_without_scipy_matches_scipy(monkeypatch):
    rng = np.random.default_rng(6)
    a = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16)) + 0.5
    with_scipy = frechet_distance(a, b)
    monkeypatch.setitem(sys.modules, "scipy", None)  # makes `from scipy import linalg` raise ImportError
    assert frechet_distance(a, b) == pytest.approx(with_scipy, rel=1e-9)


@pytest.fixture(scope="module")
def noisy_features(classifier, test_images) -> list[np.ndarray]:
    with torch.no_grad():
        return [classifier.features(_noisy(test_images, s, seed=1).clamp(-1, 1)).double().numpy()
                for s in NOISE_LEVELS]


def test_fd_of_a_set_with_itself_is_zero(noisy_features):
    clean = noisy_features[0]
    scale = np.trace(np.cov(clean, rowvar=False))
    assert abs(frechet_distance(clean, clean.copy())) < 1e-6 * scale


def test_fd_grows_with_noise_on_digit_features(noisy_features):
    clean = noisy_features[0]
    fds = [frechet_distance(f, clean) for f in noisy_features]
    assert fds[0] == pytest.approx(0.0, abs=1e-6)
    assert all(a < b for a, b in zip(fds, fds[1:])), dict(zip(NOISE_LEVELS, fds))


def test_fd_input_checks():
    with pytest.raises(TcgraphError, match="at least 2"):
        frechet_distance(np.zeros((1, 4)), np.zeros((10, 4)))
    with pytest.raises(TcgraphError, match=r"\(10, 4\).*\(10, 5\)"):
        frechet_distance(np.zeros((10, 4)), np.zeros((10, 5)))
    with pytest.raises(TcgraphError, match=r"\(N, D\)"):
        frechet_distance(np.zeros((10, 4, 2)), np.zeros((10, 4, 2)))
