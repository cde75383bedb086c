"""`adaptive --base`: gated steps whose computing path is a base plan's recipe (docs/design.md, "Gated
steps"). The gated step with computed, reused and forecast later branches equals the eager reference on
both paths of the decision, through the compiled graph and on ONNX Runtime; a whole run of the artifact
on ONNX Runtime equals the planner's EagerGate; the work a step does follows its definition (block FLOPs)
and the range its brute-force least and most; calibration over a base hits the target; bad bases and
targets are refused."""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json

import pytest

from tcgraph import api
from tcgraph.compile import check_gated, example_inputs, rewrite_gated
from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import load_artifact
from tcgraph.inspection.report import inspect_plan
from tcgraph.inspection.text import format_report
from tcgraph.names import BRANCHES
from tcgraph.plan import COMPUTE, REUSE, Plan, Recipe, forecast, make_plan, partial
from tcgraph.plan.gate import FORCE_COMPUTE, Gate, work_range
from tcgraph.plan.planners.adaptive import AdaptiveConfig, EagerGate, fraction_range, measure, thresholds_for
from tcgraph.plan.planners.adaptive_base import computing_paths, step_work
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
    """`gate.points` warm-up steps computing all (what a skip reads), then the mixed recipe, gated (the graph
    under test), then a full step."""
    recipe = dataclasses.replace(MIXED, gate=gate)
    full = dataclasses.replace(FULL, gate=gate)
    warm = gate.points
    thresholds = (FORCE_COMPUTE,) * warm + (0.1, FORCE_COMPUTE)
    return Plan("adaptive", settings(warm + 2), (full,) * warm + (recipe, full), 16, gate_thresholds=thresholds)


def shared_times(step, path: str):
    """`step` as a gated step with one time axis for every branch would run it: on the `path` taken
    ("computing" or "skipping": by the threshold `check_gated` feeds), every branch reads row 0 of gate.times."""
    def run(*values, names):
        feeds = dict(zip(names, values))
        skipping = float(feeds["gate.params"][1]) > 0
        if skipping == (path == "skipping"):
            feeds["gate.times"] = feeds["gate.times"][:1].expand_as(feeds["gate.times"]).clone()
        return step(*feeds.values())
    return run


@pytest.mark.parametrize("gate", [Gate(1, 2, "step", 1), Gate(1, 3, "anchor", 2)])
def test_both_paths_over_a_base_recipe_equal_the_eager_reference(model, gate, tmp_path):  # noqa: F811
    plan = gated_step_plan(gate)
    recipe = plan.recipes[gate.points]
    keys = recipe.gated_keys()
    assert [recipe.action(*k).kind for k in keys] == ["reuse", "compute", "forecast", "reuse"]
    step, inputs, outputs = rewrite_gated(model, recipe)
    assert (inputs, outputs) == plan.variant_io(recipe)
    feeds = example_inputs(model, plan, inputs, seed=3, recipe=recipe)
    times = feeds["gate.times"]
    assert times.shape == (len(keys), gate.points) and len({tuple(r) for r in times[:3].tolist()}) == 3
    assert check_gated(model, step, recipe, (inputs, outputs), feeds, atol=1e-5) <= 1e-5
    # the computing path: block 1 MLP shifts in its output and the step, the others hand history and row on
    params = feeds["gate.params"].clone()
    got = dict(zip(outputs, step(*[{**feeds, "gate.params": params}[n] for n in inputs])))
    assert got["gate.times"][1].tolist() == [params[0].item(), *times[1, :gate.points - 1].tolist()]
    assert all(got["gate.times"][k].tolist() == times[k].tolist() for k in (0, 2, 3))
    assert (got["cache.2.attn"] - feeds["cache.2.attn"]).abs().max() == 0  # forecast, not shifted in
    # the check can fail: a step whose computing path computed every branch disagrees with this recipe; a step
    # whose branches share one time axis disagrees on the path that reads another branch's row
    full_step, _, _ = rewrite_gated(model, plan.recipes[0])
    with pytest.raises(TcgraphError, match="disagrees"):
        check_gated(model, full_step, recipe, (inputs, outputs), feeds, atol=1e-5)
    for path in ("computing", "skipping"):
        one_axis = functools.partial(shared_times(step, path), names=inputs)
        with pytest.raises(TcgraphError, match=rf"output out \({path}\)"):
            check_gated(model, one_axis, recipe, (inputs, outputs), feeds, atol=1e-5)
    # ONNX Runtime: the exported variant on both paths, against the same reference
    art = load_artifact(api.transform(model, plan, tmp_path / "art", check=False, progress=False))
    vid = plan.schedule()[gate.points]
    with api.make_runner("ort", art, one_session=False) as runner:
        def on_ort(*values):
            result = runner.run(vid, {n: v.numpy() for n, v in zip(inputs, values)})
            return tuple(runner.tensor(result[n]) for n in outputs)

        assert check_gated(model, on_ort, recipe, (inputs, outputs), feeds, atol=1e-5) <= 1e-5
    # an artifact made when gated steps kept one time axis (gate.times [points]) is refused on load, once
    manifest = json.loads((art.root / "manifest.json").read_text())
    for v in manifest["variants"]:
        for spec in v["inputs"] + v["outputs"]:
            if spec["name"] == "gate.times":
                spec["shape"] = [gate.points]
    (art.root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(TcgraphError, match=rf"variant v0 input gate.times has shape \[{gate.points}\], but this "
                                           rf"version's gated steps give it \[4, {gate.points}\] .* made by an older "
                                           r"tcgraph: transform the model again"):
        load_artifact(art.root)


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
        times = runner.tensor(dispatch.caches["gate.times"])
        dispatch.reset()
    # the samples reach a few hundred here: float32 rounding over 12 steps, relative to that scale
    assert (got - want).abs().max().item() <= 1e-6 * want.abs().max().item()
    # each later branch's steps, as the eager gate kept them (last batch): block 1's attention, which the
    # mixed steps reuse, computed at other steps than its MLP, which they compute
    keys = plan.recipes[0].gated_keys()
    assert times.tolist() == [eager.times[k] for k in keys]
    assert eager.times[(1, "attn")] != eager.times[(1, "mlp")] and eager.times[(1, "attn")][0] % 2 == 0
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
    # fora:2 computes every other step: a skip reads 2 computed values, so the warm-up is steps 0 to 2
    assert plan.params["warmup"] == 3 and plan.params["warmup_given"] == 2
    assert plan.gate_thresholds[:4] == (FORCE_COMPUTE,) * 3 + (threshold,)
    cfg = AdaptiveConfig(fraction=0.5, base="fora:2", **{**opts, "warmup": 3})
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
    least, _ = fraction_range(settings(), AdaptiveConfig(**{**opts, "warmup": 3}), 3,  # lengthened: fora:2
                              [(1.0, 1 / 3) if s % 2 == 0 else (1 / 3, 1 / 3) for s in range(STEPS)])
    with pytest.raises(TcgraphError, match=f"below the least this gate can measure over the base fora.*{least:.3f}"):
        make_plan(f"adaptive:{least - 0.02:.3f}", model.config, settings(), weights=model, base="fora:2", **opts)
    with pytest.raises(TcgraphError, match="above the most"):
        make_plan("adaptive:0.9", model.config, settings(), weights=model, base="fora:2", **opts)


def every(k: int, steps: int = STEPS) -> Plan:
    """A static plan computing every k-th step (from 0), reusing every branch between."""
    reuse = Recipe.uniform(DEPTH, REUSE, BRANCHES)
    return Plan(f"every{k}", settings(steps), tuple(FULL if s % k == 0 else reuse for s in range(steps)), 16)


def test_a_warm_up_too_short_for_the_history_is_lengthened_or_refused(model, tmp_path):  # noqa: F811
    # a plan whose warm-up computes a later branch fewer times than a skip reads: refused, naming the branch
    gate = Gate(1, 2, "step", 1)
    mixed, full = dataclasses.replace(MIXED, gate=gate), dataclasses.replace(FULL, gate=gate)
    reused = Recipe(((COMPUTE, COMPUTE), (REUSE, COMPUTE), (REUSE, REUSE)), BRANCHES, gate=gate)
    recipes = (full, reused, reused, full, full, full)
    with pytest.raises(TcgraphError, match=r"step 2 block 1 attn: the step may skip, and its skipping path reads 2 "
                                           r"values the branch computed, but .* computed it 1 times; with --warmup 4"):
        Plan("adaptive", settings(6), recipes, 16, gate_thresholds=(FORCE_COMPUTE,) * 2 + (0.1,) * 3 + (FORCE_COMPUTE,))
    Plan("adaptive", settings(6), recipes, 16, gate_thresholds=(FORCE_COMPUTE,) * 4 + (0.1, FORCE_COMPUTE))
    # a base forecast reads as many points as that branch computed on the forced steps before it
    with pytest.raises(TcgraphError, match=r"step 2 block 2 attn: .* no more than the 1 steps before it that always "
                                           r"compute it; got 2"):
        Plan("adaptive", settings(6), (full, reused, mixed, full, full, full), 16, gate_thresholds=(FORCE_COMPUTE,) * 6)
    Plan("adaptive", settings(6), (full, full, mixed, full, full, full), 16, gate_thresholds=(FORCE_COMPUTE,) * 6)
    # the planner lengthens the warm-up over a base that computes every third step: 2 points at steps 0 and 3
    opts = dict(first=1, max_skips=3, warmup=2, final=1, calib_images=2, order=1, threshold=0.1)
    plan = make_plan("adaptive", model.config, settings(), base=base_file(tmp_path, every(3)), **opts)
    assert plan.params["warmup"] == 4 and plan.params["warmup_given"] == 2
    assert plan.gate_thresholds[:5] == (FORCE_COMPUTE,) * 4 + (0.1,)
    assert "warmup_given" not in make_plan("adaptive", model.config, settings(), base=base_file(tmp_path, every(2)),
                                           **{**opts, "warmup": 3}).params
    # order 2 reads 3 computed values: over a base computing every 5th of 12 steps, steps 0 to 10 warm up
    with pytest.raises(TcgraphError, match=r"base every5: a skipping step reads 3 values each later branch computed "
                                           r"\(--order 2\), but its first 11 steps compute .* leaves no step of 12"):
        make_plan("adaptive", model.config, settings(), base=base_file(tmp_path, every(5)),
                  **{**opts, "order": 2, "warmup": 3})
