"""Run constants in the plan: a text model's cross branches read the text's keys and values,
which a plan's first step computes and outputs and every later step that runs the branch reads
(`cache.<l>.cross.k`/`.v`, [B, L, D]). Checked against the definition: roles per step, the
first step a variant of its own, the graph I/O names, memory, FLOPs by hand, JSON, and that
class-conditional plans are unchanged."""
from __future__ import annotations

import dataclasses

import pytest

from tcgraph.errors import TcgraphError
from tcgraph.models.official.dit import DiTConfig
from tcgraph.names import constant_name, is_constant
from tcgraph.passes import RewriteSpec
from tcgraph.plan.flops import branch_flops, fixed_flops, plan_flops, recipe_flops
from tcgraph.plan.plan import COMPUTE, REUSE, Plan, Recipe, partial
from tcgraph.plan.registry import make_plan
from tcgraph.sampling import SamplerSettings

PIXART = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, mlp_ratio=4.0,
                   class_dropout_prob=0.0, num_classes=0, learn_sigma=False, layout="pixart", norm_eps=1e-6,
                   caption_channels=24)
BR = ("attn", "cross", "mlp")
L = 7
SETTINGS = SamplerSettings(num_steps=6, cfg_scale=2.0, batch=2, resolution=8, text_length=L)
FULL = Recipe.uniform(3, COMPUTE, BR)
SKIP = Recipe(((REUSE, REUSE, REUSE), (REUSE, partial([1, 2]), REUSE), (COMPUTE, REUSE, REUSE)), BR)


def fora_like(**kw) -> Plan:
    return Plan("test", SETTINGS, (FULL, SKIP, FULL, SKIP, FULL, SKIP), 16, **kw)


def test_the_first_step_writes_the_constants_and_is_a_variant_of_its_own():
    plan = fora_like()
    assert [r.constants for r in plan.recipes] == ["write"] + ["read"] * 5
    assert plan.schedule() == ["v0", "v1", "v2", "v1", "v2", "v1"]  # the later full steps read: another graph
    first, skip, later = plan.variants()
    assert first.actions == later.actions and first != later
    ins, outs = plan.variant_io(first)
    assert outs[-6:] == [constant_name(l, "cross", w) for l in range(3) for w in ("k", "v")]
    assert not any(is_constant(n) for n in ins)
    ins, outs = plan.variant_io(later)
    assert [n for n in ins if is_constant(n)] == [constant_name(l, "cross", w) for l in range(3) for w in ("k", "v")]
    assert not any(is_constant(n) for n in outs)
    ins, _ = plan.variant_io(skip)  # only block 1 runs its cross branch (partial) at the skipped steps
    assert [n for n in ins if is_constant(n)] == ["cache.1.cross.k", "cache.1.cross.v"]
    assert ins.index("cache.1.cross.k") > ins.index("cache.2.mlp")  # after the branch caches
    assert first.short().endswith(" +K/V") and later.short().endswith(" K/V")


def test_not_carrying_the_constants_keeps_one_variant_per_recipe_and_roundtrips():
    plan = fora_like(carry_constants=False)
    assert {r.constants for r in plan.recipes} == {""}
    assert plan.schedule() == ["v0", "v1", "v0", "v1", "v0", "v1"] and plan.constant_names() == []
    assert plan.to_dict()["carry_constants"] is False
    back = Plan.from_dict(plan.to_dict())
    assert back == plan and not back.carry_constants
    carried = fora_like()
    assert "carry_constants" not in carried.to_dict()
    again = Plan.from_dict(carried.to_dict())
    assert again == carried and again.schedule() == carried.schedule()
    assert dataclasses.replace(carried, carry_constants=False) == plan  # the roles follow the flag
    with pytest.raises(TcgraphError, match="carry_constants must be true or false"):
        Plan.from_dict({**carried.to_dict(), "carry_constants": "yes"})


def test_class_conditional_plans_have_no_constants():
    dit = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2)
    settings = SamplerSettings(num_steps=6, cfg_scale=1.0, batch=1, resolution=8)
    plan = make_plan("fora:2", dit, settings)
    assert {r.constants for r in plan.recipes} == {""} and plan.schedule() == ["v0", "v1"] * 3
    assert "carry_constants" not in plan.to_dict()
    assert plan_flops(dit, plan)["constants_speedup"] == 1.0


def test_memory_counts_the_constants():
    plan = fora_like()
    b, d, n = SETTINGS.model_batch, PIXART.hidden_size, 16
    branch_caches = len(plan.cache_names()) * b * n * d * 4
    assert len(plan.constant_names()) == 6
    assert plan.cache_bytes(d) == branch_caches + 6 * b * L * d * 4
    assert fora_like(carry_constants=False).cache_bytes(d) == branch_caches


def test_flops_project_the_text_once_where_the_plan_carries_it():
    d, n, c = PIXART.hidden_size, PIXART.num_tokens, PIXART.caption_channels
    kv = 2 * L * d * 2 * d  # keys and values of L text tokens, one block
    caption = 2 * L * (c * d + d * d)
    compute = branch_flops(PIXART, "cross", COMPUTE, L)
    assert compute - branch_flops(PIXART, "cross", COMPUTE, L, constants_read=True) == kv
    assert fixed_flops(PIXART, L) - fixed_flops(PIXART, L, constants_read=True) == caption
    plan = fora_like()
    first, skip, later = plan.variants()
    b = SETTINGS.model_batch
    assert recipe_flops(PIXART, first, b, L) == recipe_flops(PIXART, FULL, b, L)
    assert recipe_flops(PIXART, FULL, b, L) - recipe_flops(PIXART, later, b, L) == b * (3 * kv + caption)
    f = plan_flops(PIXART, plan)
    step = recipe_flops(PIXART, FULL, b, L)
    assert f["recomputed_total"] == 6 * step
    assert f["full_total"] == step + 5 * (step - b * (3 * kv + caption))  # `full` with the same constants
    assert f["constants_speedup"] == pytest.approx(f["recomputed_total"] / f["full_total"]) and f["constants_speedup"] > 1
    full = make_plan("full", PIXART, SETTINGS)
    assert plan_flops(PIXART, full)["predicted_speedup"] == 1.0  # speedups are against the same baseline
    assert len(full.variants()) == 2


def test_only_the_first_step_may_write_constants():
    plan = fora_like()
    first, skip, later = plan.variants()
    assert RewriteSpec.of(plan, first).constant_writes == tuple((l, "cross") for l in range(3))
    with pytest.raises(TcgraphError, match="only a plan's first step"):
        RewriteSpec(later, constant_writes=((0, "cross"),))
    with pytest.raises(TcgraphError, match="only .*'cross'.* branches have run constants"):
        RewriteSpec(first, constant_writes=((0, "mlp"),))


def test_a_variant_cap_counts_the_first_step_of_a_text_plan():
    """max_variants caps the plan's variants, the text-projecting first step included."""
    import torch

    from tcgraph.plan.planners.l2c import recipes_for_target
    from tcgraph.plan.plan import cache_step_variants

    probs = torch.rand(6, 3, 3, generator=torch.Generator().manual_seed(0))
    for cap in (3, 4):
        recipes = recipes_for_target(PIXART, probs, 2, 1.3, cap, text_length=L)
        assert len(Plan("l2c", SETTINGS, recipes, 16).variants()) <= cap
    assert len(Plan("l2c", SETTINGS, recipes_for_target(PIXART, probs, 2, 1.3, None, text_length=L), 16)
               .variants()) == 5  # uncapped: both full variants and the 3 cache steps' own
    assert cache_step_variants(3, BR, 6) == 1 and cache_step_variants(3, ("attn", "mlp"), 6) == 2
    with pytest.raises(TcgraphError, match="max_variants 2 leaves no variant for the cache steps.*at least 3"):
        cache_step_variants(2, BR, 6)
