"""Dynamic (per-sample TopK) variants through ONNX and ONNX Runtime: the export equals the
graph, uses TopK / GatherElements / ScatterElements, selects per sample in ORT too, adds no
weight copy beyond a partial attention's, and a whole plan sampled with the ORT runner
equals the eager reference loop."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tcgraph import api
from tcgraph.compile import build_variants
from tcgraph.export.artifact import load_artifact
from tcgraph.export.onnx import WEIGHTS_PATH, export_variants
from tcgraph.passes import reference_step
from tcgraph.plan.plan import COMPUTE, REUSE, Plan, Recipe, SamplerSettings, dynamic
from tcgraph.runtime.dispatch import ScheduleDispatcher
from tests.export.tiny_variants import param_bytes, tiny_dit
from tests.passes.test_token_dynamic import CHANGED, _known_change_feeds

N, D, B = 16, 32, 4  # tiny model: tokens, hidden size; model batch (2 images x guidance)
FULL = Recipe.uniform(3, COMPUTE)
DYN = Recipe(((dynamic(3), dynamic(5)), (REUSE, dynamic(1)), (COMPUTE, dynamic(N))))


def settings(steps: int) -> SamplerSettings:
    return SamplerSettings(num_steps=steps, batch=2, cfg_scale=2.0, resolution=8)


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ops(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.fixture
def exported(tiny_model, tmp_path):
    torch.set_num_threads(1)
    plan = Plan("p", settings(2), (FULL, DYN), N)
    variants = build_variants(tiny_model, plan)
    entries = export_variants(variants, tmp_path)
    return plan, variants, entries, tmp_path


def test_dynamic_variant_onnx_equals_graph(exported):
    plan, variants, entries, out = exported
    v, entry = variants[1], entries[1]
    assert entry["max_abs_diff"] <= 1e-4
    names = ["out", "cache.0.attn", "cache.0.attn.in", "cache.0.mlp", "cache.0.mlp.in", "cache.1.mlp",
             "cache.1.mlp.in", "cache.2.mlp", "cache.2.mlp.in"]
    assert [o["name"] for o in entry["outputs"]] == names == plan.variant_io(DYN)[1]
    assert [o["onnx_name"] for o in entry["outputs"]][1:] == [n + ".new" for n in names[1:]]
    assert [o["name"] for o in entries[0]["outputs"]] == plan.variant_io(FULL)[1]
    # Fresh inputs (not the ones export verified with).
    g = torch.Generator().manual_seed(7)
    feeds = {n: (torch.randn(t.shape, generator=g) if t.is_floating_point() else t) for n, t in v.example_inputs.items()}
    with torch.no_grad():
        ref = v.gm(*feeds.values())
    got = _session(out / entry["file"]).run(None, {n: t.numpy() for n, t in feeds.items()})
    diffs = [float(np.abs(r.numpy() - a).max()) for r, a in zip(ref, got)]
    assert max(diffs) <= 1e-4, diffs
    # Per sample, exactly k rows of both caches change, the same rows, the rest bit for bit.
    for i, (name, k) in enumerate(((n, a.size) for n, a in
                                   zip(("cache.0.attn", "cache.0.mlp"), DYN.actions[0]))):
        pos = names.index(name)
        changed = (got[pos] != feeds[name].numpy()).any(-1)
        changed_in = (got[pos + 1] != feeds[name + ".in"].numpy()).any(-1)
        assert changed.sum(1).tolist() == [k] * B and np.array_equal(changed, changed_in)
        assert np.array_equal(got[pos][~changed], feeds[name].numpy()[~changed])


def test_topk_gather_scatter_ops(exported):
    _, _, entries, out = exported
    ops = _ops(out / entries[1]["file"])
    n_dyn = sum(a.kind == "dynamic" for _, _, a in DYN.items())
    assert n_dyn == 4 and ops["TopK"] == n_dyn  # one per dynamic branch
    assert ops["ScatterElements"] == 2 * n_dyn  # output cache and input cache of each
    assert ops["GatherElements"] == n_dyn
    assert "ScatterND" not in ops
    full_ops = _ops(out / entries[0]["file"])
    assert not {"TopK", "ScatterElements", "GatherElements"} & set(full_ops)


def test_ort_selects_the_changed_tokens_per_sample(tiny_model, tmp_path):
    """On inputs whose changed tokens are known, ONNX Runtime recomputes exactly the top-k
    changed tokens of each sample (different ones per sample)."""
    torch.set_num_threads(1)
    k = 2
    recipe, feeds, u, fresh_out = _known_change_feeds(tiny_model, 1, "attn", k)
    plan = Plan("p", settings(2), (FULL, recipe), N)
    variants = build_variants(tiny_model, plan)
    v = variants[1]
    v.example_inputs = {n: feeds[n] for n in v.input_names}
    entry = export_variants([v], tmp_path)[0]
    got = dict(zip(v.output_names, _session(tmp_path / entry["file"]).run(
        None, {n: feeds[n].numpy() for n in v.input_names})))
    expected = np.zeros((B, N), dtype=bool)
    for b, tokens in enumerate(CHANGED):
        expected[b, tokens[-k:]] = True
    for name, fresh in (("cache.1.attn", fresh_out), ("cache.1.attn.in", u)):
        old = feeds[name].numpy()
        assert np.array_equal((got[name] != old).any(-1), expected), name
        assert np.array_equal(got[name][~expected], old[~expected])
        assert np.abs(got[name][expected] - fresh.numpy()[expected]).max() <= 1e-4
    assert len({tuple(np.flatnonzero(row)) for row in expected}) == B


def test_dynamic_plan_sampled_with_ort_equals_eager_reference_loop(tiny_model, tmp_path):
    """A whole plan (full, dynamic steps, full, dynamic …), transformed and sampled with the
    ORT runner, equals an eager loop of reference_step, caches and input caches carried."""
    torch.set_num_threads(1)
    a = Recipe(((dynamic(5), REUSE), (REUSE, dynamic(3)), (COMPUTE, dynamic(1))))
    b = Recipe(((REUSE, dynamic(8)), (dynamic(N - 1), REUSE), (dynamic(4), REUSE)))
    s = settings(6)
    plan = Plan("dyn", s, (FULL, a, b, FULL, a, b), N)
    path = api.transform(tiny_model, plan, tmp_path / "art", progress=False)
    labels = [1, 4, 0]  # two runs of 2: the second padded
    got, got_labels = api.sample(path, classes=labels, per_class=1, seed=3, progress=False)
    assert got_labels == labels

    caches: dict = {}

    def eager_step(step, x, t, y):
        out, fresh = reference_step(tiny_model, x, t, y, plan.recipes[step], caches, keep_inputs=True)
        caches.update(fresh)
        return out

    cfg = tiny_model.config
    eager = api.run_batches(eager_step, caches.clear, api.sampler_for(s, cfg), labels,
                            api.noise_for(len(labels), cfg, s.resolution, 3), s.batch, 3)
    assert got.shape == eager.shape == (3, 2, 8, 8)
    diff = (got - eager).abs().max().item()
    assert torch.allclose(got, eager, rtol=1e-5, atol=1e-4), diff  # as in test_token_prune_export
    full = api.sample_eager(tiny_model, s, labels, seed=3)
    assert (full - eager).abs().max().item() > 1e-3  # a different computation from the full model

    worst = []
    caches.clear()
    with api.make_runner("ort", load_artifact(path)) as runner:
        dispatch = ScheduleDispatcher.for_runner(runner, plan.schedule())

        def step(i, x, t, y):
            got = dispatch(i, x, t, y)
            ref = eager_step(i, x, t, y)
            worst.append((got - ref).abs().max().item())
            worst.extend((runner.to_torch(v) - caches[n]).abs().max().item() for n, v in dispatch.caches.items())
            return ref

        api.sampler_for(s, cfg).sample(step, api.noise_for(2, cfg, 8, 0), torch.tensor([2, 3]))
    assert dispatch.calls == plan.schedule()
    assert sorted(dispatch.caches) == sorted(plan.cache_names()) and any(n.endswith(".in") for n in dispatch.caches)
    assert max(worst) <= 1e-4, max(worst)


def test_dynamic_attention_stores_no_second_copy_of_qkv(tmp_path):
    """At D=128 the dynamic variant reads the shared `qkv.weight.T` like the full variant;
    weights.bin holds each weight once (dynamic adds no constant indices at all)."""
    torch.set_num_threads(1)
    model = tiny_dit()
    n = model.config.num_tokens
    recipe = Recipe(((dynamic(n // 4), dynamic(n // 2)), (COMPUTE, COMPUTE)))
    plan = Plan("p", SamplerSettings(num_steps=2, batch=1, cfg_scale=1.0, resolution=16),
                (Recipe.uniform(2, COMPUTE), recipe), n)
    entries = export_variants(build_variants(model, plan), tmp_path)
    assert entries[1]["max_abs_diff"] <= 1e-4
    assert "blocks.0.attn.qkv.weight.T" in entries[1]["external_initializers"]
    assert _ops(tmp_path / entries[1]["file"])["Slice"] == 2  # Wq, Wkv: column slices of the shared W.T
    size = (tmp_path / WEIGHTS_PATH).stat().st_size
    assert size <= param_bytes(model) + 4096, (size, param_bytes(model))
