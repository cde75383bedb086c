"""Shared settings for the runtime tests; the tiny variant graphs come from tests/export."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))  # for `tiny_variants`


@pytest.fixture(autouse=True)
def _few_threads():
    """A training job shares this machine: keep torch on 1 thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
