"""What the inspection tests share: the tiny DiT, its fora:2 artifact's settings, and a variant's node table."""
from __future__ import annotations

from tcgraph.export.artifact import load_artifact
from tcgraph.inspection import read_variant_graph
from tcgraph.models.official.dit import DiT, make_config, randomize_weights

STEPS = 4  # fora:2 on 4 steps: v0 v1 v0 v1


def tiny_dit() -> DiT:
    """Same shape as tests/conftest.py's `tiny_model` (that fixture is function-scoped): 3 blocks,
    16 tokens, hidden 32, 2 heads, 5 classes."""
    cfg = make_config("DiT-S/2", input_size=8, depth=3, hidden_size=32, num_heads=2, in_channels=2,
                      num_classes=5, learn_sigma=True)
    return randomize_weights(DiT(cfg), std=0.05)


def graph_of(root, vid: str):
    """The node table of variant `vid` of the artifact folder `root`, attributed with its block table."""
    return read_variant_graph(root / "variants" / f"{vid}.onnx", load_artifact(root, verify_hashes=False).blocks)
