"""Dynamic (per-sample TopK) variants through ONNX and ONNX Runtime: the export equals the
graph, uses TopK / GatherND / ScatterND, selects per sample in ORT too, adds no
weight copy beyond a partial attention's, and a whole plan sampled with the ORT runner
equals the eager reference loop."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from tcgraph.compile import build_variants
from tcgraph.export.onnx import export_variants
from tcgraph.plan.plan import COMPUTE, REUSE, Plan, Recipe, dynamic
from tcgraph.sampling import SamplerSettings
from tcgraph.names import BRANCHES
from tests.export.token_plans import (
    check_onnx_on_fresh_inputs,
    check_plan_sampled_with_ort,
    check_qkv_stored_once,
    ort_session,
)
from tests.passes.test_token_dynamic import CHANGED, known_change_feeds

N, D, B = 16, 32, 4  # tiny model: tokens, hidden size; model batch (2 images x guidance)
FULL = Recipe.uniform(3, COMPUTE, BRANCHES)
DYN = Recipe(((dynamic(3), dynamic(5)), (REUSE, dynamic(1)), (COMPUTE, dynamic(N))), BRANCHES)


def settings(steps: int) -> SamplerSettings:
    return SamplerSettings(num_steps=steps, batch=2, cfg_scale=2.0, resolution=8)


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
    feeds, got = check_onnx_on_fresh_inputs(v, out / entry["file"])
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
    # rows move whole, by [B, k, 2] (sample, row) indices: no per-element index ops
    assert ops["ScatterND"] == 2 * n_dyn  # output cache and input cache of each
    assert ops["GatherND"] == n_dyn
    assert not {"ScatterElements", "GatherElements"} & set(ops)
    full_ops = _ops(out / entries[0]["file"])
    assert not {"TopK", "ScatterND", "GatherND"} & set(full_ops)


def test_ort_selects_the_changed_tokens_per_sample(tiny_model, tmp_path):
    """On inputs whose changed tokens are known, ONNX Runtime recomputes exactly the top-k
    changed tokens of each sample (different ones per sample)."""
    torch.set_num_threads(1)
    k = 2
    recipe, feeds, u, fresh_out = known_change_feeds(tiny_model, 1, "attn", k)
    plan = Plan("p", settings(2), (FULL, recipe), N)
    variants = build_variants(tiny_model, plan)
    v = variants[1]
    v.example_inputs = {n: feeds[n] for n in v.input_names}
    entry = export_variants([v], tmp_path)[0]
    got = dict(zip(v.output_names, ort_session(tmp_path / entry["file"]).run(
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
    a = Recipe(((dynamic(5), REUSE), (REUSE, dynamic(3)), (COMPUTE, dynamic(1))), BRANCHES)
    b = Recipe(((REUSE, dynamic(8)), (dynamic(N - 1), REUSE), (dynamic(4), REUSE)), BRANCHES)
    plan, dispatch = check_plan_sampled_with_ort(tiny_model, tmp_path, (FULL, a, b, FULL, a, b), keep_inputs=True)
    assert sorted(dispatch.caches) == sorted(plan.cache_names()) and any(n.endswith(".in") for n in dispatch.caches)


def test_dynamic_attention_stores_no_second_copy_of_qkv(tmp_path):
    """Dynamic variants add no constant indices at all."""
    check_qkv_stored_once(tmp_path, lambda n: Recipe(((dynamic(n // 4), dynamic(n // 2)), (COMPUTE, COMPUTE)), BRANCHES))
