"""`adaptive --base`: gated steps whose computing path is a base plan's recipe (docs/design.md, "Gated
steps"). The gated step with computed, reused and forecast later branches equals the eager reference on
both paths of the decision, through the compiled graph and on ONNX Runtime; a whole run of the artifact
on ONNX Runtime equals the planner's EagerGate; the work a step does follows its definition (block FLOPs)
and the range its brute-force least and most; calibration over a base hits the target; bad bases and
targets are refused."""
from __future__ import annotations

import dataclasses
import itertools

import pytest

from tcgraph import api
from tcgraph.compile import check_gated, example_inputs, rewrite_gated
from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import load_artifact
from tcgraph.inspection.report import inspect_plan
from tcgraph.inspection.text import format_report
from tcgraph.names import BRANCHES
from tcgraph.plan import COMPUTE, REUSE, Plan, Recipe, forecast, make_plan, partial
from tcgraph.plan.gate import FORCE_COMPUTE, Gate
from tcgraph.plan.planners.adaptive import AdaptiveConfig, EagerGate, fraction_range, measure, thresholds_for
from tcgraph.plan.planners.adaptive_base import computing_paths, step_work, work_range
from tcgraph.runtime.dispatch import ScheduleDispatcher
from tcgraph.sampling import SamplerSettings, make_noise, run_batches, sampler_for
from tests.plan.test_gated_planner import model  # noqa: F401  (the tiny DiT fixture: 3 blocks)

STEPS, DEPTH = 12, 3
MIXED = Recipe(((COMPUTE, COMPUTE), (REUSE, COMPUTE), (forecast(2), REUSE)), BRANCHES)  # a base's cache step
FULL = Recipe.uniform(DEPTH, COMPUTE, BRANCHES)


def settings(steps: int = STEPS) -> SamplerSettings:
    return SamplerSettings(num_steps=steps, batch=2, cfg_scale=1.0, resolution=8)


def hand_base(steps: int = STEPS, cache=MIXED) -> Plan:
    """A static plan: steps 0 and 1 and every even step compute all; the odd ones from 3 on are `cache`."""
    recipes = tuple(cache if s % 2 and s > 1 else FULL for s in range(steps))
    weights = {s: {k: (1.0,) + (0.0,) * (n - 1) for k, n in r.forecasts()} for s, r in enumerate(recipes)}
    return Plan("hand", settings(steps), recipes, 16, weights=weights)


def base_file(tmp_path, plan: Plan) -> str:
    path = tmp_path / f"{plan.planner}-{len(plan.recipes)}.json"
    path.write_text(plan.to_json())
    return str(path)


def gated_step_plan(gate: Gate) -> Plan:
    """Two warm-up steps computing all, then the mixed recipe, gated (the graph under test is its v1)."""
    recipe = dataclasses.replace(MIXED, gate=gate)
    full = dataclasses.replace(FULL, gate=gate)
    thresholds = (FORCE_COMPUTE, FORCE_COMPUTE, 0.1, FORCE_COMPUTE)
    return Plan("adaptive", settings(4), (full, full, recipe, full), 16, gate_thresholds=thresholds)


@pytest.mark.parametrize("gate", [Gate(1, 2, "step", 1), Gate(1, 3, "anchor", 2)])
def test_both_paths_over_a_base_recipe_equal_the_eager_reference(model, gate, tmp_path):  # noqa: F811
    plan = gated_step_plan(gate)
    recipe = plan.recipes[2]
    assert [recipe.action(*k).kind for k in recipe.gated_keys()] == ["reuse", "compute", "forecast", "reuse"]
    step, inputs, outputs = rewrite_gated(model, recipe)
    assert (inputs, outputs) == plan.variant_io(recipe)
    feeds = example_inputs(model, plan, inputs, seed=3, recipe=recipe)
    assert check_gated(model, step, recipe, (inputs, outputs), feeds, atol=1e-5) <= 1e-5
    # the check can fail: a step whose computing path computed every branch disagrees with this recipe
    full_step, _, _ = rewrite_gated(model, plan.recipes[0])
    with pytest.raises(TcgraphError, match="disagrees"):
        check_gated(model, full_step, recipe, (inputs, outputs), feeds, atol=1e-5)
    # ONNX Runtime: the exported variant on both paths, against the same reference
    art = load_artifact(api.transform(model, plan, tmp_path / "art", check=False, progress=False))
    vid = plan.schedule()[2]
    with api.make_runner("ort", art, one_session=False) as runner:
        def on_ort(*values):
            result = runner.run(vid, {n: v.numpy() for n, v in zip(inputs, values)})
            return tuple(runner.tensor(result[n]) for n in outputs)

        assert check_gated(model, on_ort, recipe, (inputs, outputs), feeds, atol=1e-5) <= 1e-5


def test_paths_take_the_base_recipe_with_the_head_computing(tmp_path):
    gate = Gate(2, 3, "step", 1)  # 2 history points: forecasts from 3 read 2, none before 2 steps computed
    base = hand_base(cache=Recipe(((REUSE, COMPUTE), (forecast(3), REUSE), (forecast(2), COMPUTE)), BRANCHES))
    thresholds = [FORCE_COMPUTE] * 2 + [0.1] * (STEPS - 3) + [FORCE_COMPUTE]
    paths = computing_paths(base, gate, thresholds, base_config())
    assert paths[0] == dataclasses.replace(FULL, gate=gate)
    assert paths[3].actions == ((COMPUTE, COMPUTE), (COMPUTE, COMPUTE), (forecast(2), COMPUTE))  # blocks 0, 1: head
    early = computing_paths(hand_base(cache=base.recipes[3]), Gate(1, 3, "step", 1), [FORCE_COMPUTE] + [0.1] * 11,
                            base_config())
    assert early[3].actions[1:] == ((REUSE, REUSE), (REUSE, COMPUTE))  # one step always computed: one point


def base_config():
    from tcgraph.models.official.dit import make_config

    return make_config("DiT-S/2", input_size=8, depth=DEPTH, hidden_size=32, num_heads=2, in_channels=2,
                       num_classes=5, learn_sigma=True)


def test_work_and_range_follow_their_definitions():
    cfg = base_config()
    n, d, m = cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden
    attn, mlp = 8 * n * d * d + 4 * n * n * d, 4 * n * d * m  # q, k, v, out; scores and mix; two matmuls
    gate = Gate(1, 2, "step", 1)
    paths = [dataclasses.replace(FULL, gate=gate), dataclasses.replace(MIXED, gate=gate)]
    work = step_work(cfg, paths, 1)
    total = DEPTH * (attn + mlp)
    assert work[0] == pytest.approx((1.0, (attn + mlp) / total))
    assert work[1] == pytest.approx(((attn + mlp + mlp) / total, (attn + mlp) / total))  # block 0, block 1's MLP
    # the least fraction: brute force over every decision the gate may take (forced steps compute, at most
    # max_skips skips in a row), against the dynamic programme
    shares = [(1.0, 0.2), (0.9, 0.2), (0.5, 0.2), (0.95, 0.2), (0.3, 0.2), (0.8, 0.2), (1.0, 0.2)]
    thresholds = [FORCE_COMPUTE, 0.1, 0.1, 0.1, 0.1, 0.1, FORCE_COMPUTE]
    for max_skips in (1, 2, 3):
        runs = []
        for skips in itertools.product((False, True), repeat=len(shares)):
            row, ok = 0, True
            for skip, t in zip(skips, thresholds):
                ok &= not (skip and (t < 0 or row >= max_skips))
                row = row + 1 if skip else 0
            if ok:
                runs.append(sum(s[1] if k else s[0] for s, k in zip(shares, skips)) / len(shares))
        assert work_range(shares, thresholds, max_skips) == pytest.approx((min(runs), max(runs))), max_skips
    # without a base: the old formula, (computed + skipped · F / L) / steps
    cfg_a = AdaptiveConfig(fraction=0.5, first=1, max_skips=3, warmup=2, final=1)
    assert fraction_range(settings(), cfg_a, 3) == pytest.approx(((5 + 7 / 3) / STEPS, 1.0))


def test_a_run_on_ort_equals_the_planners_eager_gate(model, tmp_path):  # noqa: F811
    opts = dict(first=1, max_skips=2, warmup=2, final=1, calib_images=2, order=1)
    plan = make_plan("adaptive", model.config, settings(), weights=model, threshold=0.8,
                     base=base_file(tmp_path, hand_base()), **opts)
    assert plan.params["base"]["name"] == "hand" and plan.planner == "adaptive:0.35+hand"
    assert len(plan.variants()) == 2  # the full steps and the mixed ones, each gated
    assert "base plan hand" in format_report(inspect_plan(plan, model.config))
    art = api.transform(model, plan, tmp_path / "art", check=True, progress=False)
    cfg, s = model.config, plan.settings
    cfg_a = AdaptiveConfig(**opts, threshold=0.8)
    paths = list(plan.recipes)
    eager = EagerGate(model, plan.gate, thresholds_for(s, cfg_a, 0.8), cfg.depth, paths,
                      [tuple(w) for w in plan.params["step_work"]])
    labels, noise = [1, 3, 0, 4], make_noise(4, cfg.in_channels, s.resolution, 5)
    want = run_batches(eager, eager.reset, sampler_for(s, cfg), labels, noise, s.batch, 5)
    assert 0 < eager.skipped_total and eager.computed_total > 2 * 4  # both paths ran, mixed steps computed
    with api.make_runner("ort", load_artifact(art), one_session=False) as runner:
        dispatch = ScheduleDispatcher.for_plan(runner, plan)
        got = run_batches(dispatch, dispatch.reset, sampler_for(s, cfg), labels, noise, s.batch, 5)
        dispatch.reset()
    assert (got - want).abs().max().item() <= 1e-4
    assert dispatch.measured[0] == eager.computed_total
    assert dispatch.measured_work() == pytest.approx(eager.fraction(), abs=1e-6)
    # a computing step over the base does less than all its blocks: the fraction is below the count's
    assert eager.fraction() < (eager.computed_total + eager.skipped_total / DEPTH) / (2 * STEPS) - 0.01


def test_calibration_over_a_base_hits_the_target(model):  # noqa: F811
    opts = dict(first=1, max_skips=3, warmup=2, final=1, calib_images=2, order=1)
    plan = make_plan("adaptive:0.5", model.config, settings(), weights=model, base="fora:2", **opts)
    assert plan.params["base"]["name"].startswith("fora") and plan.planner.startswith("adaptive:0.5+fora")
    least, most = plan.params["fraction_range"]
    got, threshold = plan.params["calibrated_fraction"], plan.params["threshold"]
    paths, work = list(plan.recipes), [tuple(w) for w in plan.params["step_work"]]
    # one step more or less skipped moves the fraction by its saving / steps: the resolution of a run
    resolution = max(c - k for c, k in work) / STEPS
    assert least < 0.5 < most < 1 and abs(got - 0.5) <= resolution + 1e-9, (least, most, got)
    cfg = AdaptiveConfig(fraction=0.5, base="fora:2", **opts)
    assert measure(model, settings(), cfg, plan.gate, threshold, paths=paths, work=work) == pytest.approx(got)
    # fora:2's cache steps reuse every later branch: computing them costs what skipping them does
    assert work[3] == pytest.approx((1 / DEPTH, 1 / DEPTH)) and work[2] == pytest.approx((1.0, 1 / DEPTH))


def test_refusals(model, tmp_path):  # noqa: F811
    opts = dict(first=1, max_skips=3, warmup=2, final=1, calib_images=2)
    tokens = hand_base(cache=Recipe(((COMPUTE, COMPUTE), (partial((0, 1, 2)), COMPUTE), (REUSE, REUSE)), BRANCHES))
    with pytest.raises(TcgraphError, match=r"base .*hand.* has token actions \(partial at step 3, block 1 attn.*"
                                           r"compute, reuse and forecast"):
        make_plan("adaptive", model.config, settings(), threshold=0.1, base=base_file(tmp_path, tokens), **opts)
    short = hand_base(steps=8)
    with pytest.raises(TcgraphError, match="is for 8 steps of 3 blocks .* this plan is for 12 steps"):
        make_plan("adaptive", model.config, settings(), threshold=0.1, base=base_file(tmp_path, short), **opts)
    deeper = Plan("deep", settings(), tuple(Recipe.uniform(4, COMPUTE, BRANCHES) for _ in range(STEPS)), 16)
    with pytest.raises(TcgraphError, match="is for 12 steps of 4 blocks"):
        make_plan("adaptive", model.config, settings(), threshold=0.1, base=base_file(tmp_path, deeper), **opts)
    with pytest.raises(TcgraphError, match="not another adaptive plan"):
        make_plan("adaptive", model.config, settings(), threshold=0.1, base="adaptive:0.5", **opts)
    least, _ = fraction_range(settings(), AdaptiveConfig(**opts), 3,
                              [(1.0, 1 / 3) if s % 2 == 0 else (1 / 3, 1 / 3) for s in range(STEPS)])
    with pytest.raises(TcgraphError, match=f"below the least this gate can measure over the base fora.*{least:.3f}"):
        make_plan(f"adaptive:{least - 0.02:.3f}", model.config, settings(), weights=model, base="fora:2", **opts)
    with pytest.raises(TcgraphError, match="above the most"):
        make_plan("adaptive:0.9", model.config, settings(), weights=model, base="fora:2", **opts)
