"""Combined plans: L2C branch reuse, then TokenCache pruning of the branches it computes."""
from __future__ import annotations

import pytest
import torch

from tcgraph import api
from tcgraph.errors import TcgraphError
from tcgraph.plan import COMPUTE, REUSE, Recipe, make_plan
from tcgraph.sampling import SamplerSettings
from tcgraph.plan.planners.combined import CombinedConfig, prune_recipes, prune_to_target, token_floor
from tcgraph.plan.learning.evaluate import speedup_of
from tcgraph.names import BRANCHES


def test_prune_recipes_follows_the_definition():
    depth, n = 3, 16
    full = Recipe.uniform(depth, COMPUTE, BRANCHES)
    a = Recipe(((REUSE, COMPUTE), (COMPUTE, COMPUTE), (COMPUTE, REUSE)), BRANCHES)
    b = Recipe(((COMPUTE, REUSE), (REUSE, REUSE), (COMPUTE, COMPUTE)), BRANCHES)
    base = (full, a, b, full, a, b, a)
    scores = torch.randn(7, depth, n, generator=torch.Generator().manual_seed(0))
    keep = [n, 5, 0]
    out = prune_recipes(base, scores, keep)
    assert out[0] == full and out[3] == full
    assert len(set(out)) == len(set(base))  # no new variants
    for recipe, steps in ((a, [1, 4, 6]), (b, [2, 5])):
        mean = scores[steps].mean(0)
        for s in steps:
            assert out[s] == out[steps[0]]
        got = out[steps[0]]
        for l in range(depth):
            for j in range(2):
                before, after = recipe.actions[l][j], got.actions[l][j]
                if not before.computes or keep[l] == n:
                    assert after == before
                elif keep[l] == 0:
                    assert after == REUSE
                else:
                    top = set(torch.argsort(mean[l], descending=True)[: keep[l]].tolist())
                    assert after.kind == "partial" and set(after.indices) == top


def test_prune_to_target_is_greedy_block_selection(tiny_config):
    depth, n = 3, tiny_config.num_tokens
    full = Recipe.uniform(depth, COMPUTE, BRANCHES)
    a = Recipe(((REUSE, COMPUTE), (COMPUTE, COMPUTE), (COMPUTE, REUSE)), BRANCHES)
    base = (full, a, a, full, a, a)
    scores = torch.randn(6, depth, n, generator=torch.Generator().manual_seed(1))
    floor = token_floor(n, 0.25)
    assert floor == 4 and token_floor(n, 0.0) == 0 and token_floor(n, 0.01) == 1
    target = (speedup_of(tiny_config, base) + speedup_of(tiny_config, prune_recipes(base, scores, [floor] * 3))) / 2
    keep, recipes = prune_to_target(tiny_config, base, scores, [0.3, 0.1, 0.2], floor, target)
    assert recipes == prune_recipes(base, scores, keep) and speedup_of(tiny_config, recipes) >= target
    assert keep[1] == floor  # the least sensitive block is pruned first, to the floor
    assert prune_to_target(tiny_config, base, scores, [0.3, 0.1, 0.2], floor, 50.0) is None


def test_combined_plan_end_to_end(tiny_model, tmp_path):
    s = SamplerSettings(num_steps=8, cfg_scale=2.0, batch=2, resolution=8)
    plan = make_plan("tokencache+l2c:1.8", tiny_model.config, s, weights=tiny_model, calib_images=6, epochs=1,
                     max_variants=3, compete="off")
    p = plan.params
    assert speedup_of(tiny_model.config, plan.recipes) >= 1.8
    assert len(plan.variants()) <= 3
    kinds = {a.kind for r in plan.recipes for _, _, a in r.items()}
    assert "compute" in kinds and kinds & {"reuse", "forecast"}  # branch reuse (or its forecast) and pruning
    assert p["held_out_error"] == min(r["held_out_error"] for r in p["search"] if "held_out_error" in r)
    assert {r["l2c_share"] for r in p["search"]} == {0.5, 0.75}
    # the L2C part reaches its share of the budget alone
    chosen = next(r for r in p["search"] if r["l2c_share"] == p["l2c_share"])
    assert p["l2c"]["predicted_speedup"] >= chosen["l2c_target"]
    path = api.transform(tiny_model, plan, tmp_path / "combined", progress=False)
    samples, _ = api.sample(path, classes="0,1", per_class=1, progress=False)
    assert torch.isfinite(samples).all()


def test_combined_errors(tiny_config):
    s = SamplerSettings(num_steps=8, batch=2, resolution=8)
    with pytest.raises(TcgraphError, match="> 1"):
        CombinedConfig(target_speedup=1.0)
    with pytest.raises(TcgraphError, match="l2c_share"):
        CombinedConfig(l2c_share=1.5)
    with pytest.raises(TcgraphError, match="needs the model"):
        make_plan("tokencache+l2c", tiny_config, s)
    with pytest.raises(TcgraphError, match="not apply"):
        make_plan("tokencache+l2c", tiny_config, s, tprr="2,2,2")
