"""Forecast actions in the plan: Taylor / Lagrange weights against their closed forms, the
least-squares weight fit on synthetic histories, Plan validation, JSON, variant I/O, history
bookkeeping and FLOPs of forecast branches, and the `taylor` planner's schedule and weights.

Note: `tcgraph.plan.learning.extrapolate` is the weights module (it shadows the action constructor in the
package namespace), so the constructor comes from `tcgraph.plan.plan`.
"""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from tcgraph.errors import TcgraphError
from tcgraph.plan import (COMPUTE, REUSE, Action, Plan, Recipe, branch_flops, make_plan, partial, plan_flops,
                          recipe_flops)
from tcgraph.plan.learning.extrapolate import fit_weights, lagrange_weights, normal_equations, solve_weights, taylor_weights
from tcgraph.plan.plan import MAX_HISTORY, forecast
from tcgraph.sampling import SamplerSettings
from tcgraph.names import BRANCHES

C, R = COMPUTE, REUSE
F2, F3 = forecast(2), forecast(3)


def settings(steps, batch=2, cfg=2.0):
    return SamplerSettings(num_steps=steps, batch=batch, cfg_scale=cfg, resolution=8)


# ---------------------------------------------------------------- Taylor / Lagrange weights


@pytest.mark.parametrize("gap", [1, 2, 3, 5])
@pytest.mark.parametrize("d", [1, 2, 4, 7])
def test_order_1_is_linear_extrapolation(gap, d):
    """History s1 = 10 + gap, s2 = 10 at step s1 + d: (1 + d/N, -d/N)."""
    s1 = 10 + gap
    w = taylor_weights(s1 + d, [s1, 10], 1)
    assert w == pytest.approx((1 + d / gap, -d / gap), rel=1e-12, abs=1e-12)
    assert all(isinstance(v, float) for v in w)


@pytest.mark.parametrize("gap", [1, 3, 4])
@pytest.mark.parametrize("d", [1, 2, 3, 6])
def test_order_2_equal_gaps_closed_form(gap, d):
    """Equal gaps N, offset d, x = d/N: ((x+1)(x+2)/2, -x(x+2), x(x+1)/2) (Newton backward differences)."""
    s1 = 20
    x = d / gap
    w = taylor_weights(s1 + d, [s1, s1 - gap, s1 - 2 * gap], 2)
    assert w == pytest.approx(((x + 1) * (x + 2) / 2, -x * (x + 2), x * (x + 1) / 2), rel=1e-12, abs=1e-12)


def test_order_3_equal_gaps_closed_form():
    """Order 3, equal gaps, x = d/N: Newton's backward expansion through 4 points."""
    gap, d = 3, 2
    x = d / gap
    want = ((x + 1) * (x + 2) * (x + 3) / 6, -x * (x + 2) * (x + 3) / 2, x * (x + 1) * (x + 3) / 2,
            -x * (x + 1) * (x + 2) / 6)
    assert taylor_weights(12 + d, [12, 9, 6, 3], 3) == pytest.approx(want, rel=1e-12)


def test_order_0_is_reuse_and_only_the_newest_points_are_used():
    assert taylor_weights(7, [5, 3, 1], 0) == (1.0,)
    assert taylor_weights(7, [5, 3, 1, 0], 1) == taylor_weights(7, [5, 3], 1) == pytest.approx((2.0, -1.0))
    assert len(taylor_weights(9, [8, 6, 4, 2], 2)) == 3


@pytest.mark.parametrize("seed", range(6))
def test_weights_reproduce_polynomials_of_degree_below_n(seed):
    """Σ_j w_j p(s_j) = p(s) for every polynomial p of degree < n, on non-uniform history steps."""
    rng = random.Random(seed)
    n = rng.randint(1, 4)
    hist = sorted(rng.sample(range(0, 40), n), reverse=True)
    step = hist[0] + rng.randint(1, 6)
    w = lagrange_weights(step, hist)
    assert len(w) == n and sum(w) == pytest.approx(1.0, abs=1e-9)  # constants are reproduced
    for degree in range(n):
        coef = [rng.uniform(-2, 2) for _ in range(degree + 1)]
        p = lambda s: sum(c * s ** k for k, c in enumerate(coef))  # noqa: E731
        got = sum(wj * p(sj) for wj, sj in zip(w, hist))
        assert got == pytest.approx(p(step), rel=1e-9, abs=1e-9 * max(1.0, abs(p(step)))), (degree, hist, step)
    if n >= 2:  # and not one degree higher (the weights are not trivially exact)
        q = lambda s: float(s) ** n  # noqa: E731
        assert abs(sum(wj * q(sj) for wj, sj in zip(w, hist)) - q(step)) > 1e-6


def test_interpolation_at_a_history_step_picks_that_entry():
    assert lagrange_weights(5, [8, 5, 1]) == pytest.approx((0.0, 1.0, 0.0), abs=1e-12)


@pytest.mark.parametrize("history", [[], [3, 3], [4, 2, 4]])
def test_bad_histories_are_refused(history):
    with pytest.raises(TcgraphError, match="distinct and non-empty"):
        lagrange_weights(6, history)


def test_negative_order_is_refused():
    with pytest.raises(TcgraphError, match="order must be >= 0"):
        taylor_weights(6, [3, 0], -1)


# ---------------------------------------------------------------- least-squares fit


def _histories(n, shape=(2, 16, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)], g


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_fit_recovers_known_coefficients(n):
    hist, g = _histories(n, seed=n)
    coef = [1.7, -0.9, 0.35, -0.12][:n]
    target = sum(c * h for c, h in zip(coef, hist)) + 1e-5 * torch.randn(hist[0].shape, generator=g)
    w = fit_weights(hist, target)
    assert len(w) == n and all(isinstance(v, float) for v in w)
    assert w == pytest.approx(coef, abs=1e-4)


def test_fit_recovers_coefficients_of_correlated_histories():
    """Histories of a smooth trajectory are strongly correlated: H_j = A + s_j B + s_j² C (+ tiny noise)."""
    g = torch.Generator().manual_seed(3)
    a, b, c = (torch.randn(2, 16, 32, generator=g) for _ in range(3))
    traj = lambda s: a + 0.1 * s * b + 0.01 * s * s * c  # noqa: E731
    hist = [traj(s) + 1e-4 * torch.randn(a.shape, generator=g) for s in (9, 6, 3)]
    coef = (0.8, 0.5, -0.3)
    w = fit_weights(hist, sum(cj * h for cj, h in zip(coef, hist)))
    assert w == pytest.approx(coef, abs=2e-3)


def test_fit_is_never_worse_than_taylor_on_its_data():
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    traj = lambda s: torch.sin(a + 0.2 * s * b)  # noqa: E731
    hist, target = [traj(6.0), traj(3.0), traj(0.0)], traj(8.0)
    err = lambda w: float(((sum(wj * h for wj, h in zip(w, hist)) - target) ** 2).sum())  # noqa: E731
    assert err(fit_weights(hist, target)) <= err(taylor_weights(8, [6, 3, 0], 2)) + 1e-9
    assert err(fit_weights(hist, target)) < err(taylor_weights(8, [6, 3, 0], 2))


def test_normal_equations_accumulate_over_batches():
    """(G, b) summed over two calibration batches and solved once = one fit on the concatenation."""
    g = torch.Generator().manual_seed(11)
    coef = torch.tensor([1.3, -0.6, 0.2], dtype=torch.float64)
    batches = []
    for rows in (2, 3):
        hist = [torch.randn(rows, 16, 32, generator=g) for _ in range(3)]
        target = sum(float(c) * h for c, h in zip(coef, hist)) + 0.3 * torch.randn(rows, 16, 32, generator=g)
        batches.append((hist, target))
    (g1, b1), (g2, b2) = (normal_equations(h, y) for h, y in batches)
    assert g1.dtype == torch.float64 and g1.shape == (3, 3) and b1.shape == (3,)
    assert torch.allclose(g1, g1.T)
    accumulated = solve_weights(g1 + g2, b1 + b2)
    cat = [torch.cat([batches[0][0][j], batches[1][0][j]]) for j in range(3)]
    one = fit_weights(cat, torch.cat([batches[0][1], batches[1][1]]))
    assert accumulated == pytest.approx(one, rel=1e-9, abs=1e-12)
    # the noise is large here: the fit is the least-squares solution, not the coefficients
    flat = torch.stack([h.reshape(-1).double() for h in cat], 1)
    lstsq = torch.linalg.lstsq(flat, torch.cat([batches[0][1], batches[1][1]]).reshape(-1, 1).double()).solution
    assert one == pytest.approx(lstsq.reshape(-1).tolist(), rel=1e-4, abs=1e-6)
    # the normal equations themselves
    f0 = batches[0][0][0].reshape(-1).double()
    assert float(g1[0, 1]) == pytest.approx(float(f0 @ batches[0][0][1].reshape(-1).double()), rel=1e-12)
    assert float(b1[2]) == pytest.approx(float(batches[0][0][2].reshape(-1).double()
                                               @ batches[0][1].reshape(-1).double()), rel=1e-12)


def test_collinear_history_stays_solvable_and_bad_data_is_refused():
    h, _ = _histories(1)
    w = fit_weights([h[0], h[0].clone()], 2 * h[0])  # ridge: the minimum-norm-ish split
    assert sum(w) == pytest.approx(2.0, rel=1e-4) and w[0] == pytest.approx(w[1], rel=1e-3)
    with pytest.raises(TcgraphError, match="non-finite"):
        fit_weights([torch.full_like(h[0], float("nan")), h[0]], h[0])


# ---------------------------------------------------------------- actions and plan validation


@pytest.mark.parametrize("points", [0, 5, -1, True, 2.0])
def test_forecast_points_out_of_range_are_refused(points):
    with pytest.raises(TcgraphError, match=f"1..{MAX_HISTORY} history points"):
        Action("forecast", points=points)


def test_forecast_action_basics():
    assert forecast(3) == Action("forecast", points=3) and forecast(3).short() == "F3"
    assert forecast(2).reads_cache and not forecast(2).computes
    assert partial([1]).computes and Action("dynamic", size=2).computes and not REUSE.computes
    with pytest.raises(TcgraphError, match="need a number of history points"):
        Action("forecast")
    with pytest.raises(TcgraphError, match="only forecast actions have one"):
        Action("compute", points=2)
    assert Action.from_json(forecast(4).to_json()) == forecast(4) and forecast(4).to_json() == {"forecast": 4}
    for bad in ({"forecast": True}, {"forecast": "2"}, {"forecast": 2, "x": 1}):
        with pytest.raises(TcgraphError, match="cannot read action"):
            Action.from_json(bad)


def _u(a, m=None):
    """A 2-block recipe: block 0 (a, m), block 1 compute."""
    return Recipe(((a, m or a), (C, C)), BRANCHES)


def test_forecast_needs_enough_earlier_computes():
    """A forecast needs one computed output; entries that do not exist yet must have weight 0."""
    s = settings(3)
    with pytest.raises(TcgraphError, match=r"step 1 forecasts cache.0.attn from 2 history points but only 1 "):
        Plan("p", s, (_u(C), _u(F2, R), _u(C)), 16, weights={1: {(0, "attn"): (2.0, -1.0)}})
    Plan("p", s, (_u(C), _u(F2, R), _u(C)), 16, weights={1: {(0, "attn"): (1.25, 0.0)}})  # a scaled reuse
    # reuse and forecast steps do not count as history entries
    with pytest.raises(TcgraphError, match=r"step 2 forecasts cache.0.attn from 2 history points but only 1 "):
        Plan("p", s, (_u(C), _u(R), _u(F2, R)), 16, weights={2: {(0, "attn"): (2.0, -1.0)}})
    with pytest.raises(TcgraphError, match="from 3 history points but only 2"):
        Plan("p", settings(4), (_u(C), _u(C), _u(F2, R), _u(F3, R)), 16,
             weights={2: {(0, "attn"): (2.0, -1.0)}, 3: {(0, "attn"): (1.0, 1.0, -1.0)}})
    # partial and dynamic steps do
    Plan("p", s, (_u(C), _u(partial([1, 2]), R), _u(F2, R)), 16, weights={2: {(0, "attn"): (2.0, -1.0)}})
    Plan("p", s, (_u(C), _u(Action("dynamic", size=3), R), _u(F2, R)), 16, weights={2: {(0, "attn"): (2.0, -1.0)}})
    with pytest.raises(TcgraphError, match="from 1 history points but only 0 earlier steps computed it"):
        Plan("p", settings(1), (_u(forecast(1), C),), 16, weights={0: {(0, "attn"): (1.0,)}})


BASE = (_u(C), _u(C), _u(F2, R))


@pytest.mark.parametrize("weights, match", [
    ({}, "forecast weights are given for \\[\\] but the step forecasts \\['cache.0.attn'\\]"),
    ({2: {}}, "give weights for exactly the forecast branches"),
    ({2: {(0, "attn"): (2.0,)}}, "expected 2 finite float weights"),
    ({2: {(0, "attn"): (2.0, -1.0, 0.0)}}, "expected 2 finite float weights"),
    ({2: {(0, "attn"): (2.0, float("nan"))}}, "expected 2 finite float weights"),
    ({2: {(0, "attn"): (float("inf"), -1.0)}}, "expected 2 finite float weights"),
    ({2: {(0, "attn"): (2.0, -1.0), (0, "mlp"): (1.0,)}}, "step forecasts \\['cache.0.attn'\\]"),
    ({2: {(0, "attn"): (2.0, -1.0)}, 1: {(1, "mlp"): (1.0, 0.0)}}, "step 1: forecast weights are given for"),
    ({2: {(0, "attn"): (2.0, -1.0)}, 3: {}}, "for steps \\[3\\], which the plan does not have"),
    ([(2, 1.0)], "must be a dict"),
])
def test_bad_weights_are_refused(weights, match):
    with pytest.raises(TcgraphError, match=match):
        Plan("p", settings(3), BASE, 16, weights=weights)


def _mixed_plan(steps=8):
    """3 blocks: attn of block 0 forecast from up to 3 points, mlp of block 1 from 2, block 2 partial/reuse."""
    full = Recipe.uniform(3, C, BRANCHES)
    a = Recipe(((F2, R), (R, F2), (partial([0, 5]), C)), BRANCHES)
    b = Recipe(((F3, C), (C, F2), (R, R)), BRANCHES)
    recipes = [full, full, a, full, b, a, full, b][:steps]
    w = {}
    for s, r in enumerate(recipes):
        if r.forecasts():
            w[s] = {key: tuple(float(0.5 + 0.25 * j - 0.1 * s) for j in range(n)) for key, n in r.forecasts()}
    return Plan("mixed", settings(len(recipes)), tuple(recipes), 16, weights=w)


def test_json_round_trip_keeps_the_weights():
    plan = _mixed_plan()
    plan = Plan(plan.planner, plan.settings, plan.recipes, 16,
                weights={s: {k: tuple(v + 1 / 3 for v in w) for k, w in ws.items()} for s, ws in plan.weights.items()})
    text = plan.to_json()
    back = Plan.from_json(text)
    assert back == plan and back.weights == plan.weights and back.to_json() == text
    d = json.loads(text)
    assert d["forecast_weights"]["2"]["cache.0.attn"] == list(plan.weights[2][(0, "attn")])
    assert set(d["forecast_weights"]) == {"2", "4", "5", "7"}
    # a plan that differs only in its weights is another plan
    other = dict(plan.weights)
    other[2] = {**other[2], (0, "attn"): (9.0, -8.0)}
    assert Plan(plan.planner, plan.settings, plan.recipes, 16, weights=other) != plan
    # plans without forecasts have no weights entry
    assert "forecast_weights" not in make_plan("fora:2", _cfg(), settings(4)).to_dict()


def test_json_round_trip_of_an_empty_weights_entry():
    """BUG (Plan.to_dict): `weights={s: {}}` for a step that forecasts nothing is valid, but to_dict
    drops the empty entry, so Plan.from_json(plan.to_json()) != plan (weights is a compared field).
    Fix: drop empty entries in __post_init__ (object.__setattr__), or compare normalised weights."""
    plan = _mixed_plan(3)
    plan = Plan(plan.planner, plan.settings, plan.recipes, 16, weights={**plan.weights, 0: {}})
    assert Plan.from_json(plan.to_json()) == plan


@pytest.mark.parametrize("bad", [{"2": {"cache.0.attn.h1": [1.0, 0.0]}}, {"2": {"blocks.0.attn": [1.0, 0.0]}},
                                 ["x"]])
def test_malformed_weights_in_json_are_refused(bad):
    d = _mixed_plan(3).to_dict()
    d["forecast_weights"] = bad
    with pytest.raises(TcgraphError, match="malformed plan"):
        Plan.from_dict(d)


def test_variant_io_of_a_forecast_recipe():
    plan = _mixed_plan()
    full, a, b = plan.variants()
    assert plan.variant_io(a) == (
        ["x", "t", "y", "cache.0.attn", "cache.0.attn.h1", "cache.0.mlp", "cache.1.attn", "cache.1.mlp",
         "cache.1.mlp.h1", "cache.2.attn", "forecast.w"],
        ["out", "cache.2.attn", "cache.2.mlp"],
    )
    assert plan.variant_io(b) == (
        ["x", "t", "y", "cache.0.attn", "cache.0.attn.h1", "cache.0.attn.h2", "cache.1.mlp", "cache.1.mlp.h1",
         "cache.2.attn", "cache.2.mlp", "forecast.w"],
        ["out", "cache.0.mlp", "cache.1.attn"],
    )
    # the full step writes every branch some step reads; no recipe writes history names
    assert plan.variant_io(full) == (["x", "t", "y"], ["out"] + [f"cache.{l}.{br}" for l in range(3)
                                                                 for br in ("attn", "mlp")])
    assert plan.variant_io(Recipe.uniform(3, R, BRANCHES))[0][-1] != "forecast.w"


def test_step_weights_layout():
    plan = _mixed_plan()
    assert plan.step_weights(0) is None and plan.step_weights(3) is None
    w = plan.step_weights(4)  # recipe b: (0, attn) F3 then (1, mlp) F2, block order
    assert w.dtype == np.float32 and w.shape == (5,)
    assert w.tolist() == pytest.approx(list(plan.weights[4][(0, "attn")]) + list(plan.weights[4][(1, "mlp")]))
    w = plan.step_weights(2)  # recipe a: (0, attn) F2, (1, mlp) F2
    assert w.tolist() == pytest.approx(list(plan.weights[2][(0, "attn")]) + list(plan.weights[2][(1, "mlp")]))
    feeds = plan.step_feeds()
    assert len(feeds) == 8 and [bool(f) for f in feeds] == [False, False, True, False, True, True, False, True]
    assert all(set(f) == {"forecast.w"} and f["forecast.w"].shape == (sum(n for _, n in plan.recipes[s].forecasts()),)
               for s, f in enumerate(feeds) if f)
    assert np.array_equal(feeds[5]["forecast.w"], plan.step_weights(5))
    assert not np.array_equal(feeds[2]["forecast.w"], feeds[5]["forecast.w"])  # same variant, other weights


def test_history_bookkeeping_and_cache_memory():
    plan = _mixed_plan()
    assert plan.history((0, "attn")) == 3 and plan.history((1, "mlp")) == 2
    assert plan.history((0, "mlp")) == 1 and plan.history((2, "attn")) == 1
    # partial steps are history entries, reuse and forecast steps are not
    assert plan.history_steps(7, (0, "attn")) == [6, 3, 1, 0]
    assert plan.history_steps(7, (1, "mlp")) == [6, 3, 1, 0]
    assert plan.history_steps(7, (2, "attn")) == [6, 5, 3, 2, 1, 0]
    assert plan.history_steps(7, (1, "attn")) == [6, 4, 3, 1, 0]
    assert plan.history_steps(0, (0, "attn")) == []
    names = plan.cache_names()
    assert names == ["cache.0.attn", "cache.0.attn.h1", "cache.0.attn.h2", "cache.0.mlp", "cache.1.attn",
                     "cache.1.mlp", "cache.1.mlp.h1", "cache.2.attn", "cache.2.mlp"]
    b, n, d = plan.settings.model_batch, 16, 32
    assert b == 4
    assert plan.cache_bytes(d) == 9 * b * n * d * 4 and plan.cache_bytes(d, itemsize=2) == 9 * b * n * d * 2
    fora = Plan("f", plan.settings, tuple(Recipe.uniform(3, C, BRANCHES) if r.is_full else Recipe.uniform(3, R, BRANCHES)
                                          for r in plan.recipes), 16)
    assert plan.cache_bytes(d) - fora.cache_bytes(d) == 3 * b * n * d * 4  # h1, h2 of 0.attn and h1 of 1.mlp


def _cfg():
    from tcgraph.models.official.dit import make_config

    return make_config("DiT-S/2", input_size=8, depth=3, hidden_size=32, num_heads=2, in_channels=2,
                       num_classes=5, learn_sigma=True)


def test_flops_of_forecast_branches():
    """A forecast runs no matrix product: 0 FLOPs, like reuse (its weighted sum is element-wise work,
    left out like gates and norms; it shows in the realized/predicted ratio)."""
    cfg = _cfg()
    for points in range(1, 5):
        for br in ("attn", "mlp"):
            assert branch_flops(cfg, br, forecast(points)) == 0 == branch_flops(cfg, br, R)
    plan = _mixed_plan()
    full, a, b = plan.variants()
    batch = plan.settings.model_batch
    reuse_a = Recipe(tuple(tuple(R if x.kind == "forecast" else x for x in pair) for pair in a.actions), BRANCHES)
    assert recipe_flops(cfg, a, batch) == recipe_flops(cfg, reuse_a, batch)
    f = plan_flops(cfg, plan)
    assert f["per_variant"]["v1"] == recipe_flops(cfg, a, batch)
    assert f["total"] == sum(recipe_flops(cfg, r, batch) for r in plan.recipes)


# ---------------------------------------------------------------- the taylor planner


def test_taylor_3_schedule_and_weights():
    cfg = _cfg()
    plan = make_plan("taylor:3", cfg, settings(11))
    assert plan.planner == "taylor:3:1" and plan.params == {"interval": 3, "order": 1}
    kinds = [{a.short() for _, _, a in r.items()} for r in plan.recipes]
    assert kinds == [{"C"}, {"R"}, {"R"}, {"C"}, {"F2"}, {"F2"}, {"C"}, {"F2"}, {"F2"}, {"C"}, {"F2"}]
    assert len(plan.variants()) == 3 and plan.schedule() == ["v0", "v1", "v1", "v0", "v2", "v2", "v0", "v2", "v2",
                                                             "v0", "v2"]
    assert set(plan.weights) == {4, 5, 7, 8, 10}
    for s, ws in plan.weights.items():
        assert set(ws) == {(l, br) for l in range(3) for br in ("attn", "mlp")}
        d = s - plan.history_steps(s, (0, "attn"))[0]
        for key, w in ws.items():
            assert w == taylor_weights(s, plan.history_steps(s, key), 1)
            assert w == pytest.approx((1 + d / 3, -d / 3), rel=1e-12)
    assert plan.history((0, "attn")) == 2
    assert Plan.from_json(plan.to_json()) == plan


def test_taylor_4_2_schedule_and_weights():
    cfg = _cfg()
    plan = make_plan("taylor:4:2", cfg, settings(15))
    assert plan.planner == "taylor:4:2" and plan.params == {"interval": 4, "order": 2}
    short = [r.short().split()[0] for r in plan.recipes]
    assert short == ["CC", "RR", "RR", "RR", "CC", "F2F2", "F2F2", "F2F2", "CC", "F3F3", "F3F3", "F3F3", "CC",
                     "F3F3", "F3F3"]
    assert len(plan.variants()) == 4  # full, reuse, F2, F3: the weights are inputs, not variants
    for s in (5, 6, 7):
        d = s - 4
        assert plan.weights[s][(1, "mlp")] == pytest.approx((1 + d / 4, -d / 4), rel=1e-12)
    for s in (9, 10, 11, 13, 14):
        hist = plan.history_steps(s, (2, "attn"))
        x = (s - hist[0]) / 4
        for key, w in plan.weights[s].items():
            assert w == taylor_weights(s, plan.history_steps(s, key), 2)
            assert w == pytest.approx(((x + 1) * (x + 2) / 2, -x * (x + 2), x * (x + 1) / 2), rel=1e-12)
    assert plan.history((2, "mlp")) == 3
    assert plan.cache_names()[:3] == ["cache.0.attn", "cache.0.attn.h1", "cache.0.attn.h2"]


def test_taylor_edge_schedules():
    cfg = _cfg()
    assert all(r.is_full for r in make_plan("taylor:1", cfg, settings(5)).recipes)
    assert make_plan("taylor:1", cfg, settings(5)).weights == {}
    plan = make_plan("taylor:2:3", cfg, settings(9))  # forecasts grow to 4 points as computes accumulate
    assert [r.short().split()[0] for r in plan.recipes] == ["CC", "RR", "CC", "F2F2", "CC", "F3F3", "CC", "F4F4", "CC"]
    assert plan.weights[7][(0, "attn")] == pytest.approx(taylor_weights(7, [6, 4, 2, 0], 3))
    assert make_plan("taylor:5", cfg, settings(4)).weights == {}  # one compute only: reuse


@pytest.mark.parametrize("spec, match", [
    ("taylor:0", "taylor interval must be >= 1, got 0"),
    ("taylor:3:0", r"taylor order must be 1..3, got 0"),
    ("taylor:3:4", r"taylor order must be 1..3, got 4"),
    ("taylor:-2", "interval must be >= 1"),
])
def test_bad_taylor_specs(spec, match):
    with pytest.raises(TcgraphError, match=match):
        make_plan(spec, _cfg(), settings(6))


def test_taylor_forecasts_a_smooth_trajectory_better_than_fora():
    """The point of the planner: on a quadratic-in-step branch output, order 2 is exact, order 1
    beats reuse (what `fora` does)."""
    cfg = _cfg()
    p1, p2 = make_plan("taylor:3:1", cfg, settings(12)), make_plan("taylor:3:2", cfg, settings(12))
    y = lambda s: 1.0 + 0.3 * s + 0.02 * s * s  # noqa: E731
    for s in (10, 11):
        h = p2.history_steps(s, (0, "attn"))
        f2 = sum(w * y(hs) for w, hs in zip(p2.weights[s][(0, "attn")], h))
        f1 = sum(w * y(hs) for w, hs in zip(p1.weights[s][(0, "attn")], h))
        assert f2 == pytest.approx(y(s), abs=1e-12)
        assert abs(f1 - y(s)) < abs(y(h[0]) - y(s))
    assert math.isclose(sum(p2.weights[10][(0, "attn")]), 1.0)
