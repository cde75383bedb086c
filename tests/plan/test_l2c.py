"""Learning-to-Cache: skeleton, plan from probabilities, variant cap, router training."""
from __future__ import annotations

import math

import pytest
import torch

from tcgraph import api
from tcgraph.calibrate import calibrate
from tcgraph.errors import TcgraphError
from tcgraph.plan import COMPUTE, REUSE, Plan, Recipe, make_plan, plan_flops
from tcgraph.plan.learning.evaluate import plan_error, speedup_of
from tcgraph.plan.planners.l2c import (
    L2CConfig,
    group_steps,
    init_logits,
    recipes_for_target,
    recipes_for_threshold,
    train_router,
)
from tcgraph.plan.learning.common import cache_steps, candidate_intervals, max_speedup, rounds
from tcgraph.sampling import SamplerSettings
from tcgraph.names import BRANCHES


def settings(steps=6, cfg_scale=2.0):
    return SamplerSettings(num_steps=steps, cfg_scale=cfg_scale, batch=2, resolution=8)


def test_rounds_and_cache_steps():
    assert rounds(7, 3) == [(0, [1, 2]), (3, [4, 5]), (6, [])]
    assert cache_steps(7, 3) == [1, 2, 4, 5]
    assert cache_steps(5, 2) == [1, 3]


@pytest.mark.parametrize("k", [2, 3, 4])
def test_max_speedup_is_fora(tiny_config, k):
    plan = make_plan(f"fora:{k}", tiny_config, settings(10))
    assert max_speedup(tiny_config, 10, k) == pytest.approx(plan_flops(tiny_config, plan)["predicted_speedup"])


def _probs(steps, depth, seed=0):
    return torch.rand(steps, depth, 2, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("target", [1.3, 1.6, 1.9])
def test_target_is_met_with_the_least_important_reused(tiny_config, target):
    S, k, depth = 12, 3, tiny_config.depth
    probs = _probs(S, depth)
    recipes = recipes_for_target(tiny_config, probs, k, target)
    sp = speedup_of(tiny_config, recipes)
    assert sp >= target
    cs = set(cache_steps(S, k))
    reused, computed = [], []
    for s, r in enumerate(recipes):
        for l, br, a in r.items():
            if s not in cs:
                assert a == COMPUTE
            else:
                (computed if a.computes else reused).append(probs[s, l, 0 if br == "attn" else 1].item())
    assert max(reused) <= min(computed)
    # minimal: computing the most important reused branch again misses the target
    s, l, j = max(((s, l, j) for s in cs for l in range(depth) for j in range(2)
                   if not recipes[s].actions[l][j].computes), key=lambda i: probs[i].item())
    back = list(recipes)
    acts = [list(p) for p in back[s].actions]
    acts[l][j] = COMPUTE
    back[s] = Recipe(tuple(tuple(p) for p in acts), BRANCHES)
    assert speedup_of(tiny_config, back) < target


def test_threshold_recipes_follow_the_definition(tiny_config):
    probs = _probs(6, tiny_config.depth, 1)
    recipes = recipes_for_threshold(probs, 2, 0.4)
    for s, r in enumerate(recipes):
        for l, br, a in r.items():
            j = 0 if br == "attn" else 1
            expected = COMPUTE if s % 2 == 0 or probs[s, l, j].item() > 0.4 else REUSE
            assert a == expected, (s, l, br)


def test_variant_cap_merges_similar_steps(tiny_config):
    S, depth = 13, tiny_config.depth
    base = _probs(3, depth, 2)
    probs = torch.stack([base[s % 3] + 0.001 * s for s in range(S)])  # three families of steps
    groups = group_steps(probs, cache_steps(S, 2), 3)
    assert sorted(s for g in groups for s in g) == cache_steps(S, 2)
    families = [{s % 3 for s in g} for g in groups]
    assert all(len(f) == 1 for f in families) and len(groups) == 3
    for cap in (2, 3, 4):
        recipes = recipes_for_target(tiny_config, _probs(S, depth, 5), 2, 1.4, max_variants=cap)
        assert len(set(recipes)) <= cap
        assert speedup_of(tiny_config, recipes) >= 1.4


def test_unreachable_target(tiny_config):
    with pytest.raises(TcgraphError, match="cannot reach"):
        recipes_for_target(tiny_config, _probs(6, tiny_config.depth), 2, 5.0)
    with pytest.raises(TcgraphError, match="out of reach"):
        candidate_intervals(tiny_config, 6, 50.0)


def test_training_lowers_the_error_at_equal_compute(tiny_model):
    s = settings(8)
    traj = calibrate(tiny_model, s, num_images=12, seed=1)
    train, held = traj.split(4)
    res = train_router(tiny_model, train, 4, lam=1e-5, epochs=8, batch_images=8, lr=0.2, seed=0)
    assert res.history[-1] < res.history[0]
    assert all(p.grad is None for p in tiny_model.parameters())  # weights frozen
    untrained = recipes_for_target(tiny_model.config, torch.sigmoid(init_logits(8, 3)), 4, 1.8)
    trained = recipes_for_target(tiny_model.config, res.probs(), 4, 1.8)
    assert speedup_of(tiny_model.config, trained) == pytest.approx(speedup_of(tiny_model.config, untrained), rel=0.1)
    assert plan_error(tiny_model, held, trained) < plan_error(tiny_model, held, untrained)


def test_config_errors():
    for kwargs, msg in [({"target_speedup": 2.0, "lam": 0.1}, "not both"), ({"target_speedup": 0.9}, "> 1"),
                        ({"max_variants": 1}, ">= 2"), ({"interval": 1}, ">= 2"),
                        ({"target_speedup": 2.0, "threshold": 0.3}, "threshold"), ({"threshold": 1.5}, "(0, 1)"),
                        ({"calib_images": 8, "held_out": 8}, "held out")]:
        with pytest.raises(TcgraphError, match=msg):
            L2CConfig(**kwargs)


def test_plan_options_are_checked(tiny_config, tmp_path):
    s = settings(6)
    with pytest.raises(TcgraphError, match="apply to learning"):
        make_plan("l2c", tiny_config, s, router=tmp_path / "r.pt", target_speedup=2.0)
    with pytest.raises(TcgraphError, match="not apply"):
        make_plan("fora:2", tiny_config, s, target_speedup=2.0)
    with pytest.raises(TcgraphError, match="needs the model"):
        make_plan("l2c:1.5", tiny_config, s)
    with pytest.raises(TcgraphError, match="already names"):
        make_plan("l2c:1.5", tiny_config, s, target_speedup=2.0)


def test_learned_plan_end_to_end(tiny_model, tmp_path):
    s = settings(8)
    plan = make_plan("l2c:1.6", tiny_model.config, s, weights=tiny_model, calib_images=6, epochs=2,
                     max_variants=3)
    assert isinstance(plan, Plan) and plan.planner.startswith("l2c")
    assert speedup_of(tiny_model.config, plan.recipes) >= 1.6
    assert len(plan.variants()) <= 3
    p = plan.params
    assert p["interval"] in (2, 3) and {c["interval"] for c in p["search"]} == {2, 3}
    assert p["held_out_error"] == min(c["held_out_error"] for c in p["search"])
    assert set(map(int, p["router_probs"])) == set(cache_steps(8, p["interval"]))
    for step, rows in p["router_probs"].items():
        assert all(0.0 <= v <= 1.0 for row in rows for v in row) and len(rows) == tiny_model.config.depth
    # the plan transforms and samples like any plan, and survives its JSON round trip
    path = api.transform(tiny_model, plan, tmp_path / "l2c", progress=False)
    samples, _ = api.sample(path, classes="0,1", per_class=1, progress=False)
    assert samples.shape == (2, 2, 8, 8) and torch.isfinite(samples).all()
    report = api.format_inspect(api.inspect(path))
    assert f"L2C router: full step every {p['interval']} steps, target 1.6x" in report
    assert Plan.from_json(plan.to_json()) == plan


def test_lambda_mode_thresholds(tiny_model):
    s = settings(6)
    plan = make_plan("l2c", tiny_model.config, s, weights=tiny_model, lam=0.0, threshold=0.5, interval=3,
                     calib_images=4, epochs=1, max_variants=0)
    probs = plan.params["router_probs"]
    for step, rows in probs.items():
        for l, (pa, pm) in enumerate(rows):
            acts = plan.recipes[int(step)].actions[l]
            assert acts[0].computes == (pa > 0.5) or math.isclose(pa, 0.5, abs_tol=1e-4)
            assert acts[1].computes == (pm > 0.5) or math.isclose(pm, 0.5, abs_tol=1e-4)
