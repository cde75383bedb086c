"""Every registered model adapter through `AdapterTester` (tests/models/adapter_tester.py): capture,
every action through the passes against the eager reference, calibration's blended step, export,
load and sampling on ONNX Runtime and the torch backend. A family whose adapter has no subclass
here fails `test_every_registered_adapter_has_a_tester`. SD3's tester lives in its own module
(tests/models/test_sd3_adapter.py), imported here so that this test counts it (pytest runs it there)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel  # noqa: E402

from tcgraph.models.adapter import ADAPTERS, DIT  # noqa: E402
from tcgraph.models.diffusers.dit import DIFFUSERS_DIT, DiffusersDiT  # noqa: E402
from tcgraph.models.diffusers.pixart import PIXART, DiffusersPixArt  # noqa: E402
from tcgraph.models.diffusers.flux import FLUX  # noqa: E402
from tcgraph.models.official.dit import DiT, make_config, randomize_weights  # noqa: E402
from tcgraph.models.families import FAMILIES  # noqa: E402
from tests.models.adapter_tester import AdapterTester, import_every_family  # noqa: E402
from tests.models.flux_tiny import tiny_flux  # noqa: E402
import tests.models.test_sd3_adapter  # noqa: E402,F401  (its TestSD3, not collected twice: no Test name here)

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


# FLUX.1's scheduler_config.json
FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                  "max_image_seq_len": 4096}


@pytest.mark.slow  # ~60 s: two exports of 4 blocks' variants, sampling on both backends
class TestFluxDev(AdapterTester):
    """diffusers' FluxTransformer2DModel with its guidance embedding (FLUX.1-dev): double blocks (attn over
    text and image rows, mlp, mlp_text), parallel single blocks (attn, mlp); the guidance scale an input."""

    adapter = FLUX
    family = "flux"
    text_length = 5
    guidance = 3.5

    def make_model(self):
        return tiny_flux(guidance_embeds=True, seed=3)

    def mixed_recipes(self, layout, n):  # as the two-stream toy's
        return self.alternating_recipes(layout, n)

    def settings(self, model):  # FLUX's own sampler: flow matching with its resolution-dependent shift
        return dataclasses.replace(super().settings(model), guidance="input", sampler="diffusers",
                                   scheduler=FLUX_SCHEDULER)


SCHNELL_MIXED = ("the mixed plan's artifact is sampled by TestFluxDev, whose graphs differ from schnell's only by "
                 "the guidance input; schnell's full artifact samples the guidance-free path on both backends")


@pytest.mark.slow  # ~25 s: one export (the full plan), the mixed plan's variants against the eager reference
class TestFluxSchnell(TestFluxDev):
    """FLUX.1-schnell's form: no guidance embedding, no guidance. Every check but the two that export and
    sample the mixed plan, which FLUX.1-dev's tester runs on the same graphs with a guidance input."""

    guidance = 1.0

    def make_model(self):
        return tiny_flux(guidance_embeds=False, seed=4)

    def settings(self, model):
        return dataclasses.replace(AdapterTester.settings(self, model), guidance="none", sampler="diffusers",
                                   scheduler=FLUX_SCHEDULER)

    @pytest.mark.skip(reason=SCHNELL_MIXED)
    def test_mixed_plan_samples_the_same_on_both_backends_and_eagerly(self):
        pass

    @pytest.mark.skip(reason=SCHNELL_MIXED)
    def test_mixed_plan_steps_and_caches_agree_on_both_backends(self):
        pass


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
