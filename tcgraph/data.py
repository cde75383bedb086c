"""The demo data: scikit-learn's 8x8 handwritten digits, upsampled to 16x16 in [-1, 1].

scikit-learn ships the 1797 images inside its package, so nothing is downloaded.
The split is fixed (seeded) and shared by the demo DiT, the classifier and the metrics.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DIGITS_SIZE = 16
SPLIT_SEED = 0
TEST_FRACTION = 0.2


def load_digits_images(size: int = DIGITS_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as (N, 1, size, size) float32 in [-1, 1], and labels (N,) int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1) * 2 - 1
    return x, torch.from_numpy(d.target.astype(np.int64))


def digits_split(size: int = DIGITS_SIZE) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fixed train/test split: {"train": (x, y), "test": (x, y)}."""
    x, y = load_digits_images(size)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_test = int(round(len(x) * TEST_FRACTION))
    test, train = perm[:n_test], perm[n_test:]
    return {"train": (x[train], y[train]), "test": (x[test], y[test])}
