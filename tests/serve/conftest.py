"""Fixtures of the serving tests: one small demo-model artifact for the whole folder."""
from __future__ import annotations

import pytest

import tcgraph

# fora:2 (two variants: full and reuse), 4 DDIM steps, guidance 2, image batch 2 (model batch 4 with
# the guidance halves): small enough to export in seconds, and batching is exercised from 2 images on.
STEPS, BATCH = 4, 2


@pytest.fixture(scope="session")
def serve_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "digits-fora2"
    return tcgraph.transform("digits", "fora:2", out, steps=STEPS, batch=BATCH, progress=False, check=False)
