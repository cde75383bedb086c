"""Shared fixtures: a tiny DiT whose weights are random (not adaLN-Zero), so that every
block and branch changes the output and a wrong rewrite cannot hide behind zeros."""
from __future__ import annotations

import pytest
import torch

from tcgraph.models.dit import DiT, make_config, randomize_weights


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_config():
    # 3 blocks, 16 tokens, hidden 32; learn_sigma so the sampler's channel split is exercised.
    return make_config("DiT-S/2", input_size=8, depth=3, hidden_size=32, num_heads=2, in_channels=2,
                       num_classes=5, learn_sigma=True)


@pytest.fixture
def tiny_model(tiny_config):
    return randomize_weights(DiT(tiny_config), std=0.05)
