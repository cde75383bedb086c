"""Pass forecast: recipes mixing compute / reuse / forecast(2) / forecast(3) / partial, rewritten
into fx graphs, against the eager reference (<= 1e-5, float32), plus checks that do not go
through the reference's own forecast code: a forecast equals a reuse of the weighted sum, and
a forecast from freshly computed history equals the full model."""
from __future__ import annotations

import pytest
import torch

from tcgraph.compile import PIPELINE, check_variant, example_inputs, rewrite, rewrite_variant
from tcgraph.errors import TcgraphError
from tcgraph.names import FORECAST_WEIGHTS
from tcgraph.passes import RewriteSpec, forecast as forecast_pass, io_names, reference_step
from tcgraph.plan import COMPUTE, REUSE, Plan, Recipe, partial
from tcgraph.plan.plan import forecast
from tcgraph.sampling import SamplerSettings
from tcgraph.names import BRANCHES

C, R = COMPUTE, REUSE
F2, F3 = forecast(2), forecast(3)
FULL = Recipe.uniform(3, C, BRANCHES)

MIXED = [
    Recipe(((F2, C), (R, F3), (partial([0, 3, 9]), C)), BRANCHES),
    Recipe(((F3, F3), (F2, F2), (F2, R)), BRANCHES),
    Recipe(((C, F2), (partial(range(8)), R), (F3, C)), BRANCHES),
    Recipe(((R, R), (C, C), (forecast(1), F2)), BRANCHES),
    Recipe(((forecast(4), partial([15])), (F3, R), (C, F2)), BRANCHES),
    Recipe.uniform(3, F3, BRANCHES),
]


def settings(steps, batch=2):
    return SamplerSettings(num_steps=steps, batch=batch, cfg_scale=2.0, resolution=8)


def plan_with(recipe: Recipe, computes: int = 4, seed: int = 0) -> Plan:
    """`computes` full steps, then `recipe` (with random weights), so every history exists."""
    g = torch.Generator().manual_seed(seed)
    weights = {computes: {key: tuple(float(v) for v in torch.randn(n, generator=g)) for key, n in recipe.forecasts()}}
    return Plan("p", settings(computes + 1), (FULL,) * computes + (recipe,), 16, weights=weights)


@pytest.mark.parametrize("idx", range(len(MIXED)))
def test_mixed_recipes_match_the_reference(tiny_model, idx):
    recipe = MIXED[idx]
    plan = plan_with(recipe, seed=idx)
    gm = rewrite_variant(tiny_model, plan, recipe)
    ins, outs = io_names(gm)
    assert (ins, outs) == plan.variant_io(recipe)
    assert ins[-1] == FORECAST_WEIGHTS
    feeds = example_inputs(tiny_model, plan, ins, seed=idx, recipe=recipe)
    assert feeds[FORECAST_WEIGHTS].shape == (sum(n for _, n in recipe.forecasts()),)
    assert check_variant(tiny_model, gm, recipe, feeds, atol=1e-5) <= 1e-5
    # the forecast branches' modules are gone; every history input and the weights are used
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for l, br, a in recipe.items():
        if a.kind in ("compute", "reuse", "forecast"):  # (token_prune inlines a partial branch's module)
            assert (f"blocks.{l}.{br}" in called) == (a.kind == "compute")
    used = {n.meta["tcgraph.io_name"]: len(n.users) for n in gm.graph.nodes if n.op == "placeholder"}
    assert all(used[n] >= 1 for n in ins if n != "y"), used
    assert used[FORECAST_WEIGHTS] == sum(n for _, n in recipe.forecasts())


def test_reference_forecast_differs_from_reuse(tiny_model):
    """The reference is not trivially right: a forecast with weights (1, 0) is reuse, (2, -1) is not."""
    recipe = Recipe(((F2, C), (C, C), (C, C)), BRANCHES)
    plan = plan_with(recipe)
    feeds = example_inputs(tiny_model, plan, plan.variant_io(recipe)[0], recipe=recipe)
    args = feeds["x"], feeds["t"], feeds["y"]
    caches = {n: v for n, v in feeds.items() if n not in ("x", "t", "y")}
    reuse_out, _ = reference_step(tiny_model, *args, Recipe(((R, C), (C, C), (C, C)), BRANCHES), caches)
    one, _ = reference_step(tiny_model, *args, recipe, {**caches, FORECAST_WEIGHTS: torch.tensor([1.0, 0.0])})
    two, _ = reference_step(tiny_model, *args, recipe, {**caches, FORECAST_WEIGHTS: torch.tensor([2.0, -1.0])})
    assert torch.allclose(one, reuse_out, atol=1e-6)
    assert (two - reuse_out).abs().max() > 1e-3


@pytest.mark.parametrize("idx", [0, 1, 4])
def test_forecast_graph_equals_reuse_of_the_weighted_sum(tiny_model, idx):
    """Independent of reference_step's forecast code: the forecast graph on history H_j and weights
    w equals the graph of the same recipe with forecasts replaced by reuse, fed Σ_j w_j H_j."""
    recipe = MIXED[idx]
    plan = plan_with(recipe, seed=idx)
    gm = rewrite_variant(tiny_model, plan, recipe)
    ins, _ = io_names(gm)
    feeds = example_inputs(tiny_model, plan, ins, seed=10 + idx, recipe=recipe)
    as_reuse = Recipe(tuple(tuple(R if a.kind == "forecast" else a for a in pair) for pair in recipe.actions), BRANCHES)
    plan_r = Plan("r", settings(5), (FULL,) * 4 + (as_reuse,), 16)
    gm_r = rewrite_variant(tiny_model, plan_r, as_reuse)
    ins_r, _ = io_names(gm_r)
    w, at, summed = feeds[FORECAST_WEIGHTS], 0, {}
    for (l, br), n in recipe.forecasts():
        hist = [feeds[f"cache.{l}.{br}"]] + [feeds[f"cache.{l}.{br}.h{j}"] for j in range(1, n)]
        summed[f"cache.{l}.{br}"] = sum(float(w[at + j]) * hist[j] for j in range(n))
        at += n
    with torch.no_grad():
        got = gm(*[feeds[n] for n in ins])
        want = gm_r(*[summed.get(n, feeds.get(n)) for n in ins_r])
    got, want = (v if isinstance(v, tuple) else (v,) for v in (got, want))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() <= 1e-5


def test_forecast_of_fresh_history_equals_the_full_model(tiny_model):
    """History from the full model at this very step, split as H_0 = 3/4·y, H_1 = y/2, H_2 = y with
    weights (2, -1, 0) (and (1,) for forecast(1), (0.5, 0.5) for a forecast(2)): the full output.
    Checks that the fresh gate multiplies the forecast and that history is the pre-gate output."""
    plan0 = plan_with(Recipe.uniform(3, F3, BRANCHES))
    feeds = example_inputs(tiny_model, plan0, ["x", "t", "y"])
    full_out, fresh = reference_step(tiny_model, feeds["x"], feeds["t"], feeds["y"], FULL, {})
    recipe = Recipe(((F3, forecast(1)), (F2, F3), (F3, F3)), BRANCHES)
    plan = plan_with(recipe)
    gm = rewrite_variant(tiny_model, plan, recipe)
    ins, _ = io_names(gm)
    values, w = dict(feeds), []
    for (l, br), n in recipe.forecasts():
        y = fresh[f"cache.{l}.{br}"]
        hist = {1: [y], 2: [y, y], 3: [0.75 * y, 0.5 * y, y]}[n]
        w += {1: [1.0], 2: [0.5, 0.5], 3: [2.0, -1.0, 0.0]}[n]
        for j, h in enumerate(hist):
            values[f"cache.{l}.{br}" + (f".h{j}" if j else "")] = h
    values[FORECAST_WEIGHTS] = torch.tensor(w)
    with torch.no_grad():
        out = gm(*[values[n] for n in ins])
    assert (out - full_out).abs().max().item() <= 1e-5
    assert (out - tiny_model(feeds["x"], feeds["t"], feeds["y"])).abs().max().item() <= 1e-5


def test_a_pipeline_without_the_forecast_pass_is_caught(tiny_model):
    recipe = MIXED[0]
    plan = plan_with(recipe)
    spec = RewriteSpec.of(plan, recipe)
    assert forecast_pass in PIPELINE and PIPELINE.index(forecast_pass) == 3
    without = rewrite(tiny_model, spec, tuple(p for p in PIPELINE if p is not forecast_pass))
    feeds = example_inputs(tiny_model, plan, io_names(without)[0], recipe=recipe)
    with pytest.raises(TcgraphError, match="disagrees"):
        check_variant(tiny_model, without, recipe, feeds)
    assert forecast_pass(rewrite(tiny_model, RewriteSpec.of(plan, FULL)), RewriteSpec.of(plan, FULL)) is not None


def test_example_inputs_of_a_forecasting_variant_need_the_recipe(tiny_model):
    recipe = MIXED[1]
    plan = plan_with(recipe)
    with pytest.raises(TcgraphError, match="need its recipe"):
        example_inputs(tiny_model, plan, plan.variant_io(recipe)[0])
