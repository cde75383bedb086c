"""Every registered model adapter through `AdapterTester` (tests/models/adapter_tester.py): capture,
every action through the passes against the eager reference, calibration's blended step, export,
load and sampling on ONNX Runtime and the torch backend. A family whose adapter has no subclass
here fails `test_every_registered_adapter_has_a_tester`."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel  # noqa: E402

from tcgraph.models.adapter import ADAPTERS, DIT  # noqa: E402
from tcgraph.models.diffusers.dit import DIFFUSERS_DIT, DiffusersDiT  # noqa: E402
from tcgraph.models.diffusers.pixart import PIXART, DiffusersPixArt  # noqa: E402
from tcgraph.models.official.dit import DiT, make_config, randomize_weights  # noqa: E402
from tcgraph.models.families import FAMILIES  # noqa: E402
from tests.models.adapter_tester import AdapterTester, import_every_family  # noqa: E402

STD = 0.05  # random weights: diffusers zero-initialises gates and tables, and its defaults make outputs ~1e3


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn anew (std 0.05); buffers such as the position table are kept."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * STD)
    return model.eval()


class TestDiT(AdapterTester):
    """tcgraph's DiT, official facebookresearch/DiT layout: attn, mlp."""

    adapter = DIT
    family = "official"

    def make_model(self):
        cfg = make_config("DiT-S/2", input_size=8, depth=2, hidden_size=32, num_heads=2, in_channels=2,
                          num_classes=5, learn_sigma=True)  # 16 tokens
        return randomize_weights(DiT(cfg), std=STD)


class TestDiffusersDiT(AdapterTester):
    """diffusers' DiTTransformer2DModel: attn, mlp; per-block label and timestep embedders."""

    adapter = DIFFUSERS_DIT
    family = "diffusers"

    def make_model(self):
        model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=2, out_channels=4,
                                      num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=5)
        return DiffusersDiT(randomized(model, seed=1)).eval()


class TestPixArt(AdapterTester):
    """diffusers' PixArtTransformer2DModel: attn, cross (run constants: the text's keys and values), mlp."""

    adapter = PIXART
    family = "pixart"
    text_length = 7

    def make_model(self):
        model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=2, out_channels=4,
                                         num_layers=2, sample_size=8, patch_size=2, caption_channels=24,
                                         cross_attention_dim=32, use_additional_conditions=False)
        return DiffusersPixArt(randomized(model, seed=2)).eval()


def all_testers() -> list[type[AdapterTester]]:
    found, todo = [], [AdapterTester]
    while todo:
        for sub in todo.pop().__subclasses__():
            found.append(sub)
            todo.append(sub)
    return found


def test_every_registered_adapter_has_a_tester():
    """Each adapter that a family registers, and each family, has an `AdapterTester` subclass."""
    import_every_family()
    covered = {cls.adapter for cls in all_testers()}
    missing = [f"{a.name} ({cls.__module__}.{cls.__qualname__})" for cls, a in ADAPTERS.items() if a not in covered]
    assert not missing, f"adapters without an AdapterTester subclass in tests/models/test_every_adapter.py: {missing}"
    # (test-only families, tests/models/two_stream.py, are registered only while their module runs)
    registered = [cls for cls in all_testers() if cls.family in FAMILIES]
    assert {cls.family for cls in registered} == set(FAMILIES)
    assert all(ADAPTERS.get(cls.adapter.model_type) is cls.adapter for cls in registered)
