"""cache_io + reuse (compute/reuse recipes) against the eager reference (a plain loop over
blocks, no fx), and the variant spec's checks."""
import itertools

import pytest
import torch

from tcgraph.compile import PIPELINE, build_variants, check_variant, example_inputs, rewrite, rewrite_variant
from tcgraph.errors import TcgraphError
from tcgraph.passes import (RewriteSpec, cache_io, capture, expand_blocks, forecast, io_names, reference_step, reuse,
                            run_constants, token_prune)
from tcgraph.plan import COMPUTE, REUSE, Plan, Recipe, make_plan, partial
from tcgraph.sampling import SamplerSettings
from tcgraph.names import BRANCHES


def settings(steps=6):
    return SamplerSettings(num_steps=steps, batch=2, cfg_scale=2.0, resolution=8)


def test_reference_full_recipe_equals_model(tiny_model):
    x, t, y = torch.randn(2, 2, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 5])
    out, fresh = reference_step(tiny_model, x, t, y, Recipe.uniform(3, COMPUTE, BRANCHES), {})
    assert torch.allclose(out, tiny_model(x, t, y), atol=1e-6)
    assert sorted(fresh) == sorted(f"cache.{l}.{b}" for l in range(3) for b in ("attn", "mlp"))


def test_reuse_of_freshly_computed_caches_equals_full(tiny_model):
    """Reusing exactly what this step would compute must give the full output: checks the
    gate stays fresh and the cache is the pre-gate branch output."""
    feeds = example_inputs(tiny_model, make_plan("full", tiny_model.config, settings()), ["x", "t", "y"])
    full_out, fresh = reference_step(tiny_model, feeds["x"], feeds["t"], feeds["y"], Recipe.uniform(3, COMPUTE, BRANCHES), {})
    recipe = Recipe(((REUSE, COMPUTE), (COMPUTE, REUSE), (REUSE, REUSE)), BRANCHES)
    plan = Plan("p", settings(2), (Recipe.uniform(3, COMPUTE, BRANCHES), recipe), 16)
    gm = rewrite_variant(tiny_model, plan, recipe)
    ins, _ = io_names(gm)
    out = gm(*[feeds[n] if n in feeds else fresh[n] for n in ins])
    assert torch.allclose(out, full_out, atol=1e-5)


ALL_RECIPES = [Recipe(tuple(zip(a[::2], a[1::2])), BRANCHES) for a in itertools.product([COMPUTE, REUSE], repeat=6)]


@pytest.mark.parametrize("idx", range(0, 64, 7))
def test_each_recipe_matches_reference(tiny_model, idx):
    recipe = ALL_RECIPES[idx]
    plan = Plan("p", settings(2), (Recipe.uniform(3, COMPUTE, BRANCHES), recipe), 16)
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


def test_bad_specs_are_refused(tiny_model):
    with pytest.raises(TcgraphError, match="does not compute"):
        RewriteSpec(Recipe.uniform(3, REUSE, BRANCHES), ((0, "attn"),))
    with pytest.raises(TcgraphError, match="3 blocks"):
        RewriteSpec(Recipe.uniform(3, COMPUTE, BRANCHES), ((3, "attn"),))
    gm = expand_blocks(capture(tiny_model).gm)
    with pytest.raises(TcgraphError, match="blocks"):
        cache_io(gm, RewriteSpec(Recipe.uniform(2, COMPUTE, BRANCHES)))


def test_passes_are_independent_steps(tiny_model):
    """cache_io only adds I/O (the cache inputs have no users yet, every branch still runs);
    reuse then connects them; each pass leaves a linted graph. A pipeline that leaves out the
    pass of an action is caught by the numerical check, not silently exported."""
    recipe = Recipe(((REUSE, COMPUTE), (COMPUTE, REUSE), (partial([1, 2]), COMPUTE)), BRANCHES)
    plan = Plan("p", settings(2), (Recipe.uniform(3, COMPUTE, BRANCHES), recipe), 16)
    spec = RewriteSpec.of(plan, recipe)
    gm = cache_io(expand_blocks(capture(tiny_model).gm), spec)
    ins, outs = io_names(gm)
    assert (ins, outs) == plan.variant_io(recipe)
    placeholders = {n.meta["tcgraph.io_name"]: n for n in gm.graph.nodes if n.op == "placeholder"}
    assert all(not placeholders[n].users for n in ins[3:])
    assert sum(1 for n in gm.graph.nodes if "tcgraph.branch" in n.meta) == 6
    gm = reuse(gm, spec)
    assert [len(placeholders[n].users) for n in ins[3:]] == [1, 1, 0]  # the partial one waits for token_prune
    assert sum(1 for n in gm.graph.nodes if "tcgraph.branch" in n.meta) == 4
    feeds = example_inputs(tiny_model, plan, ins)
    with pytest.raises(TcgraphError, match="disagrees"):
        check_variant(tiny_model, gm, recipe, feeds)
    gm = token_prune(gm, spec)
    assert check_variant(tiny_model, gm, recipe, feeds) <= 1e-4
    assert PIPELINE[:5] == (cache_io, run_constants, reuse, forecast, token_prune)
    full = rewrite(tiny_model, spec)
    assert full.code == gm.code  # token_dynamic has nothing to do here


def test_rewrites_never_mutate_the_model(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    plan = make_plan("fora:2", tiny_model.config, settings(4))
    build_variants(tiny_model, plan)
    after = tiny_model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_build_variants_reports_one_rewrite_phase(tiny_model):
    from tcgraph.progress import Recorder

    recorder = Recorder()
    plan = make_plan("fora:2", tiny_model.config, settings(4))
    variants = build_variants(tiny_model, plan, progress=recorder)
    assert recorder.phases == [["rewrite", len(variants), [v.id for v in variants]]] and len(variants) == 2
