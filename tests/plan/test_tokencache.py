"""TokenCache: TPRR structure (by enumeration), FLOP budget and block selection, Cache
Predictor training, planner options and errors, and a learned plan end to end."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from tcgraph import api
from tcgraph.calibrate import calibrate
from tcgraph.cli import main
from tcgraph.errors import TcgraphError
from tcgraph.plan import COMPUTE, Plan, make_plan, plan_flops
from tcgraph.plan.learning.evaluate import plan_error, speedup_of
from tcgraph.plan.learning.predictor import (block_sensitivity, init_predictor, mu_unit, staleness_init,
                                            train_predictor)
from tcgraph.plan.planners.tokencache import TokenCacheConfig, make_tokencache
from tcgraph.plan.learning.tprr import (
    keep_floor,
    kept_tokens,
    layout_speedup,
    rotation,
    select_blocks,
    tprr_candidates,
    tprr_choices,
    tprr_layout,
    tprr_recipes,
    tprr_rounds,
)
from tcgraph.sampling import SamplerSettings
from tcgraph.names import BRANCHES


def settings(steps=6, cfg_scale=2.0):
    return SamplerSettings(num_steps=steps, cfg_scale=cfg_scale, batch=2, resolution=8)


def _scores(steps, depth=3, n=16, seed=0):
    return torch.randn(steps, depth, n, generator=torch.Generator().manual_seed(seed))


def _kept(action: object, n: int) -> set[int]:
    return set(range(n)) if action.kind == "compute" else (set() if action.kind == "reuse" else set(action.indices))


#################################################################################
#                          TPRR structure, by enumeration                       #
#################################################################################


def test_tprr_rounds_example():
    rs = tprr_rounds(10, 4, 2, 4)
    assert [(r.full, r.cache, r.phase) for r in rs] == [(0, (1,), 1), (2, (3,), 1), (4, (5, 6, 7), 2), (8, (9,), 2)]
    # a phase-1 round is cut at b; b = 0 and b = S are single-phase schedules
    assert [(r.full, r.cache) for r in tprr_rounds(7, 4, 3, 2)] == [(0, (1, 2)), (3, ()), (4, (5,)), (6, ())]
    assert [r.full for r in tprr_rounds(7, 0, 5, 3)] == [0, 3, 6]
    assert [r.full for r in tprr_rounds(7, 7, 3, 5)] == [0, 3, 6]
    with pytest.raises(TcgraphError, match="outside"):
        tprr_rounds(7, 8, 2, 2)


@pytest.mark.parametrize("S", [1, 5, 8, 13])
def test_tprr_rounds_by_enumeration(S):
    for b, k1, k2 in itertools.product(range(S + 1), range(1, 6), range(1, 6)):
        rs = tprr_rounds(S, b, k1, k2)
        steps = [s for r in rs for s in (r.full, *r.cache)]
        assert steps == list(range(S))  # every step once, in order
        full = {r.full for r in rs}
        assert full == {s for s in range(0, b, k1)} | {s for s in range(b, S, k2)}
        for r in rs:
            k, lo, hi = (k1, 0, b) if r.phase == 1 else (k2, b, S)
            assert lo <= r.full < hi and (r.full - lo) % k == 0
            assert r.cache == tuple(range(r.full + 1, min(r.full + k, hi)))  # K - 1 cache steps, cut at the phase end


@pytest.mark.parametrize("S, tprr, max_stale", [
    (10, (4, 2, 4), 2), (12, (0, 5, 5), 2), (12, (6, 3, 5), 1), (13, (6, 6, 4), 2), (9, (9, 4, 4), 3),
    (16, (5, 5, 6), 2)])
@pytest.mark.parametrize("keep", [[16, 4, 9], [0, 1, 15], [2, 2, 2]])
def test_tprr_recipes_by_enumeration(S, tprr, max_stale, keep):
    n, depth = 16, 3
    scores = _scores(S, depth, n, seed=S)
    recipes = tprr_recipes(scores, keep, *tprr, max_stale=max_stale)
    assert recipes == tprr_recipes(scores.clone(), list(keep), *tprr, max_stale=max_stale)  # pure
    Plan("tokencache", settings(S), recipes, n)  # validates: every cache read follows a full step
    rounds = tprr_rounds(S, *tprr)
    full_steps = {r.full for r in rounds}
    slots = {sl.step: sl for sl in tprr_layout(S, *tprr, max_stale)}
    for s, r in enumerate(recipes):
        assert r.is_full == (s in full_steps)
    for rnd in rounds:
        C = len(rnd.cache)
        for l in range(depth):
            kept = []
            for s in rnd.cache:
                attn, mlp = recipes[s].actions[l]
                assert attn == mlp  # one token set per block, both branches
                kept.append(_kept(attn, n))
                if keep[l] == n:
                    assert attn == COMPUTE  # unpruned blocks compute at every cache step
                else:
                    assert keep[l] <= len(kept[-1]) < n or (C > max_stale and len(kept[-1]) == n)
            if keep[l] < n and C > max_stale:
                # round-robin: every token of a pruned block is recomputed in the round's cache steps
                assert set().union(*kept) == set(range(n)), (rnd, l)
                k_eff, m = rotation(n, keep[l], C)
                assert all(len(k) == k_eff for k in kept) and C * k_eff >= n
                core = set.intersection(*kept)
                assert len(core) == k_eff - m  # the core is recomputed at every step of the round
            elif keep[l] < n and C:
                # no rotation: the top keep[l] tokens of the group's mean logits, at every cache step
                for s, k in zip(rnd.cache, kept):
                    group = [t for t, sl in slots.items() if sl.group == slots[s].group]
                    order = torch.argsort(-scores[group, l].mean(0).double(), stable=True).tolist()
                    assert k == set(order[: keep[l]])
    # one recipe per group (bounded variants): at most 1 + #groups distinct recipes
    assert len(set(recipes)) <= 1 + len({sl.group for sl in slots.values()})


def test_round_robin_example():
    order = list(range(16))
    # N=16, k=4, C=3 cache steps: k' = max(4, ceil(16/3)) = 6, m = min(6, ceil(10/2)) = 5
    assert rotation(16, 4, 3) == (6, 5)
    assert [kept_tokens(order, 4, 3, j) for j in range(3)] == [
        (0, 1, 2, 3, 4, 5), (0, 6, 7, 8, 9, 10), (0, 11, 12, 13, 14, 15)]
    assert kept_tokens(order, 4, 0, 1) == (0, 1, 2, 3)  # no rotation: plain top-k
    assert kept_tokens(order, 16, 3, 0) is None and kept_tokens(order, 0, 0, 0) == ()
    # a round of 5 cache steps with k = 8: m = ceil(8 / 4) = 2, core 6 tokens, 10-token tail in slices of 2
    assert rotation(16, 8, 5) == (8, 2)
    assert [kept_tokens(order, 8, 5, j)[6:] for j in range(5)] == [(6, 7), (8, 9), (10, 11), (12, 13), (14, 15)]


def test_variant_cap_merges_unrotated_groups_and_refuses_rotated_ones():
    S = 12
    assert len({sl.group for sl in tprr_layout(S, 6, 3, 3, max_stale=2)}) == 4  # (phase, position) x 2
    merged = tprr_layout(S, 6, 3, 3, max_stale=2, max_variants=3)
    assert {sl.group for sl in merged} == {(1, 0, -1), (2, 0, -1)}
    recipes = tprr_recipes(_scores(S), [4, 16, 8], 6, 3, 3, max_stale=2, max_variants=3)
    assert len(set(recipes)) <= 3
    with pytest.raises(TcgraphError, match="distinct variants"):
        tprr_layout(S, 0, 5, 5, max_stale=2, max_variants=4)  # 4 rotated positions + the full step
    assert len({sl.group for sl in tprr_layout(S, 0, 5, 5, max_stale=2, max_variants=6)}) == 5  # 4 + cut round


#################################################################################
#                           FLOP budget, block selection                        #
#################################################################################


@pytest.mark.parametrize("tprr", [(0, 2, 2), (4, 2, 4), (6, 5, 3)])
def test_layout_speedup_is_the_plans(tiny_config, tprr):
    S, n = 12, tiny_config.num_tokens
    for keep in ([16, 16, 16], [4, 8, 16], [0, 3, 15], [1, 1, 1]):
        recipes = tprr_recipes(_scores(S), keep, *tprr)
        plan = Plan("tokencache", settings(S), recipes, n)
        sp = plan_flops(tiny_config, plan)["predicted_speedup"]
        assert speedup_of(tiny_config, recipes) == pytest.approx(sp, rel=1e-12)
        assert layout_speedup(tiny_config, S, tprr_layout(S, *tprr), keep) == pytest.approx(sp, rel=1e-12)


def test_select_blocks_greedy_rule(tiny_config):
    S, n, floor = 12, 16, 4
    slots = tprr_layout(S, 0, 3, 3)

    def speedup(k):
        return layout_speedup(tiny_config, S, slots, k)

    sens = [0.5, 0.1, 0.9]  # block 1 least sensitive, then 0, then 2
    one = speedup([16, floor, 16])
    two = speedup([floor, floor, 16])
    for target in (1.02, (one + two) / 2, two, speedup([floor] * 3) * 0.999):
        keep = select_blocks(sens, n, floor, speedup, target)
        assert speedup(keep) >= target
        pruned = [l for l in range(3) if keep[l] < n]
        assert pruned and set(pruned) == set([1, 0, 2][: len(pruned)])  # least sensitive first
        assert sum(floor < k < n for k in keep) <= 1  # at most one block between the floor and N
        # least pruning: the last block pruned at one more token misses the target
        last = max(pruned, key=lambda l: sens[l])
        if keep[last] < n:
            up = list(keep)
            up[last] += 1
            assert speedup(up) < target
    assert select_blocks(sens, n, floor, speedup, speedup([floor] * 3) * 1.001) is None


def test_tprr_choices_are_block_selection_then_tprr_recipes(tiny_config):
    """The pure scores -> recipes step the planner and the benchmarks share."""
    S, n = 12, tiny_config.num_tokens
    scores, sens, target = _scores(S), [0.5, 0.1, 0.9], 1.3
    floor = keep_floor(tiny_config, 0.25)
    assert floor == 4 and keep_floor(tiny_config, 0.0) == 0 and keep_floor(tiny_config, 0.99) == n - 1
    candidates = tprr_candidates(tiny_config, S, target, 0.25, 2, 4) + [(0, 6, 6)]  # the last one: over the cap
    choices = tprr_choices(tiny_config, scores, sens, target, candidates, min_keep=0.25, max_stale=2, max_variants=4)
    assert [c.tprr for c in choices] == candidates
    assert choices == tprr_choices(tiny_config, scores.clone(), list(sens), target, candidates, min_keep=0.25,
                                   max_stale=2, max_variants=4)  # pure
    assert "distinct variants" in choices[-1].skipped and choices[-1].recipes is None
    made = [c for c in choices if c.skipped is None]
    assert made
    for c in made:
        slots = tprr_layout(S, *c.tprr, 2, 4)
        keep = select_blocks(sens, n, floor, lambda k, sl=slots: layout_speedup(tiny_config, S, sl, k), target)
        assert c.keep == keep and c.recipes == tprr_recipes(scores, keep, *c.tprr, max_stale=2, max_variants=4)
        assert c.predicted_speedup == speedup_of(tiny_config, c.recipes) >= target
    far = tprr_choices(tiny_config, scores, sens, 50.0, [(0, 2, 2)], min_keep=0.25, max_stale=2, max_variants=None)
    assert far[0].skipped == "out of reach with every block at the floor"


#################################################################################
#                   Hard-plan error, Cache Predictor, sensitivity               #
#################################################################################


@pytest.fixture
def static_token_model(tiny_model):
    """tiny_model with tokens 0..3's positional embedding x4: after the norm those tokens are
    dominated by a constant, so their branch outputs change least from step to step."""
    with torch.no_grad():
        tiny_model.pos_embed[0, :4] *= 4
    return tiny_model


def test_predictor_beats_random_tokens_at_equal_k(static_token_model):
    model = static_token_model
    S, n = 8, model.config.num_tokens
    traj = calibrate(model, settings(S), num_images=12, seed=1)
    train, held = traj.split(4)
    res = train_predictor(model, train, 0.5, 10 * mu_unit(model, train), epochs=8, lr=0.1, seed=0)
    assert res.history[-1] < 0.9 * res.history[0]
    assert all(p.grad is None for p in model.parameters())  # weights frozen
    assert abs(res.weights()[1:].mean().item() - 0.5) < 0.05  # the keep-ratio term holds the mean at r
    # the static tokens are ranked last in every block
    mean = res.logits[1:].mean(0)
    for l in range(model.config.depth):
        assert set(torch.argsort(mean[l])[:4].tolist()) == {0, 1, 2, 3}, l
    keep, tprr = [8, 8, 8], (0, 2, 2)  # k = round(r N) in every block
    trained = plan_error(model, held, tprr_recipes(res.logits, keep, *tprr))
    randoms = [plan_error(model, held, tprr_recipes(init_predictor(S, 3, n, 0.5, seed), keep, *tprr))
               for seed in range(4)]
    assert all(trained < 0.9 * r for r in randoms), (trained, randoms)


def _scale_block(model, block, factor):
    with torch.no_grad():
        for lin in (model.blocks[block].attn.proj, model.blocks[block].mlp.fc2):
            lin.weight *= factor
            lin.bias *= factor
    return model


@pytest.mark.parametrize("loud", [0, 2])
def test_block_selection_spares_the_sensitive_block(tiny_model, loud):
    model = _scale_block(tiny_model, loud, 8.0)
    S, n = 8, model.config.num_tokens
    s = settings(S)
    traj = calibrate(model, s, num_images=6, seed=2)
    sens = block_sensitivity(model, traj, init_predictor(S, 3, n, 0.5), 0.5)
    assert max(range(3), key=lambda l: sens[l]) == loud
    assert sens[loud] > 3 * max(v for l, v in enumerate(sens) if l != loud)
    # a target that needs two pruned blocks: they are the two quiet ones, the loud one computes
    slots = tprr_layout(S, 0, 2, 2)
    one, two = (layout_speedup(model.config, S, slots, k) for k in ([4, 16, 16], [4, 4, 16]))
    target = round((one + two) / 2, 4)
    cfg = TokenCacheConfig(target_speedup=target, tprr=(0, 2, 2), calib_images=6, epochs=1)
    plan = make_tokencache(cfg, model.config, s, weights=model, traj=traj)
    p = plan.params
    assert p["keep_counts"][loud] == n and sorted(p["pruned_blocks"]) == sorted(set(range(3)) - {loud})
    quiet = sorted(p["pruned_blocks"], key=lambda l: p["sensitivity"][l])
    assert p["keep_counts"][quiet[0]] == 4 and 4 <= p["keep_counts"][quiet[1]] < n  # least sensitive at the floor
    assert plan_flops(model.config, plan)["predicted_speedup"] >= target


#################################################################################
#                                   Planner                                     #
#################################################################################


@pytest.fixture
def traj8(tiny_model):
    return calibrate(tiny_model, settings(8), num_images=6, seed=0)


@pytest.mark.parametrize("target, min_keep", [(1.3, 0.25), (1.7, 0.0)])
def test_plans_meet_the_target(tiny_model, traj8, target, min_keep):
    cfg = TokenCacheConfig(target_speedup=target, calib_images=6, epochs=2, max_variants=5, min_keep=min_keep)
    plan = make_tokencache(cfg, tiny_model.config, settings(8), weights=tiny_model, traj=traj8, finish=False)
    p = plan.params
    assert plan.planner == f"tokencache:{target}x"
    sp = plan_flops(tiny_model.config, plan)["predicted_speedup"]
    assert sp >= target and sp == pytest.approx(p["predicted_speedup"], abs=1e-4)
    assert len(plan.variants()) <= 5
    done = [r for r in p["search"] if "held_out_error" in r]
    assert len(done) >= 2 and p["held_out_error"] == min(r["held_out_error"] for r in done)
    assert all(r["predicted_speedup"] >= target for r in done)
    chosen = next(r for r in done if r["held_out_error"] == p["held_out_error"])
    assert (chosen["b"], chosen["K1"], chosen["K2"]) == (p["b"], p["K1"], p["K2"]) and chosen["keep"] == p["keep_counts"]
    assert recipes_are_tprr(plan, p)
    assert len(p["sensitivity"]) == 3 and p["pruned_blocks"] == [l for l in range(3) if p["keep_counts"][l] < 16]
    assert all(math.ceil(16 * min_keep) <= k <= 16 for k in p["keep_counts"])  # the floor holds


def recipes_are_tprr(plan, p):
    full = {r.full for r in tprr_rounds(plan.settings.num_steps, p["b"], p["K1"], p["K2"])}
    return all(r.is_full == (s in full) for s, r in enumerate(plan.recipes))


def test_planner_errors(tiny_model, tiny_config):
    s = settings(8)
    for spec, opts, msg in [
        ("tokencache:9", {}, "out of reach"),
        ("tokencache", {"target_speedup": 2.5, "tprr": "0,2,2"}, "out of reach"),
        ("tokencache:1.5", {"target_speedup": 2.0}, "already names"),
        ("tokencache", {"tprr": "4,2"}, "three integers"),
        ("tokencache", {"tprr": "a,2,2"}, "three integers"),
        ("tokencache", {"tprr": "9,2,2"}, "outside"),
        ("tokencache", {"tprr": (0, 1, 0)}, "K1, K2 >= 1"),
        ("tokencache", {"tprr": "0,6,6", "max_variants": 3}, "distinct variants"),
        ("tokencache", {"lam": 0.1}, "not apply to plan 'tokencache'"),
        ("tokencache", {"keep_ratio": 1.0}, "keep ratio"),
        ("tokencache", {"min_keep": -0.1}, "min keep"),
        ("tokencache", {"max_variants": 1}, ">= 2"),
        ("tokencache:0.9", {}, "> 1"),
        ("tokencache:1.5:2", {}, "expected tokencache"),
        ("l2c", {"tprr": "4,2,2"}, "not apply to plan 'l2c'"),
        ("dynamic", {"lam": 0.1}, "not apply to plan 'dynamic'"),
        ("tokencache", {"lr": 0.5}, "not apply to plan 'tokencache'"),  # a tuning field, not an option
        ("fora:2", {"keep_ratio": 0.5}, "not apply"),
    ]:
        with pytest.raises(TcgraphError, match=msg):
            make_plan(spec, tiny_config, s, weights=tiny_model, calib_images=4, epochs=1, **opts)
    with pytest.raises(TcgraphError, match="needs the model"):
        make_plan("tokencache:1.3", tiny_config, s)
    with pytest.raises(TcgraphError, match="at least 2 steps"):
        make_plan("tokencache:1.3", tiny_config, settings(1), weights=tiny_model)


@pytest.mark.parametrize("argv, message, code", [
    (["--plan", "tokencache", "--tprr", "4,2"], "three integers", 2),
    (["--plan", "tokencache:40"], "out of reach", 1),  # a well-formed request that cannot be met
    (["--plan", "fora:2", "--keep-ratio", "0.3"], "not apply to plan 'fora'", 2),
    (["--plan", "tokencache", "--lambda", "0.1"], "not apply to plan 'tokencache'", 2),
])
def test_cli_options(tmp_path, capsys, argv, message, code):
    out = tmp_path / "o"
    assert main(["transform", *argv, "--out", str(out), "--steps", "6", "--batch", "2"]) == code
    err = capsys.readouterr().err
    assert err.startswith("tcgraph: error: ") and message in err and not out.exists()


def test_learned_plan_end_to_end(tiny_model, tmp_path):
    s = settings(8)
    plan = make_plan("tokencache:1.4", tiny_model.config, s, weights=tiny_model, calib_images=6, epochs=2,
                     max_variants=3, min_keep=0.25, compete="off")  # the TPRR plan, forecasting where it helps
    assert isinstance(plan, Plan) and plan.planner == "tokencache:1.4x"
    assert plan_flops(tiny_model.config, plan)["predicted_speedup"] >= 1.4
    assert len(plan.variants()) <= 3
    assert any(a.kind == "partial" for r in plan.recipes for _, _, a in r.items())
    assert Plan.from_json(plan.to_json()) == plan
    path = api.transform(tiny_model, plan, tmp_path / "tc", progress=False)  # exports the partial variants
    samples, _ = api.sample(path, classes="0,1", per_class=1, progress=False)
    assert samples.shape == (2, 2, 8, 8) and torch.isfinite(samples).all()
    info = api.inspect(path, verify=False)
    assert info["planner"] == "tokencache:1.4x"



def test_to_dynamic_keeps_schedule_and_counts(tiny_config):
    from tcgraph.plan import COMPUTE, REUSE, Plan, Recipe, partial
    from tcgraph.sampling import SamplerSettings
    from tcgraph.plan.flops import branch_flops
    from tcgraph.plan.planners.tokencache import to_dynamic

    full = Recipe.uniform(3, COMPUTE, BRANCHES)
    a = Recipe(((partial([0, 3, 5]), partial([0, 3, 5])), (COMPUTE, REUSE), (partial([1]), COMPUTE)), BRANCHES)
    b = Recipe(((partial([2, 4, 6]), partial([2, 4, 6])), (COMPUTE, REUSE), (partial([7]), COMPUTE)), BRANCHES)
    plan = Plan("tokencache:1.5x", SamplerSettings(num_steps=4, batch=1, resolution=8), (full, a, b, full), 16, {})
    dyn = to_dynamic(plan)
    assert dyn.planner == "dynamic:1.5x" and dyn.params["token_choice"].startswith("dynamic")
    assert len(dyn.variants()) == 2  # a and b differ only in which tokens: one dynamic graph
    for r0, r1 in zip(plan.recipes, dyn.recipes):
        for (_, br, x), (_, _, y) in zip(r0.items(), r1.items()):
            assert (y.kind, y.k) == (("dynamic", x.k) if x.kind == "partial" else (x.kind, x.k))
            extra = 2 * 16 * tiny_config.hidden_size if x.kind == "partial" else 0
            assert branch_flops(tiny_config, br, y) == branch_flops(tiny_config, br, x) + extra


def test_staleness_init_ranks_tokens_by_how_much_their_outputs_change():
    """The closed-form start of the predictor: per step and block, the z-score over tokens of the log
    change of the token's branch outputs from the step before (read from output Grams), plus logit(r)."""
    from tcgraph.calibrate import add_grams

    S, depth, n, rows, d = 5, 2, 8, 3, 4
    g = torch.Generator().manual_seed(0)
    speed = torch.rand(depth, n, generator=g) + 0.1  # how fast each token's outputs drift, per block
    base = torch.randn(rows, n, d, generator=g)
    outputs = {}
    for l in range(depth):
        for j, br in enumerate(BRANCHES):
            drift = torch.randn(S, rows, n, d, generator=g).cumsum(0)
            outputs[(l, br)] = base + (j + 1) * speed[l][None, None, :, None] * drift  # [S, R, N, D]
    grams = add_grams({}, outputs)
    init = staleness_init(grams, S, depth, BRANCHES, 0.25)
    logit = math.log(0.25 / 0.75)
    assert init.shape == (S, depth, n) and torch.allclose(init[0], torch.full((depth, n), logit))
    for s in range(1, S):
        for l in range(depth):
            change = sum(((outputs[(l, br)][s] - outputs[(l, br)][s - 1]) ** 2).sum(dim=(0, 2)) for br in BRANCHES)
            z = torch.log(change.double())
            expected = (z - z.mean()) / (z.std() + 1e-6) + logit
            torch.testing.assert_close(init[s, l].double(), expected, atol=1e-4, rtol=0)
