"""Gated steps (docs/design.md, "Gated steps"): the decision taken inside the graph.

1. The graph against the eager reference, on both paths of the decision (forced by the threshold),
   for reuse and forecast gates and both indicators (compile.check_gated, at 1e-5).
2. Whole sampling runs on ONNX Runtime and the torch runner (CPU), step by step against an eager
   loop that keeps the gate's state by hand (written without the graphs): equal outputs, and the
   same steps skipped.
3. A threshold no change reaches skips every step the gate allows: the computed count drops (read
   once, after the run) and so does the time of a step.
4. No Python branch per step: the dispatcher's step runs the same code whatever the graph decides
   (a trace of the Python lines run is the same for a computing and a skipping step).
"""
from __future__ import annotations

import copy
import dataclasses
import sys
import time

import numpy as np
import pytest
import torch

from tcgraph import api
from tcgraph.compile import _block_output, check_gated, example_inputs, rewrite_gated
from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import load_artifact
from tcgraph.models.official.dit import DiT, make_config, randomize_weights
from tcgraph.names import BRANCHES, cache_name, history_name
from tcgraph.passes import reference_step
from tcgraph.plan import COMPUTE, Plan, Recipe
from tcgraph.plan.gate import FORCE_COMPUTE, Gate, lagrange_weights
from tcgraph.runtime.dispatch import ScheduleDispatcher
from tcgraph.sampling import SamplerSettings, make_noise, run_batches, sampler_for

DEPTH, STEPS = 3, 8


@pytest.fixture(scope="module")
def model():
    cfg = make_config("DiT-S/2", input_size=8, depth=DEPTH, hidden_size=32, num_heads=2, in_channels=2,
                      num_classes=5, learn_sigma=True)
    return randomize_weights(DiT(cfg), std=0.05).eval()


def gated_plan(gate: Gate, threshold: float, steps: int = STEPS, warmup: int = 2) -> Plan:
    recipe = dataclasses.replace(Recipe.uniform(DEPTH, COMPUTE, BRANCHES), gate=gate)
    thresholds = [FORCE_COMPUTE if s < warmup or s == steps - 1 else threshold for s in range(steps)]
    return Plan("adaptive", SamplerSettings(num_steps=steps, batch=2, cfg_scale=1.0, resolution=8), (recipe,) * steps,
                16, gate_thresholds=tuple(thresholds))


@pytest.mark.parametrize("gate", [Gate(1, 2, "step", 0), Gate(1, 3, "step", 1), Gate(2, 2, "anchor", 2)])
def test_both_paths_equal_the_eager_reference(model, gate):
    plan = gated_plan(gate, 0.1, warmup=max(2, gate.points))  # a skip reads gate.points computed values
    recipe = plan.recipes[0]
    step, inputs, outputs = rewrite_gated(model, recipe)
    assert (inputs, outputs) == plan.variant_io(recipe)
    feeds = example_inputs(model, plan, inputs, seed=3, recipe=recipe)
    assert check_gated(model, step, recipe, (inputs, outputs), feeds, atol=1e-5) <= 1e-5
    # the check can fail: against a model whose final layer differs, both paths disagree
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.final_layer.linear.bias.add_(0.01)
    with pytest.raises(TcgraphError, match="disagrees"):
        check_gated(other, step, recipe, (inputs, outputs), feeds, atol=1e-5)


class HandGated:
    """The gated plan's semantics on the host, without graphs: the state kept in Python."""

    def __init__(self, model, plan: Plan):
        self.model, self.plan, self.gate = model, plan, plan.gate
        self.keys = plan.recipes[0].gated_keys()
        self.reset()

    def reset(self):
        self.hist, self.times, self.ref = {}, [], None
        self.acc, self.skips, self.computed, self.decisions, self.changes = 0.0, 0, 0, [], []

    def __call__(self, step, x, t, y):
        gate, recipe = self.gate, self.plan.recipes[step]
        h = _block_output(self.model, x, t, y, gate.first - 1)
        ref = torch.zeros_like(h) if self.ref is None else self.ref
        change = float((h - ref).detach().abs().mean() / ref.detach().abs().mean().clamp_min(1e-12))
        self.changes.append(change)
        indicator = change if gate.indicator == "anchor" else self.acc + change
        skip = indicator < self.plan.gate_thresholds[step] and self.skips < gate.max_skips
        self.decisions.append(not skip)
        if skip:
            caches = {history_name(b, br, j): self.hist[(b, br)][j] for b, br in self.keys for j in range(gate.points)}
            w = lagrange_weights(self.times, float(step))
            caches["forecast.w"] = torch.tensor(w * len(self.keys), dtype=torch.float32)
            out, _ = reference_step(self.model, x, t, y, recipe.cheap(), caches)
            self.acc, self.skips = indicator, self.skips + 1
            self.ref = ref if gate.indicator == "anchor" else h
            return out
        out, fresh = reference_step(self.model, x, t, y, recipe.computing(), {})
        for key in self.keys:
            old = self.hist.get(key, [torch.zeros_like(fresh[cache_name(*key)])] * gate.points)
            self.hist[key] = [fresh[cache_name(*key)]] + old[:gate.points - 1]
        self.times = ([float(step)] + (self.times or [0.0] * gate.points))[:gate.points]
        self.acc, self.skips, self.computed, self.ref = 0.0, 0, self.computed + 1, h
        return out


@pytest.fixture(scope="module")
def artifact(model, tmp_path_factory):
    plan = gated_plan(Gate(1, 2, "step", 1), 1.5)
    path = api.transform(model, plan, tmp_path_factory.mktemp("gated") / "a", check=False, progress=False)
    return plan, path


def runner_for(backend, art):
    return api.make_runner(backend, art, **({"one_session": False} if backend == "ort" else {}))


def trajectory(dispatch_or_eager, plan, model, threshold_plan=None):
    s = plan.settings
    return run_batches(dispatch_or_eager, dispatch_or_eager.reset, sampler_for(s, model.config), [1, 3],
                       make_noise(2, model.config.in_channels, s.resolution, 5), s.batch, 5)


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_runs_equal_the_hand_kept_state(model, artifact, backend):
    plan, path = artifact
    art = load_artifact(path)
    assert len(art.variants) == 1
    eager = HandGated(model, plan)
    want = trajectory(eager, plan, model)
    decisions = list(eager.decisions)
    assert 0 < sum(not d for d in decisions) and sum(decisions) < STEPS, (decisions, eager.changes)  # both paths
    with runner_for(backend, art) as runner:
        dispatch = ScheduleDispatcher.for_plan(runner, plan)
        got = trajectory(dispatch, plan, model)
        assert dispatch.computed_steps() == eager.computed
        dispatch.reset()
        assert dispatch.measured_fraction() == pytest.approx(eager.computed / STEPS)
    assert (got - want).abs().max().item() <= 1e-4


def test_one_if_whose_branches_read_the_weights_of_the_outer_graph(artifact):
    import onnx

    _, path = artifact
    art = load_artifact(path)
    model = onnx.load(str(art.variant_path("v0")), load_external_data=False)
    ifs = [n for n in model.graph.node if n.op_type == "If"]
    assert len(ifs) == 1
    branches = [a.g for a in ifs[0].attribute if a.type == onnx.AttributeProto.GRAPH]
    assert len(branches) == 2 and all(len(g.node) > 10 for g in branches)
    outer = {i.name for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL}
    read = {name for g in branches for n in g.node for name in n.input}
    assert len(outer & read) >= 10  # the later blocks' weights: read in the branches, stored once outside
    assert all(len(i.raw_data) <= 64 for g in branches for i in g.initializer)  # nothing large inside


def test_sample_and_inspect_report_the_fraction(model, artifact):
    """`sample` reads the count once per run and reports the measured fraction; `inspect` gives the gate
    and the compute fraction as a range."""
    plan, path = artifact
    measured = {}
    api.sample(path, classes="1,3", per_class=1, progress=False, measured=measured)
    eager = HandGated(model, plan)
    s = plan.settings
    run_batches(eager, eager.reset, sampler_for(s, model.config), [1, 3],
                make_noise(2, model.config.in_channels, s.resolution, 0), s.batch, 0)
    assert measured["steps"] == STEPS and measured["computed_steps"] == eager.computed < STEPS
    assert measured["fraction"] == pytest.approx((eager.computed + (STEPS - eager.computed) / DEPTH) / STEPS)
    text = api.format_inspect(api.inspect(path))
    gate = next(line for line in text.splitlines() if line.startswith("gate"))
    least = (4 + 4 / DEPTH) / STEPS  # 3 forced steps; of the 5 free ones 2 skips, a compute, 2 skips
    assert f"compute fraction {least:.3f} … 1.000" in gate and "forecast from 2 points" in gate


def test_a_threshold_no_change_reaches_skips_and_is_faster(model, artifact):
    plan, path = artifact
    art = load_artifact(path)
    never = dataclasses.replace(plan, gate_thresholds=tuple(FORCE_COMPUTE for _ in range(STEPS)))
    always = dataclasses.replace(plan, gate_thresholds=tuple(
        FORCE_COMPUTE if s < 2 else 1e30 for s in range(STEPS)))
    counts, times = {}, {"never": [], "always": []}
    with runner_for("ort", art) as runner:
        plans = {"never": never, "always": always}
        dispatches = {name: ScheduleDispatcher.for_plan(runner, p) for name, p in plans.items()}
        for name in plans:
            trajectory(dispatches[name], plans[name], model)  # warm
        for _ in range(5):  # interleaved, so that the machine's load falls on both alike
            for name in plans:
                start = time.perf_counter()
                trajectory(dispatches[name], plans[name], model)
                times[name].append(time.perf_counter() - start)
                counts[name] = dispatches[name].computed_steps()
    times = {name: min(t) for name, t in times.items()}
    assert counts["never"] == STEPS
    assert counts["always"] == 4  # warm-up 0, 1; then M=2 skips and a compute, twice: 4 and 7
    assert times["always"] < times["never"], times


def test_the_step_runs_the_same_python_lines_whichever_path(model, artifact):
    """The host does the same work for a computing and a skipping step: no Python branch on the decision."""
    plan, path = artifact
    art = load_artifact(path)
    with runner_for("ort", art) as runner:
        lines = {}
        for name, thr in (("compute", FORCE_COMPUTE), ("skip", 1e30)):
            p = dataclasses.replace(plan, gate_thresholds=(FORCE_COMPUTE, FORCE_COMPUTE, thr) + (0.0,) * (STEPS - 3))
            dispatch = ScheduleDispatcher.for_plan(runner, p)
            dispatch.reset()
            x = make_noise(2, model.config.in_channels, 8, 0)
            t, y = torch.tensor([900, 900]), torch.tensor([1, 2])
            dispatch(0, x, t, y)
            dispatch(1, x, t, y)
            seen = []
            sys.settrace(lambda frame, event, arg: seen.append((frame.f_code.co_filename, frame.f_lineno))
                         if "tcgraph" in frame.f_code.co_filename else None)
            try:
                dispatch(2, x, t, y)
            finally:
                sys.settrace(None)
            lines[name] = (seen, dispatch.computed_steps())
    assert lines["compute"][1] == 3 and lines["skip"][1] == 2  # the graph did decide differently
    assert lines["compute"][0] == lines["skip"][0] and lines["compute"][0]


def test_gated_plans_are_refused_where_they_cannot_work():
    gate = Gate(1, 2, "step", 1)
    with pytest.raises(TcgraphError, match="one finite threshold per step"):
        dataclasses.replace(gated_plan(gate, 0.1), gate_thresholds=(0.1,))
    with pytest.raises(TcgraphError, match="first"):
        Gate(0)
    with pytest.raises(TcgraphError, match="leaves none"):
        Recipe(Recipe.uniform(2, COMPUTE, BRANCHES).actions, BRANCHES, gate=Gate(2))
    plan = gated_plan(gate, 0.1)
    assert Plan.from_json(plan.to_json()) == plan and Plan.from_json(plan.to_json()).gate_thresholds == \
        plan.gate_thresholds
    np.testing.assert_allclose(plan.step_feeds()[3]["gate.params"], [3, 0.1, 2, 1, 1 / DEPTH], rtol=1e-6)


def test_tensorrt_builds_the_if_as_a_conditional_and_runs_it(model, artifact, monkeypatch):
    """TensorRT, written against its API and run on the stand-ins (tests/fake_tensorrt.py): the build
    refuses a TensorRT without conditional layers (one clear error) and accepts one whose parser makes
    an if-conditional of the If; the runner (stand-in engines running the torch program, CUDA graphs
    on the CPU) keeps the gate's state in its bank and equals the hand-kept loop."""
    import shutil
    import types

    from tcgraph.runtime.torch.loader import ProgramsFromArtifact
    from tcgraph.runtime.trt import build_engines
    from tests.fake_tensorrt import fake_tensorrt, install_fake_gpu
    from tests.runtime.trt.stand_ins import CpuTrtRunner, Log, install_cpu_cuda, stand_in_engines

    plan, path = artifact
    art = load_artifact(path)
    entries = [{"id": v.id, "file": v.file} for v in art.variants]
    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    install_fake_gpu(monkeypatch)
    root = path.parent / "trt-copy"
    shutil.copytree(path, root, dirs_exist_ok=True)
    with pytest.raises(TcgraphError, match="no conditional layers"):
        build_engines(root, entries)
    parse = trt.OnnxParser.parse_from_file
    trt.LayerType = types.SimpleNamespace(**vars(trt.LayerType), CONDITION="CONDITION")
    with pytest.raises(TcgraphError, match="without a conditional layer"):
        build_engines(root, entries)

    def parse_if(self, file):  # the parser makes an if-conditional of the If, as TensorRT's does
        ok = parse(self, file)
        self.network.layers.append(types.SimpleNamespace(type="CONDITION", num_outputs=0))
        return ok

    monkeypatch.setattr(trt.OnnxParser, "parse_from_file", parse_if)
    assert set(build_engines(root, entries)["engines"]) == {"v0"}

    log = Log()
    install_cpu_cuda(monkeypatch, log)
    programs = ProgramsFromArtifact(art)()
    eager = HandGated(model, plan)
    want = trajectory(eager, plan, model)
    # without CUDA graphs: the stand-in graphs replay engine executions only, not the copies of the
    # outputs a variant also reads (every history entry and state tensor here) into the bank
    with CpuTrtRunner(art, cuda_graphs=False, engines=stand_in_engines(art, programs, log)) as runner:
        dispatch = ScheduleDispatcher.for_plan(runner, plan)
        got = trajectory(dispatch, plan, model)
        assert dispatch.computed_steps() == eager.computed
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (PyTorch sees none here): the torch "
                    "CUDA runner captures the gated step as a CUDA-graph conditional node")
def test_no_device_to_host_copy_per_step_on_cuda(model, artifact):
    """Profiled sampling run on the torch CUDA runner (CUDA graphs): the decision never reaches the host,
    so device-to-host copies do not grow with the steps (the samples and the count are read at the end)."""
    plan, path = artifact
    with api.make_runner("torch", load_artifact(path), device="cuda") as runner:
        dispatch = ScheduleDispatcher.for_plan(runner, plan)
        s = plan.settings

        def run():
            return run_batches(dispatch, dispatch.reset, sampler_for(s, model.config), [1, 3],
                               make_noise(2, model.config.in_channels, s.resolution, 5), s.batch, 5, device="cuda")

        run()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            run()
        copies = [e for e in prof.events() if "memcpy" in e.name.lower() and "dtoh" in e.name.lower()]
        assert len(copies) < STEPS, [e.name for e in copies]
        assert dispatch.computed_steps() is not None
