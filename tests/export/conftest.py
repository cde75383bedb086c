"""Shared settings for the export tests; the tiny variant graphs live in tiny_variants.py."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _few_threads():
    """A training job shares this machine: keep torch (and the ORT verify sessions) on 1 thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
