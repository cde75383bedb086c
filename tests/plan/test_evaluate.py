"""plan.evaluate: the hard-plan error every learned planner scores candidates with."""
from __future__ import annotations

import pytest
import torch

from tcgraph.calibrate import calibrate
from tcgraph.passes import reference_step
from tcgraph.plan import COMPUTE, REUSE, Recipe, make_plan, partial, plan_flops
from tcgraph.sampling import SamplerSettings
from tcgraph.plan.learning.evaluate import plan_error, plan_errors, speedup_of
from tcgraph.names import BRANCHES


def settings(steps):
    return SamplerSettings(num_steps=steps, cfg_scale=2.0, batch=2, resolution=8)


def _chain_error(model, traj, recipes):
    """plan_error written independently: reference_step in a loop, caches carried step to step."""
    caches, total = {}, 0.0
    for s, recipe in enumerate(recipes):
        out, fresh = reference_step(model, *traj.model_inputs(s), recipe, caches)
        caches.update(fresh)
        if not recipe.is_full:
            total += torch.mean((traj.eps_of(out) - traj.eps[s]) ** 2).item()
    return total / len(recipes)


def test_plan_error_matches_a_reference_chain(tiny_model):
    traj = calibrate(tiny_model, settings(6), num_images=3)
    full = make_plan("full", tiny_model.config, settings(6))
    assert plan_error(tiny_model, traj, full.recipes) == pytest.approx(0.0, abs=1e-12)
    f = Recipe.uniform(3, COMPUTE, BRANCHES)
    a = Recipe(((REUSE, COMPUTE), (partial([0, 5, 9]), REUSE), (COMPUTE, partial(range(8)))), BRANCHES)
    b = Recipe(((partial([1, 2]), partial([1, 2])), (REUSE, REUSE), (REUSE, COMPUTE)), BRANCHES)
    recipes = (f, a, b, a, f, b)  # reuse, partial, and caches written by partial steps read later
    err = plan_error(tiny_model, traj, recipes)
    assert err > 0 and err == pytest.approx(_chain_error(tiny_model, traj, recipes), rel=1e-4)


@pytest.mark.parametrize("spec", ["full", "fora:2", "fora:3"])
def test_speedup_of_is_plan_flops(tiny_config, spec):
    plan = make_plan(spec, tiny_config, settings(7))
    assert speedup_of(tiny_config, plan.recipes) == pytest.approx(plan_flops(tiny_config, plan)["predicted_speedup"])


def test_plan_errors_share_model_calls_and_agree_with_plan_error(tiny_model):
    """Candidates scored together give each one's plan_error; steps they share (a full step at the
    same index, the same recipes since it) are one model call."""
    traj = calibrate(tiny_model, settings(7), num_images=3)
    f = Recipe.uniform(3, COMPUTE, BRANCHES)
    a = Recipe(((REUSE, COMPUTE), (partial([0, 5, 9]), REUSE), (COMPUTE, partial(range(8)))), BRANCHES)
    b = Recipe(((partial([1, 2]), partial([1, 2])), (REUSE, REUSE), (REUSE, COMPUTE)), BRANCHES)
    candidates = [(f, a, b, a, f, b, a), (f, a, a, f, b, b, f), (f, a, b, f, a, a, a), (f,) * 7]
    calls = []
    hook = tiny_model.final_layer.register_forward_hook(lambda *_: calls.append(1))
    try:
        got = plan_errors(tiny_model, traj, candidates)
    finally:
        hook.remove()
    for recipes, err in zip(candidates, got):
        assert err == pytest.approx(plan_error(tiny_model, traj, recipes), rel=1e-6, abs=1e-12)
    # one call per distinct (last full step, recipes since) at each step; a full step is one call
    assert len(calls) == 1 + 2 + 3 + 2 + 3 + 4 + 3
