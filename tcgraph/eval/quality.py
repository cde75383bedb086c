"""Quality of generated digits: as a set (class accuracy, FD) and against a reference (PSNR, SSIM).

`digits_quality` asks "do the samples look like the real digits they were asked for?",
`compare_samples` asks "how far did a cached plan drift from the uncached samples drawn
from the same noise and labels?". `fd_floor` is the FD a perfect generator would score:
the distance between the real train and real test splits, both of which are finite
samples, so no set of ~360 images scores 0.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from tcgraph.data import digits_split
from tcgraph.errors import TcgraphError
from tcgraph.eval.classifier import DigitsClassifier, load_classifier
from tcgraph.eval.metrics import frechet_distance, psnr, ssim

_BATCH = 512  # features are computed in chunks so a large sample set does not need one huge activation


@functools.lru_cache(maxsize=1)
def _classifier() -> DigitsClassifier:
    return load_classifier()


def _as_images(samples, name: str) -> torch.Tensor:
    if isinstance(samples, np.ndarray):
        samples = torch.from_numpy(samples)
    if not isinstance(samples, torch.Tensor):
        raise TcgraphError(f"{name}: expected a torch.Tensor or numpy array of images, got {type(samples).__name__}")
    # Samples may overshoot [-1, 1] slightly; the classifier only ever saw that range.
    return samples.detach().to("cpu", torch.float32).clamp(-1.0, 1.0)


@torch.no_grad()
def _features_and_predictions(x: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    model = _classifier()
    feats, preds = [], []
    for i in range(0, len(x), _BATCH):
        f = model.features(x[i:i + _BATCH])  # (B, 64)
        feats.append(f.double())
        preds.append(model.head(f).argmax(dim=1))
    return torch.cat(feats).numpy(), torch.cat(preds)


@functools.lru_cache(maxsize=None)
def _real_features(split: str) -> np.ndarray:
    x, _ = digits_split()[split]
    return _features_and_predictions(x)[0]


def digits_quality(samples, labels) -> dict[str, float]:
    """Class accuracy and FD of generated digits (N, 1, 16, 16) in [-1, 1].

    accuracy: share of samples the classifier assigns to the label they were generated
    for. digits_fd: Fréchet distance between the samples' classifier features and the
    real held-out test split's; compare it with `fd_floor()`, not with 0.
    """
    x = _as_images(samples, "samples")
    y = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    y = y.detach().to("cpu", torch.int64).reshape(-1)
    if len(y) != len(x):
        raise TcgraphError(f"digits_quality: {len(x)} samples but {len(y)} labels; "
                           "pass the class labels the samples were generated for, one per sample")
    feats, preds = _features_and_predictions(x)
    return {
        "accuracy": float((preds == y).float().mean()),
        "digits_fd": frechet_distance(feats, _real_features("test")),
        "n": len(x),
    }


def compare_samples(samples, reference) -> dict[str, float]:
    """PSNR (dB, capped at metrics.PSNR_CAP) and SSIM of samples against reference samples from the same noise and labels."""
    return {"psnr": psnr(samples, reference), "ssim": ssim(samples, reference)}


@functools.lru_cache(maxsize=1)
def fd_floor() -> float:
    """FD between the real train and test splits' features: what a perfect generator would score (cached)."""
    return frechet_distance(_real_features("train"), _real_features("test"))
