"""Fixtures the runtime tests share: the tiny hand-made variants and an artifact folder of them."""
import pytest
import torch

from tcgraph.export import load_artifact, write_artifact
from tests.export.tiny_variants import tiny_dit
from tests.runtime.tiny_artifact import tiny_artifact_args, tiny_variants


@pytest.fixture(scope="module")
def variants():
    """v0 (full), v1 (fill: writes cache.0.attn), v2 (reuse: reads and rewrites it), by id."""
    torch.set_num_threads(1)
    return tiny_variants(tiny_dit())


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, variants):
    """The tiny variants written as an artifact folder (no engines) and loaded back."""
    out = tmp_path_factory.mktemp("runtime") / "art"
    write_artifact(out, **tiny_artifact_args(tiny_dit()), variants=list(variants.values()))
    return load_artifact(out)
