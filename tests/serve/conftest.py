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


@pytest.fixture(scope="session")
def text_artifact(tmp_path_factory):
    """A text-conditioned artifact: a tiny random PixArt transformer, 2 steps, batch 1."""
    pytest.importorskip("diffusers")
    from tests.models.test_pixart_plans import LENGTH, tiny_pixart

    out = tmp_path_factory.mktemp("serve-text") / "pixart"
    return tcgraph.transform(tiny_pixart(), "full", out, steps=2, batch=1, text_length=LENGTH, progress=False,
                             check=False)
