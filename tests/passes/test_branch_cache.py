"""branch_cache against the eager reference (a plain loop over blocks, no fx)."""
import itertools

import pytest
import torch

from tcgraph.compile import build_variants, check_variant, example_inputs, rewrite_variant
from tcgraph.errors import TcgraphError
from tcgraph.passes import capture, expand_blocks, branch_cache, io_names, reference_step
from tcgraph.plan import COMPUTE, REUSE, Plan, Recipe, make_plan, partial
from tcgraph.sampling import SamplerSettings


def settings(steps=6):
    return SamplerSettings(num_steps=steps, batch=2, cfg_scale=2.0, resolution=8)


def test_reference_full_recipe_equals_model(tiny_model):
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 5])
    out, fresh = reference_step(tiny_model, x, t, y, Recipe.uniform(3, COMPUTE), {})
    assert torch.allclose(out, tiny_model(x, t, y), atol=1e-6)
    assert sorted(fresh) == sorted(f"cache.{l}.{b}" for l in range(3) for b in ("attn", "mlp"))


def test_reuse_of_freshly_computed_caches_equals_full(tiny_model):
    """Reusing exactly what this step would compute must give the full output: checks the
    gate stays fresh and the cache is the pre-gate branch output."""
    feeds = example_inputs(tiny_model, make_plan("full", tiny_model.config, settings()), ["x", "t", "y"])
    full_out, fresh = reference_step(tiny_model, feeds["x"], feeds["t"], feeds["y"], Recipe.uniform(3, COMPUTE), {})
    recipe = Recipe(((REUSE, COMPUTE), (COMPUTE, REUSE), (REUSE, REUSE)))
    plan = Plan("p", settings(2), (Recipe.uniform(3, COMPUTE), recipe), 16)
    gm = rewrite_variant(tiny_model, plan, recipe)
    ins, _ = io_names(gm)
    out = gm(*[feeds[n] if n in feeds else fresh[n] for n in ins])
    assert torch.allclose(out, full_out, atol=1e-5)


ALL_RECIPES = [Recipe(tuple(zip(a[::2], a[1::2]))) for a in itertools.product([COMPUTE, REUSE], repeat=6)]


@pytest.mark.parametrize("idx", range(0, 64, 7))
def test_each_recipe_matches_reference(tiny_model, idx):
    recipe = ALL_RECIPES[idx]
    plan = Plan("p", settings(2), (Recipe.uniform(3, COMPUTE), recipe), 16)
    gm = rewrite_variant(tiny_model, plan, recipe)
    ins, outs = io_names(gm)
    assert ins == ["x", "t", "y"] + [f"cache.{l}.{b}" for l, b, a in recipe.items() if a == REUSE]
    assert outs == ["out"]
    feeds = example_inputs(tiny_model, plan, ins, seed=idx)
    assert check_variant(tiny_model, gm, recipe, feeds, atol=1e-5) <= 1e-5
    # A reused branch's module and its input ops are gone from the graph.
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    for l, b, a in recipe.items():
        assert (f"blocks.{l}.{b}" in called) == (a == COMPUTE)


@pytest.mark.parametrize("n", [2, 3])
def test_fora_step_outputs_equal_reference_along_a_trajectory(tiny_model, n):
    """Every step of fora:n through the dispatcher equals the eager reference of the same
    recipe fed with the reference's own caches (<= 1e-4)."""
    from tcgraph.runtime.dispatch import ScheduleDispatcher, graph_runner
    from tcgraph.sampling import DDIMSampler

    plan = make_plan(f"fora:{n}", tiny_model.config, settings(7))
    variants = build_variants(tiny_model, plan)
    io = {v.id: (v.input_names, v.output_names) for v in variants}
    dispatch = ScheduleDispatcher(plan.schedule(), io, graph_runner({v.id: v.gm for v in variants}, io))
    ref_caches: dict = {}

    def checked_step(step, x, t, y):
        got = dispatch(step, x, t, y)
        ref, fresh = reference_step(tiny_model, x, t, y, plan.recipes[step], ref_caches)
        ref_caches.update(fresh)
        assert (got - ref).abs().max().item() <= 1e-4, step
        return got

    sampler = DDIMSampler(7, cfg_scale=2.0, in_channels=2, null_class=5)
    torch.manual_seed(0)
    sampler.sample(checked_step, torch.randn(2, 2, 8, 8), torch.tensor([0, 3]))
    assert dispatch.calls == plan.schedule()


def test_cached_steps_differ_from_full(tiny_model):
    """fora actually changes the computation (a pass that ignored the recipe would not)."""
    plan = make_plan("fora:2", tiny_model.config, settings(2))
    full, cached = plan.variants()
    feeds = example_inputs(tiny_model, plan, plan.variant_io(cached)[0])
    gm = rewrite_variant(tiny_model, plan, cached)
    out = gm(*feeds.values())
    assert (out - tiny_model(feeds["x"], feeds["t"], feeds["y"])).abs().max() > 1e-3


def test_partial_and_bad_writes_are_refused(tiny_model):
    gm = expand_blocks(capture(tiny_model).gm)
    with pytest.raises(TcgraphError, match="token_prune"):
        branch_cache(gm, Recipe(((partial([1]), COMPUTE),) * 3), [])
    gm = expand_blocks(capture(tiny_model).gm)
    with pytest.raises(TcgraphError, match="does not compute"):
        branch_cache(gm, Recipe.uniform(3, REUSE), [(0, "attn")])
    gm = expand_blocks(capture(tiny_model).gm)
    with pytest.raises(TcgraphError, match="blocks"):
        branch_cache(gm, Recipe.uniform(2, COMPUTE), [])


def test_rewrites_never_mutate_the_model(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    plan = make_plan("fora:2", tiny_model.config, settings(4))
    build_variants(tiny_model, plan)
    after = tiny_model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
