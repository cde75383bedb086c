"""Learning-to-Cache on models whose blocks differ and whose branches read several streams: tiny
random FLUX (double blocks attn, mlp, mlp_text; single blocks attn, mlp) and SD3.5 (attn, attn_image,
mlp, mlp_text; the last block attn, mlp). The plan follows the model's layout, reuses some
branches of a step while computing others, predicts by formula the speedup its measured cost table
predicts, and its variants equal the eager reference (checked here, 1e-4). A planner learned for
one branch tuple is refused by name, naming those that work."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

pytest.importorskip("diffusers")

from tcgraph.compile import build_variants, check_variant  # noqa: E402
from tcgraph.errors import UsageError  # noqa: E402
from tcgraph.models.diffusers.sd3 import DiffusersSD3  # noqa: E402
from tcgraph.plan import make_plan  # noqa: E402
from tcgraph.plan.costs import plan_costs, predict_flops  # noqa: E402
from tcgraph.plan.flops import plan_flops  # noqa: E402
from tcgraph.plan.registry import PLANNERS  # noqa: E402
from tcgraph.sampling import SamplerSettings  # noqa: E402
from tcgraph.sampling.conditioning import Text  # noqa: E402
from tests.models.flux_tiny import tiny_flux  # noqa: E402
from tests.models.test_diffusers_sd3 import SD35, tiny_sd3  # noqa: E402

L, STEPS, IMAGES = 5, 4, 3
FLOW = {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}


def settings_of(cfg) -> SamplerSettings:
    flux = cfg.family.name == "flux"
    return SamplerSettings(num_steps=STEPS, batch=1, cfg_scale=3.5 if flux else 2.0, resolution=cfg.input_size,
                           text_length=L, pooled=True, sampler="diffusers", scheduler=FLOW,
                           **({"guidance": "input"} if flux else {}))


def prompts(cfg, n: int = IMAGES) -> Text:
    g = torch.Generator().manual_seed(0)
    text = Text(torch.randn(n, L, cfg.caption_channels, generator=g), torch.ones(n, L),
                torch.randn(1, L, cfg.caption_channels, generator=g).expand(n, -1, -1), torch.ones(n, L))
    return dataclasses.replace(text, pooled=torch.randn(n, cfg.pooled_channels, generator=g),
                               negative_pooled=torch.randn(1, cfg.pooled_channels, generator=g).expand(n, -1))


@pytest.mark.parametrize("make", [
    pytest.param(lambda: tiny_flux(guidance_embeds=True), id="flux"),
    pytest.param(lambda: DiffusersSD3(tiny_sd3(**SD35)), id="sd3.5", marks=pytest.mark.slow),  # ~16 s, as flux
])
def test_l2c_plans_by_layout(make):
    model = make()
    cfg = model.config
    plan = make_plan("l2c:2", cfg, settings_of(cfg), weights=model, calibration_text=prompts(cfg),
                     calib_images=IMAGES, epochs=1, compete=False)
    assert plan.block_layout() == cfg.block_layout() and plan.layout is not None
    assert plan.recipes[0].is_full and plan.params["selected"].startswith("learned")
    mixed = [r for r in plan.recipes if {a.kind for _, _, a in r.items()} > {"compute"}]
    assert mixed, "some cache step computes some branches and reuses or forecasts others"
    assert any(a.kind == "reuse" for r in plan.recipes for _, _, a in r.items())
    formula, measured = plan_flops(cfg, plan), predict_flops(plan_costs(model, plan), plan)
    assert formula["predicted_speedup"] == pytest.approx(measured["predicted_speedup"], rel=1e-6)
    assert formula["predicted_speedup"] == pytest.approx(plan.params["predicted_speedup"], abs=1e-4)
    assert formula["predicted_speedup"] >= 2.0 - 1e-9  # the target (forecasts cost no FLOPs, as reuse)
    for variant in build_variants(model, plan, check=False):  # against the eager reference
        recipe = plan.variants()[int(variant.id[1:])]
        assert check_variant(model, variant.gm, recipe, variant.example_inputs) <= 1e-4


def test_planners_learned_for_one_branch_tuple_are_refused_naming_those_that_work(monkeypatch):
    """tokencache, dynamic and tokencache+l2c take layouts (tests/plan/test_tokencache_layouts.py); a
    planner registered without them (a stand-in, and any planner still without) is refused by name on
    FLUX, naming the planners that take layouts."""
    monkeypatch.setitem(PLANNERS, "one-tuple", dataclasses.replace(PLANNERS["full"], name="one-tuple", layouts=False))
    able = [p.name for p in PLANNERS.values() if p.layouts]
    assert {"full", "fora", "taylor", "l2c", "tokencache", "tokencache+l2c", "dynamic"} <= set(able)
    cfg = tiny_flux().config
    for name in [p.name for p in PLANNERS.values() if not p.layouts]:
        with pytest.raises(UsageError, match=rf"plan '{re.escape(name)}' is learned for models whose blocks all have "
                                             rf"the same branches.*blocks differ or read several streams: use "
                                             rf"{re.escape(', '.join(able))}$"):
            make_plan(name, cfg, settings_of(cfg))
