import json

import pytest

from tcgraph.errors import TcgraphError
from tcgraph.plan import COMPUTE, REUSE, Action, Plan, Recipe, make_plan, partial, plan_flops
from tcgraph.sampling import SamplerSettings
from tcgraph.names import BRANCHES


def settings(steps=10, batch=2, cfg=2.0, res=8):
    return SamplerSettings(num_steps=steps, batch=batch, cfg_scale=cfg, resolution=res)


def test_full_plan_is_one_variant_without_caches(tiny_config):
    plan = make_plan("full", tiny_config, settings())
    assert plan.schedule() == ["v0"] * 10
    assert plan.cache_keys() == []
    assert plan.variant_io(plan.variants()[0]) == (["x", "t", "y"], ["out"])
    assert plan_flops(tiny_config, plan)["predicted_speedup"] == pytest.approx(1.0)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_fora_matches_its_definition(tiny_config, n):
    steps = 10
    plan = make_plan(f"fora:{n}", tiny_config, settings(steps=steps))
    for s, recipe in enumerate(plan.recipes):
        expected = COMPUTE if s % n == 0 else REUSE
        assert all(a == expected for _, _, a in recipe.items()), s
    assert len(plan.variants()) == (1 if n == 1 else 2)
    full, cached = plan.variants()[0], (plan.variants() + [None])[1]
    if cached is not None:
        ins, outs = plan.variant_io(cached)
        assert ins[3:] == [f"cache.{l}.{b}" for l in range(3) for b in ("attn", "mlp")]
        assert outs == ["out"]
        assert plan.variant_io(full)[1][1:] == ins[3:]  # the full step writes what cache steps read


def test_fora_flops_by_hand(tiny_config):
    # Steps 0..9 with interval 3 compute at 0,3,6,9: 4 full steps + 6 with all branches reused.
    plan = make_plan("fora:3", tiny_config, settings(steps=10))
    f = plan_flops(tiny_config, plan)
    c = tiny_config
    n, d, m, b = c.num_tokens, c.hidden_size, c.mlp_hidden, 4  # model batch = 2 x 2 with guidance
    branches = c.depth * (2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + 4 * n * d * m)
    fixed = 2 * n * 4 * c.in_channels * d + 2 * 256 * d + 2 * d * d + c.depth * 12 * d * d + 4 * d * d + 2 * n * d * 4 * c.out_channels
    assert f["full_step"] == (branches + fixed) * b
    assert f["total"] == 4 * (branches + fixed) * b + 6 * fixed * b
    assert f["predicted_speedup"] == pytest.approx(10 * (branches + fixed) / (4 * (branches + fixed) + 6 * fixed))


def test_partial_flops_between_reuse_and_compute(tiny_config):
    from tcgraph.plan import branch_flops
    n = tiny_config.num_tokens
    for br in ("attn", "mlp"):
        lo, mid, hi = (branch_flops(tiny_config, br, a) for a in (REUSE, partial(range(n // 4)), COMPUTE))
        assert lo == 0 < mid < hi


def test_json_round_trip(tiny_config):
    depth = tiny_config.depth
    mixed = Recipe(((COMPUTE, REUSE), (partial([3, 1, 2]), COMPUTE), (REUSE, REUSE)), BRANCHES)
    recipes = (Recipe.uniform(depth, COMPUTE, BRANCHES), mixed, mixed, Recipe.uniform(depth, COMPUTE, BRANCHES))
    plan = Plan("custom", settings(steps=4), recipes, tiny_config.num_tokens, params={"a": 1})
    text = plan.to_json()
    back = Plan.from_json(text)
    assert back == plan and back.params == {"a": 1}
    assert json.loads(text)["variants"]["v1"][1][0] == {"partial": [1, 2, 3]}
    assert back.schedule() == ["v0", "v1", "v1", "v0"]


def test_reading_a_never_written_cache_is_refused(tiny_config):
    recipes = (Recipe.uniform(3, REUSE, BRANCHES),) + (Recipe.uniform(3, COMPUTE, BRANCHES),)
    with pytest.raises(TcgraphError, match="no earlier step computed"):
        Plan("bad", settings(steps=2), recipes, 16)


def test_bad_plans_are_refused(tiny_config):
    with pytest.raises(TcgraphError, match="unknown plan"):
        make_plan("magic:3", tiny_config, settings())
    with pytest.raises(TcgraphError, match="not an integer"):
        make_plan("fora:x", tiny_config, settings())
    with pytest.raises(TcgraphError, match="does not match"):
        make_plan("full", tiny_config, settings(res=16))
    with pytest.raises(TcgraphError, match="newer"):
        Plan.from_dict({"schema_version": 99})
    with pytest.raises(TcgraphError, match="not valid JSON"):
        Plan.from_json("{")
    with pytest.raises(TcgraphError, match="out of range"):
        Plan("p", settings(steps=2), (Recipe.uniform(3, COMPUTE, BRANCHES), Recipe(((partial([99]), COMPUTE),) * 3, BRANCHES)), 16)
    with pytest.raises(TcgraphError):
        Action("skip")


def test_recipes_of_a_three_branch_model_round_trip_and_order_their_caches():
    """A model whose blocks have attn, cross and mlp (PixArt's): one action per branch, caches in
    block then BRANCH_ORDER order, branches kept through JSON; a wrong count or order is refused."""
    three = ("attn", "cross", "mlp")

    full = Recipe.uniform(2, COMPUTE, three)
    cached = Recipe(((REUSE, COMPUTE, REUSE), (COMPUTE, REUSE, partial([0, 2]))), three)
    plan = Plan("p", SamplerSettings(num_steps=2, batch=1, cfg_scale=1.0, resolution=8), (full, cached), 4)
    assert plan.branches == three and cached.action(0, "cross") == COMPUTE and cached.short() == "RCR CRP2"  # partial(k) shows k
    assert plan.cache_names() == ["cache.0.attn", "cache.0.mlp", "cache.1.cross", "cache.1.mlp"]
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.branches == three
    assert "branches" not in Plan("d", plan.settings, (Recipe.uniform(2, COMPUTE, BRANCHES),) * 2, 4).to_dict()
    with pytest.raises(TcgraphError, match="not one per branch"):
        Recipe(((COMPUTE, COMPUTE),), three)
    with pytest.raises(TcgraphError, match="in that order"):
        Recipe(((COMPUTE, COMPUTE),), ("mlp", "attn"))
    with pytest.raises(TcgraphError, match="disagree on the branches"):
        Plan("p", plan.settings, (full, Recipe.uniform(2, COMPUTE, BRANCHES)), 4)
