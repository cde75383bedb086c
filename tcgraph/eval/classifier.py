"""A small CNN that classifies the 16x16 demo digits; its penultimate layer is the FD feature space.

It plays the role Inception-v3 plays for FID on ImageNet: class accuracy says whether a
sample shows the digit it was asked for, and the 64-d penultimate features give the
Fréchet distance between a generated set and the real digits. The weights are trained
by `scripts/train_classifier.py` and committed next to this file.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tcgraph.data import DIGITS_SIZE
from tcgraph.errors import TcgraphError

WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "digits_classifier.safetensors"
NUM_CLASSES = 10
FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    """conv(1->32) -> pool -> conv(32->64) -> pool -> linear(1024->64) -> SiLU -> linear(64->10).

    The penultimate activation is SiLU, not ReLU: with ReLU ~28 of the 64 units died in
    training, which left a rank-deficient feature covariance (FD measured in ~36 dims and
    an ill-conditioned matrix square root). SiLU keeps every unit alive at the same accuracy.
    """

    def __init__(self, channels: tuple[int, int] = (32, 64), feature_dim: int = FEATURE_DIM,
                 num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.fc = nn.Linear(c2 * (DIGITS_SIZE // 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        self.dropout = nn.Dropout(0.3)  # only active while training

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, DIGITS_SIZE, DIGITS_SIZE):
            raise TcgraphError(f"DigitsClassifier expects images shaped (N, 1, {DIGITS_SIZE}, {DIGITS_SIZE}) "
                               f"in [-1, 1]; got {tuple(x.shape)}; pass demo-model samples or data.digits_split()")
        p = self.fc.weight
        return x.to(device=p.device, dtype=p.dtype)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, 64): the space the Fréchet distance is measured in."""
        x = self._check(x)
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (N, 32, 8, 8)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # (N, 64, 4, 4)
        return F.silu(self.fc(h.flatten(1)))  # (N, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, 10)."""
        return self.head(self.dropout(self.features(x)))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted labels (N,) int64."""
        return self.forward(x).argmax(dim=1)


def load_classifier(path: str | Path | None = None) -> DigitsClassifier:
    """The committed classifier in eval mode on the CPU (a fresh module on every call)."""
    path = Path(path) if path is not None else WEIGHTS_PATH
    if not path.is_file():
        raise TcgraphError(f"digits classifier weights not found at {path}; "
                           "create them with `python scripts/train_classifier.py` (about a minute on a CPU)")
    from safetensors.torch import load_file

    model = DigitsClassifier()
    try:
        state = load_file(str(path))
        model.load_state_dict(state)
    except Exception as e:  # damaged file or weights for another architecture
        raise TcgraphError(f"could not load digits classifier weights from {path}: {e}; "
                           "re-create them with `python scripts/train_classifier.py`") from e
    return model.eval()
