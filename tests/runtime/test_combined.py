"""One ONNX Runtime session for all variants (runtime/ort/combined.py): the same numbers as one
session per variant for every kind of action, each weight once, clear errors."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from tcgraph import api
from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import load_artifact
from tcgraph.models.official.dit import DiT, make_config, randomize_weights
from tcgraph.plan import COMPUTE as C
from tcgraph.plan import REUSE as R
from tcgraph.plan import Plan, Recipe, dynamic, partial
from tcgraph.plan import forecast
from tcgraph.runtime.dispatch import ScheduleDispatcher
from tcgraph.runtime.ort import OrtRunner
from tcgraph.runtime.ort.combined import SELECTOR, combine_variants, output_name
from tcgraph.sampling import SamplerSettings, make_noise, run_batches, sampler_for
from tcgraph.names import BRANCHES

FULL = Recipe.uniform(2, C, BRANCHES)
P = Recipe(((C, partial(range(5))), (partial(range(3, 16)), R)), BRANCHES)  # token-pruned branches
D = Recipe(((dynamic(6), R), (C, dynamic(4))), BRANCHES)  # dynamic tokens: branch-input caches too
F = Recipe(((forecast(2), R), (R, forecast(2))), BRANCHES)  # forecast: history entries and forecast.w
STEPS = [FULL, FULL, P, D, F, FULL, D, F]


@pytest.fixture(scope="module")
def model():
    # hidden 64: the q/k/v weight (3 x 64 x 64) is above what the ONNX exporter folds itself, so the
    # Slices of its token-pruned attention reach the combined model (and must be hoisted there)
    cfg = make_config("DiT-S/2", input_size=8, depth=2, hidden_size=64, num_heads=2, in_channels=2,
                      num_classes=5, learn_sigma=True)
    return randomize_weights(DiT(cfg), std=0.05)


@pytest.fixture(scope="module")
def artifact(model, tmp_path_factory):
    s = SamplerSettings(num_steps=len(STEPS), batch=1, cfg_scale=2.0, resolution=8)
    weights = {step: {key: (0.7, 0.3) for key, _ in r.forecasts()} for step, r in enumerate(STEPS) if r.forecasts()}
    plan = Plan("mixed", s, tuple(STEPS), 16, weights=weights)
    path = api.transform(model, plan, tmp_path_factory.mktemp("combined") / "art", check=False, progress=False)
    return load_artifact(path)


def sample(art, **options):
    plan, cfg = art.plan, art.model_config
    with OrtRunner(art, intra_op_threads=1, **options) as runner:
        dispatch = ScheduleDispatcher.for_plan(runner, plan)
        steps = []

        def step(i, x, t, y):
            out = dispatch(i, x, t, y)
            steps.append(out.clone())
            return out

        samples = run_batches(step, dispatch.reset, sampler_for(plan.settings, cfg), [1, 3],
                              make_noise(2, cfg.in_channels, 8, 0), plan.settings.batch, 0)
        assert dispatch.calls == plan.schedule()[-len(dispatch.calls):]
    return samples, steps


def test_one_session_samples_equal_one_session_per_variant(artifact):
    """Every step's output and the samples: one session vs per-variant sessions (plain: pre-packed
    weights as in the one session, so the same kernels run)."""
    assert len(artifact.variants) == 4
    one, one_steps = sample(artifact)
    plain, plain_steps = sample(artifact, one_session=False, share_weights=False)
    worst = max(((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item() for a, b in zip(one_steps, plain_steps))
    assert worst <= 1e-5, worst
    assert torch.allclose(one, plain, rtol=1e-5, atol=1e-5), (one - plain).abs().max()


def test_the_combined_model_holds_each_weight_once(artifact, monkeypatch):
    combined = combine_variants(artifact)
    graph = combined.model.graph
    names = [i.name for i in graph.initializer]
    assert len(names) == len(set(names))
    external = set()
    for v in artifact.variants:
        external |= set(v.external_initializers)
    weights = [i for i in graph.initializer if not i.name.startswith("shared/")]
    assert {i.name for i in weights} == external  # every shared weight in the top graph, none in a branch
    assert all(i.data_location == onnx.TensorProto.EXTERNAL for i in weights)
    # the rest: the branches' own small constants that hoisted work reads (Slice bounds, the
    # timestep embedding's frequencies), once each
    assert all(i.data_location != onnx.TensorProto.EXTERNAL and len(i.raw_data) <= 1024
               for i in graph.initializer if i.name.startswith("shared/"))
    # inputs: the selector, then the union; x, t, y static (every variant reads them alike)
    inputs = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert list(inputs)[0] == SELECTOR and inputs[SELECTOR] == []
    assert inputs["x"] == [2, 2, 8, 8] and inputs["t"] == [2]
    union = {n for v in artifact.variants for n in v.input_names}
    assert set(inputs) == union | {SELECTOR}
    assert all(isinstance(d, str) for d in inputs["forecast.w"])  # not read by every variant: free dimensions
    assert [o.name for o in graph.output] == [output_name(n) for n in combined.outputs]
    monkeypatch.chdir(artifact.weights_path.parent)  # the checker finds weights.bin from here
    onnx.checker.check_model(combined.model)


def test_zero_feeds_are_the_inputs_a_variant_does_not_read(artifact):
    combined = combine_variants(artifact)
    for v in artifact.variants:
        zeros = combined.zero_feeds(v.id)
        assert set(zeros) == set(combined.inputs) - set(v.input_names)
        assert all(z.size == 0 and z.ndim == len(combined.inputs[n][0]) for n, z in zeros.items())


def test_outputs_a_variant_does_not_have_are_not_returned(artifact):
    vid = next(v.id for v in artifact.variants if v.output_names == ("out",))
    spec = artifact.variant(vid)
    with OrtRunner(artifact, intra_op_threads=1) as runner:
        feeds = {i.name: np.zeros(i.shape, dtype=i.dtype) for i in spec.inputs}
        got = runner.run(vid, feeds)
    assert list(got) == ["out"] and tuple(got["out"].shape()) == tuple(spec.outputs[0].shape)


def test_a_reserved_input_name_is_refused(artifact, monkeypatch):
    import dataclasses

    first = artifact.variants[0]
    renamed = dataclasses.replace(first, inputs=first.inputs + (dataclasses.replace(first.inputs[0], name=SELECTOR),))
    fake = dataclasses.replace(artifact, variants=(renamed,) + artifact.variants[1:])
    with pytest.raises(TcgraphError, match="has an input named 'tcgraph.variant', which the combined session"):
        combine_variants(fake)


def test_a_damaged_variant_file_is_one_clear_error(artifact, tmp_path):
    import shutil

    copy = tmp_path / "art"
    shutil.copytree(artifact.root, copy)
    (copy / artifact.variants[1].file).write_bytes(b"not onnx")
    damaged = load_artifact(copy, verify_hashes=False)  # the hashes would refuse it first
    with pytest.raises(TcgraphError, match=r"cannot read variant v1 .*re-run `tcgraph transform`"):
        combine_variants(damaged)


def test_work_on_weights_alone_is_in_the_top_graph_once(artifact):
    """No branch keeps a node that reads only weights and constants, and the top graph computes
    each such value once (the same op on the same inputs twice would be a copy per variant)."""
    from tcgraph.runtime.ort.combined import HOISTABLE

    combined = combine_variants(artifact)
    graph = combined.model.graph
    weights = {i.name for i in graph.initializer}
    hoisted = [n for n in graph.node if n.name.startswith("shared/")]
    assert hoisted  # the test model's variants do have such work (the exporter's shape constants at least)
    seen = set()
    for n in hoisted:
        key = (n.op_type, tuple(n.input), tuple(a.SerializeToString() for a in n.attribute))
        assert key not in seen, f"{n.op_type} on {list(n.input)} computed twice"
        seen.add(key)
    known = weights | {o for n in hoisted for o in n.output}

    def branches(g):
        for n in g.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    yield a.g
                    yield from branches(a.g)

    for branch in branches(graph):
        local = {i.name for i in branch.initializer}
        for n in branch.node:
            if n.op_type in HOISTABLE and n.input and all(i in known or i in local for i in n.input):
                assert any(i in local for i in n.input), f"{n.name} reads only weights but stayed in {branch.name}"


def test_pre_packing_once_gives_the_numbers_of_pre_packing_everything(artifact):
    """The default ("once": weights several kernels read are graph inputs, never pre-packed) against
    every kernel pre-packing and against none: every step <= 1e-5."""
    once, once_steps = sample(artifact)
    for mode in ("all", "none"):
        other, other_steps = sample(artifact, prepack=mode)
        worst = max(((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()
                    for a, b in zip(once_steps, other_steps))
        assert worst <= 1e-5, (mode, worst)
        assert torch.allclose(once, other, rtol=1e-5, atol=1e-5)


def test_work_every_variant_does_alike_runs_once_in_the_top_graph(artifact):
    """The embeddings and adaLN modulations (every variant computes them from x, t, y alike) are
    top-graph nodes, so each of their weights is read by one node; with pack_once the weights
    that more than one node reads (and only those) are graph inputs too."""
    from collections import Counter

    from tcgraph.runtime.ort.combined import _reads

    plain = combine_variants(artifact).model.graph
    reads = _reads(plain.node)
    modulation = [i.name for i in plain.initializer if "adaLN_modulation" in i.name]
    assert modulation and all(reads[name] == 1 for name in modulation), {n: reads[n] for n in modulation}
    top = {i for n in plain.node for i in n.input}
    assert set(modulation) <= top  # read in the top graph, not in a branch
    packed = combine_variants(artifact, pack_once=True).model.graph
    weights = {i.name for i in packed.initializer if not i.name.startswith("shared/")}
    extra = {i.name for i in packed.input} - {i.name for i in plain.input}
    assert extra == {w for w in weights if reads[w] > 1} and extra  # the blocks' weights, read by several variants
    assert Counter(n.op_type for n in plain.node)["Gemm"] >= 2  # modulation products hoisted
    with pytest.raises(TcgraphError, match="prepack='nonsense': choose one of once, all, none"):
        OrtRunner(artifact, prepack="nonsense")
