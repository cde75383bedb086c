"""Forecast plans at run time.

1. Slot rotation: the dispatcher's history over a whole 50-step schedule (compute, reuse,
   forecast(1..3), partial and dynamic steps; branches with history 1, 2 and 3), driven by a fake
   run function whose outputs are tagged with the step that made them: every fed
   `cache.<l>.<br>.h<j>` is the output of `Plan.history_steps(step, key)[j]`, which agrees with
   a naive simulation; the same with buffer-returning runners (`copy_history=True`).
2. Backends: a hand-made forecast plan (and a taylor plan) transformed, sampled with ONNX
   Runtime and the torch runner (CPU), each step against an eager loop that carries the
   history by hand (written without the dispatcher).
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tcgraph import api
from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import load_artifact
from tcgraph.models.official.dit import DiT, make_config, randomize_weights
from tcgraph.passes import reference_step
from tcgraph.plan import COMPUTE, REUSE, Plan, Recipe, dynamic, make_plan, partial
from tcgraph.plan.learning.extrapolate import taylor_weights
from tcgraph.plan.plan import forecast
from tcgraph.runtime.dispatch import ScheduleDispatcher, history_depths
from tcgraph.sampling import SamplerSettings, make_noise, run_batches, sampler_for
from tcgraph.names import BRANCHES

C, R = COMPUTE, REUSE
KEYS = [(0, "attn"), (0, "mlp"), (1, "attn"), (1, "mlp")]

# per branch, the actions a step may take (forecast(n) only once n computes exist)
CHOICES = {
    (0, "attn"): [C, R, forecast(1), forecast(2), forecast(3), forecast(3)],  # history 3
    (0, "mlp"): [C, R, dynamic(4), forecast(2), forecast(2)],  # history 2, and an input cache
    (1, "attn"): [C, R, partial([1, 5, 9])],  # history 1 (reuse and partial only)
    (1, "mlp"): [C, partial([0, 2]), forecast(2), forecast(2), R],  # history 2, partial entries
}


def rotation_plan(steps: int = 50, seed: int = 0) -> Plan:
    rng = random.Random(seed)
    recipes, weights, computed = [], {}, {k: 0 for k in KEYS}
    for s in range(steps):
        if s == 0 or s % 11 == 0:
            acts = {k: C for k in KEYS}
        else:
            acts = {}
            for k in KEYS:
                ok = [a for a in CHOICES[k] if a.kind != "forecast" or a.points <= computed[k]]
                acts[k] = rng.choice(ok)
        recipe = Recipe(tuple((acts[(b, "attn")], acts[(b, "mlp")]) for b in range(2)), BRANCHES)
        recipes.append(recipe)
        if recipe.forecasts():
            weights[s] = {k: tuple(round(rng.uniform(-2, 2), 3) for _ in range(n)) for k, n in recipe.forecasts()}
        for k in KEYS:
            computed[k] += acts[k].computes
    return Plan("rotation", SamplerSettings(num_steps=steps, batch=1, cfg_scale=1.0, resolution=8),
                tuple(recipes), 16, weights=weights)


def tag(step: int, name: str) -> float:
    """The value a fake run writes into output `name` at `step`."""
    _, block, branch = name.removesuffix(".in").split(".")
    return 100.0 * step + KEYS.index((int(block), branch)) + (0.5 if name.endswith(".in") else 0)


def naive_history(plan: Plan) -> list[dict]:
    """Per step, key -> steps of its history entries (newest first), by replaying the recipes."""
    out, made = [], {k: [] for k in KEYS}
    for recipe in plan.recipes:
        out.append({k: list(reversed(v)) for k, v in made.items()})
        for b, br, a in recipe.items():
            if a.kind in ("compute", "partial", "dynamic"):
                made[(b, br)].append(len(out) - 1)
    return out


class FakeRun:
    """A RunFn: records the feeds of every call; outputs are tagged with the step (read from `t`).
    With `buffers`, it returns the same tensor per output name every call, overwritten in place
    (what CUDA-graph and TensorRT runners do)."""

    def __init__(self, io, buffers: bool = False):
        self.io, self.buffers, self.fed, self.fed_ids, self.returned = io, buffers, [], [], []
        self._bufs: dict[str, torch.Tensor] = {}

    def __call__(self, vid, feeds):
        step = int(feeds["t"][0])
        # values as they are at the call (a buffer fed now may be overwritten by a later call)
        self.fed.append({n: v.clone() if isinstance(v, torch.Tensor) else v.copy() for n, v in feeds.items()})
        self.fed_ids.append({n: id(v) for n, v in feeds.items()})
        result = {"out": torch.zeros(1)}
        for name in self.io[vid][1][1:]:
            if self.buffers:
                result[name] = self._bufs.setdefault(name, torch.empty(1)).fill_(tag(step, name))
            else:
                result[name] = torch.full((1,), tag(step, name))
        self.returned.append(result)
        return result


def drive(plan: Plan, *, buffers: bool = False, copy_history: bool = False):
    io = {f"v{i}": plan.variant_io(r) for i, r in enumerate(plan.variants())}
    run = FakeRun(io, buffers)
    dispatch = ScheduleDispatcher(plan.schedule(), io, run, step_feeds=plan.step_feeds(), copy_history=copy_history)
    dispatch.reset()
    for s in range(len(plan.recipes)):
        dispatch(s, torch.zeros(1), torch.tensor([s]), torch.zeros(1, dtype=torch.long))
        for name, entries in dispatch.history.items():  # memory: never more than the plan's history
            b, br = name.split(".")[1:3]
            assert len(entries) <= plan.history((int(b), br))
    assert dispatch.calls == plan.schedule()
    return run, dispatch


def test_the_rotation_plan_mixes_every_kind():
    plan = rotation_plan()
    kinds = {a.short()[0] if a.kind != "forecast" else a.short() for r in plan.recipes for _, _, a in r.items()}
    assert kinds == {"C", "R", "P", "D", "F1", "F2", "F3"}
    assert [plan.history(k) for k in KEYS] == [3, 2, 1, 2]
    io = {f"v{i}": plan.variant_io(r) for i, r in enumerate(plan.variants())}
    assert history_depths(io) == {"cache.0.attn": 3, "cache.0.mlp": 2, "cache.1.mlp": 2}
    assert len(plan.variants()) > 10


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", ["references", "buffers+copy"])
def test_history_slots_rotate_right_over_50_steps(seed, mode):
    plan = rotation_plan(seed=seed)
    buffers = mode == "buffers+copy"
    run, _ = drive(plan, buffers=buffers, copy_history=buffers)
    naive = naive_history(plan)
    checked = {"forecast": 0, "h": 0}
    for s, (recipe, fed) in enumerate(zip(plan.recipes, run.fed)):
        for b, br, a in recipe.items():
            key = (b, br)
            hist = plan.history_steps(s, key)
            assert hist == naive[s][key], (s, key)
            if not a.reads_cache:
                continue
            n = a.points if a.kind == "forecast" else 1
            for j in range(n):
                name = f"cache.{b}.{br}" + (f".h{j}" if j else "")
                assert float(fed[name][0]) == tag(hist[j], f"cache.{b}.{br}"), (s, name, hist)
                assert float(fed[name][0]) == tag(naive[s][key][j], f"cache.{b}.{br}")
                checked["h"] += j > 0
            assert not any(f"cache.{b}.{br}.h{j}" in fed for j in range(n, 5))
            if a.kind == "dynamic":  # the input cache follows the output cache, not the history
                assert float(fed[f"cache.{b}.{br}.in"][0]) == tag(hist[0], f"cache.{b}.{br}.in")
            checked["forecast"] += a.kind == "forecast"
        if recipe.forecasts():
            assert fed["forecast.w"].dtype == np.float32
            want = [w for k, n in recipe.forecasts() for w in plan.weights[s][k]]
            assert fed["forecast.w"].tolist() == pytest.approx(want, rel=1e-6)
        else:
            assert "forecast.w" not in fed
    assert checked["forecast"] > 30 and checked["h"] > 20


def test_references_are_passed_on_without_copies():
    plan = rotation_plan()
    run, _ = drive(plan)
    returned = {id(v) for r in run.returned for v in r.values()}
    fed = [i for f in run.fed_ids for n, i in f.items() if n.startswith("cache.")]
    assert fed and all(i in returned for i in fed)


def test_buffer_runners_need_the_history_copies():
    """A runner that overwrites its output buffers: with copy_history the history is right (above),
    its entries are copies; without, older entries would read the newest output."""
    plan = rotation_plan()
    run, dispatch = drive(plan, buffers=True, copy_history=True)
    bufs = {id(v) for v in run._bufs.values()}
    assert all(i not in bufs for f in run.fed_ids for n, i in f.items() if ".h" in n)
    bad, _ = drive(plan, buffers=True, copy_history=False)
    naive = naive_history(plan)
    wrong = [s for s, (r, fed) in enumerate(zip(plan.recipes, bad.fed))
             for (b, br), n in r.forecasts() for j in range(1, n)
             if float(fed[f"cache.{b}.{br}.h{j}"][0]) != tag(naive[s][(b, br)][j], f"cache.{b}.{br}")]
    assert wrong  # the test above would catch a dispatcher that did not copy


def test_reset_forgets_the_history_and_a_rerun_feeds_the_same():
    plan = rotation_plan(steps=20, seed=3)
    io = {f"v{i}": plan.variant_io(r) for i, r in enumerate(plan.variants())}
    run = FakeRun(io)
    dispatch = ScheduleDispatcher(plan.schedule(), io, run, step_feeds=plan.step_feeds())
    for _ in range(2):
        dispatch.reset()
        for s in range(20):
            dispatch(s, torch.zeros(1), torch.tensor([s]), torch.zeros(1, dtype=torch.long))
    first, second = run.fed[:20], run.fed[20:]
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        assert all(np.array_equal(np.asarray(a[n]), np.asarray(b[n])) for n in a)
    dispatch.reset()
    assert dispatch.history == {} and dispatch.caches == {}


def test_forecast_weights_must_be_fed():
    plan = rotation_plan(steps=12)
    io = {f"v{i}": plan.variant_io(r) for i, r in enumerate(plan.variants())}
    dispatch = ScheduleDispatcher(plan.schedule(), io, FakeRun(io))  # no step_feeds
    first = next(s for s, r in enumerate(plan.recipes) if r.forecasts())
    with pytest.raises(TcgraphError, match="reads forecast.w, which no earlier step wrote and the plan does not "
                                           "give: dispatch with ScheduleDispatcher.for_plan"):
        for s in range(first + 1):
            dispatch(s, torch.zeros(1), torch.tensor([s]), torch.zeros(1, dtype=torch.long))
    with pytest.raises(TcgraphError, match="3 step feeds for a schedule of 12 steps"):
        ScheduleDispatcher(plan.schedule(), io, FakeRun(io), step_feeds=[{}] * 3)


# ---------------------------------------------------------------- real backends


F2, F3 = forecast(2), forecast(3)
FULL = Recipe.uniform(3, C, BRANCHES)
B = Recipe(((F2, partial(range(6))), (F2, C), (R, F2)), BRANCHES)  # forecast, partial, compute and reuse in one step
D = Recipe(((F3, F3), (F3, R), (F3, F3)), BRANCHES)  # (0, mlp) forecast from history holding partial outputs
HAND = [FULL, FULL, B, FULL, B, D, B, D]  # three variants (export is the slow part); B and D recur with new weights


def hand_plan() -> Plan:
    s = SamplerSettings(num_steps=len(HAND), batch=1, cfg_scale=2.0, resolution=8)
    g = torch.Generator().manual_seed(0)
    made = lambda step, key: [p for p in range(step - 1, -1, -1) if HAND[p].action(*key).computes]  # noqa: E731
    weights = {step: {key: tuple(w + 0.05 * float(torch.randn((), generator=g))
                                 for w in taylor_weights(step, made(step, key), n - 1))
                      for key, n in r.forecasts()}
               for step, r in enumerate(HAND) if r.forecasts()}
    return Plan("hand", s, tuple(HAND), 16, weights=weights)


class HandEager:
    """The eager reference loop with the history carried by hand: per branch a list of its
    computed outputs, newest first (no dispatcher, no Plan.step_weights)."""

    def __init__(self, model, plan):
        self.model, self.plan = model, plan
        self.hist: dict[str, list[torch.Tensor]] = {}

    def reset(self):
        self.hist = {}

    def __call__(self, step, x, t, y):
        recipe = self.plan.recipes[step]
        caches, w = {}, []
        for b, br, a in recipe.items():
            name = f"cache.{b}.{br}"
            if a.reads_cache:
                for j, h in enumerate(self.hist[name]):
                    caches[name if j == 0 else f"{name}.h{j}"] = h
            if a.kind == "forecast":
                w += list(self.plan.weights[step][(b, br)])
        if w:
            caches["forecast.w"] = torch.tensor(w, dtype=torch.float32)
        out, fresh = reference_step(self.model, x, t, y, recipe, caches)
        for name, value in fresh.items():
            self.hist[name] = [value] + self.hist.get(name, [])[:3]
        return out


@pytest.fixture(scope="module")
def model():
    cfg = make_config("DiT-S/2", input_size=8, depth=3, hidden_size=32, num_heads=2, in_channels=2,
                      num_classes=5, learn_sigma=True)
    return randomize_weights(DiT(cfg), std=0.05)


@pytest.fixture(scope="module")
def artifacts(model, tmp_path_factory):
    hand = hand_plan()
    return {"hand": (hand, api.transform(model, hand, tmp_path_factory.mktemp("forecast") / "hand", check=False,
                                    progress=False))}


def check_steps(model, plan, dispatch):
    """On the eager trajectory, every step's output through `dispatch` equals the eager reference
    of that step with the hand-carried history (float32: <= 1e-5 relative to the output's size)."""
    eager, worst = HandEager(model, plan), []

    def step(i, x, t, y):
        got = dispatch(i, x, t, y)
        ref = eager(i, x, t, y)
        worst.append(((got - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item())
        return ref  # follow the eager trajectory: each step is compared on equal inputs

    b = plan.settings.batch
    dispatch.reset()
    sampler_for(plan.settings, model.config).sample(step, make_noise(b, model.config.in_channels, 8, 0),
                                                    torch.arange(b) + 1)
    assert dispatch.calls == plan.schedule()
    assert len(worst) == len(plan.recipes) and max(worst) <= 1e-5, worst
    return worst


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_backend_steps_and_samples_equal_the_hand_carried_eager_loop(model, artifacts, backend):
    """One runner per backend: each step on the eager trajectory (<= 1e-5 relative), then whole
    sampling runs (two runs of the batch, history reset between them) against the eager loop."""
    plan, path = artifacts["hand"]
    art = load_artifact(path)
    assert len(art.variants) == len(plan.variants()) == 3
    s, cfg = plan.settings, model.config
    labels = [1, 4]
    eager_step = HandEager(model, plan)
    eager = run_batches(eager_step, eager_step.reset, sampler_for(s, cfg), labels,
                        make_noise(len(labels), cfg.in_channels, s.resolution, 3), s.batch, 3)
    with api.make_runner(backend, art) as runner:
        dispatch = ScheduleDispatcher.for_plan(runner, plan)
        check_steps(model, plan, dispatch)
        got = run_batches(dispatch, dispatch.reset, sampler_for(s, cfg), labels,
                          make_noise(len(labels), cfg.in_channels, s.resolution, 3), s.batch, 3)
    assert torch.allclose(got, eager, rtol=1e-5, atol=1e-4), (got - eager).abs().max()


def test_a_taylor_plan_through_the_dispatcher_on_the_graphs(model):
    """The taylor planner's plans, their rewritten graphs run in memory (no export), step by step."""
    from tcgraph.compile import build_variants
    from tcgraph.runtime.dispatch import graph_runner

    plan = make_plan("taylor:2:2", model.config, SamplerSettings(num_steps=7, batch=1, cfg_scale=2.0, resolution=8))
    variants = build_variants(model, plan)
    assert len(variants) == 4  # full, reuse, forecast(2), forecast(3)
    assert variants[0].output_names == ["out"] + [f"cache.{l}.{b}" for l in range(3) for b in ("attn", "mlp")]
    assert variants[2].output_names == variants[3].output_names == ["out"]  # forecast steps write nothing
    io = {v.id: (v.input_names, v.output_names) for v in variants}
    check_steps(model, plan, ScheduleDispatcher(plan.schedule(), io, graph_runner({v.id: v.gm for v in variants}, io),
                                                step_feeds=plan.step_feeds()))


def test_api_samples_equal_the_eager_loop(model, artifacts):
    """`api.sample` (ORT) feeds the plan's weights: it equals the hand-carried eager loop, which
    differs from the full model and from reusing instead of forecasting."""
    plan, path = artifacts["hand"]
    labels = [1, 4]
    eager_step = HandEager(model, plan)
    s, cfg = plan.settings, model.config
    eager = run_batches(eager_step, eager_step.reset, sampler_for(s, cfg), labels,
                        make_noise(len(labels), cfg.in_channels, s.resolution, 3), s.batch, 3)
    got, got_labels = api.sample(path, classes=labels, per_class=1, seed=3, progress=False)
    assert got_labels == labels
    assert torch.allclose(got, eager, rtol=1e-5, atol=1e-4), (got - eager).abs().max()
    full = api.sample_eager(model, s, labels, seed=3)
    assert (full - eager).abs().max().item() > 1e-3
    as_reuse = Plan("r", s, tuple(Recipe(tuple(tuple(R if a.kind == "forecast" else a for a in p) for p in r.actions), BRANCHES)
                                   for r in plan.recipes), 16)
    reuse_step = HandEager(model, as_reuse)
    reused = run_batches(reuse_step, reuse_step.reset, sampler_for(s, cfg), labels,
                         make_noise(len(labels), cfg.in_channels, s.resolution, 3), s.batch, 3)
    assert (reused - eager).abs().max().item() > 1e-3  # the forecasts are not reuses


def test_serve_sampler_feeds_the_forecast_weights(model, artifacts):
    """BUG (tcgraph/serve/sampler.py): ServeSampler dispatches with `for_runner(runner, schedule)`,
    without the plan's step feeds, so a forecast artifact fails at its first forecast step
    ("reads forecast.w ... dispatch with ScheduleDispatcher.for_plan"). Fix: `for_plan(runner, plan)`."""
    from tcgraph.serve.requests import Request
    from tcgraph.serve.sampler import ServeSampler

    _, path = artifacts["hand"]
    want, _ = api.sample(path, classes=[1, 4], per_class=1, seed=3, progress=False)
    with ServeSampler(path) as server:
        got = server.samples([Request(labels=(1, 4), seed=3)])[0]
    assert torch.equal(got, want)


def test_entries_that_do_not_exist_yet_are_fed_the_oldest_with_weight_zero():
    """A forecast(3) right after the first compute: its missing entries weigh 0 (Plan.validate), the
    dispatcher feeds the oldest entry there, and the eager PlanState agrees with the fed values."""
    s = SamplerSettings(num_steps=5, cfg_scale=1.0, batch=1, resolution=8)
    f3 = Recipe(((forecast(3), C), (C, C)), BRANCHES)
    recipes = (Recipe.uniform(2, C, BRANCHES), f3, Recipe.uniform(2, C, BRANCHES), f3, f3)
    weights = {1: {(0, "attn"): (1.25, 0.0, 0.0)}, 3: {(0, "attn"): (2.0, -1.0, 0.0)},
               4: {(0, "attn"): (3.0, -3.0, 0.0)}}
    plan = Plan("p", s, recipes, 16, weights=weights)
    with pytest.raises(TcgraphError, match="weights of entries that do not exist yet must be 0"):
        Plan("p", s, recipes, 16, weights={**weights, 1: {(0, "attn"): (1.0, 0.5, 0.0)}})
    run, _ = drive(plan)
    name = "cache.0.attn"
    fed = {i: [float(run.fed[i][n][0]) for n in (name, name + ".h1", name + ".h2")] for i in (1, 3, 4)}
    t0, t2 = tag(0, name), tag(2, name)
    assert fed[1] == [t0, t0, t0]  # one entry: all three inputs see it, only the first weighs
    assert fed[3] == fed[4] == [t2, t0, t0]
    assert [float(run.fed[i]["forecast.w"][0]) for i in (1, 3, 4)] == [1.25, 2.0, 3.0]
