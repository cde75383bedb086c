"""Partial (token-pruned) variants through ONNX and ONNX Runtime: the export equals the
graph, its matrix products shrink with k exactly as `branch_flops` predicts, and a whole
plan sampled with the ORT runner equals the eager reference loop."""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch

from tcgraph.compile import build_variants
from tcgraph.export.onnx import export_variants
from tcgraph.plan import COMPUTE, REUSE, Plan, Recipe, branch_flops, partial
from tcgraph.sampling import SamplerSettings
from tcgraph.names import BRANCHES
from tests.export.token_plans import (
    check_onnx_on_fresh_inputs,
    check_plan_sampled_with_ort,
    check_qkv_stored_once,
)

N, D, B = 16, 32, 4  # tiny model: tokens, hidden size; model batch (2 images x guidance)
FULL = Recipe.uniform(3, COMPUTE, BRANCHES)
K_ATTN, K_MLP = 3, 5
PARTIAL = Recipe(((partial([2, 7, 11]), partial([0, 4, 8, 12, 15])), (REUSE, partial([6])), (COMPUTE, REUSE)), BRANCHES)


def settings(steps: int) -> SamplerSettings:
    return SamplerSettings(num_steps=steps, batch=2, cfg_scale=2.0, resolution=8)


@pytest.fixture
def exported(tiny_model, tmp_path):
    torch.set_num_threads(1)
    plan = Plan("p", settings(2), (FULL, PARTIAL), N)
    variants = build_variants(tiny_model, plan)
    entries = export_variants(variants, tmp_path)
    return variants, entries, tmp_path


def test_partial_variant_onnx_equals_graph(exported):
    variants, entries, out = exported
    v, entry = variants[1], entries[1]
    assert entry["max_abs_diff"] <= 1e-4
    assert [o["name"] for o in entry["outputs"]] == ["out", "cache.0.attn", "cache.0.mlp", "cache.1.mlp"]
    assert [o["onnx_name"] for o in entry["outputs"]][1:] == ["cache.0.attn.new", "cache.0.mlp.new", "cache.1.mlp.new"]
    feeds, got = check_onnx_on_fresh_inputs(v, out / entry["file"])
    # Rows outside idx pass through ONNX Runtime unchanged too.
    rest = [i for i in range(N) if i not in PARTIAL.actions[0][0].indices]
    assert np.array_equal(got[1][:, rest], feeds["cache.0.attn"].numpy()[:, rest])


def test_gather_and_scatter_ops(exported):
    _, entries, out = exported
    ops = Counter(n.op_type for n in onnx.load(str(out / entries[1]["file"]), load_external_data=False).graph.node)
    assert ops["ScatterND"] == 3  # one per partial branch, no Transposes around it
    assert "ScatterElements" not in ops
    full_ops = Counter(n.op_type for n in onnx.load(str(out / entries[0]["file"]), load_external_data=False).graph.node)
    assert "ScatterND" not in full_ops


def _matmul_flops(path) -> int:
    """2·M·K·N over every MatMul/Gemm of an ONNX file, from inferred static shapes."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path), load_external_data=False))
    g = model.graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in (*g.input, *g.output, *g.value_info)}
    shapes.update({i.name: list(i.dims) for i in g.initializer})
    total = 0
    for node in g.node:
        if node.op_type in ("MatMul", "Gemm"):
            a, out_shape = shapes[node.input[0]], shapes[node.output[0]]
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            inner = a[-2] if trans_a else a[-1]
            assert all(out_shape), (node.name, out_shape)
            total += 2 * int(np.prod(out_shape)) * inner
    return total


def test_matmul_work_shrinks_with_k(tiny_model, exported):
    """The ONNX graphs' matrix-product FLOPs (from their tensor shapes) differ by exactly what
    branch_flops predicts: q, scores, mix and proj on k rows, keys/values on all N, the MLP
    on k rows, reused branches nothing."""
    _, entries, out = exported
    full, part = (_matmul_flops(out / e["file"]) for e in entries)
    cfg = tiny_model.config
    saved = sum(branch_flops(cfg, br, COMPUTE) - branch_flops(cfg, br, a) for _, br, a in PARTIAL.items())
    assert full - part == B * saved
    assert part < full


def test_partial_q_and_mlp_tensors_have_k_rows(exported):
    _, entries, out = exported
    model = onnx.shape_inference.infer_shapes(onnx.load(str(out / entries[1]["file"]), load_external_data=False))
    outs = {}
    for v in model.graph.value_info:
        outs[v.name] = [d.dim_value for d in v.type.tensor_type.shape.dim]
    matmul_shapes = [outs.get(n.output[0]) for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert [B, K_ATTN, D] in matmul_shapes  # q projection of the kept tokens
    assert [B, N, 2 * D] in matmul_shapes  # keys and values of all tokens
    assert [B, K_MLP, 4 * D] in matmul_shapes and [B, 1, 4 * D] in matmul_shapes  # fc1 on k rows
    assert [B, N, 3 * D] in matmul_shapes  # block 2 computes its attention in full


def test_partial_plan_sampled_with_ort_equals_eager_reference_loop(tiny_model, tmp_path):
    """A whole plan with partial steps, transformed and sampled with the ORT runner, equals
    an eager loop of reference_step along the same schedule, caches carried step to step."""
    a = Recipe(((partial([0, 3, 6, 9, 12]), REUSE), (REUSE, partial([1, 2, 3])), (COMPUTE, partial([15]))), BRANCHES)
    b = Recipe(((REUSE, partial(range(8))), (partial(range(N - 1)), REUSE), (partial([4, 5]), REUSE)), BRANCHES)
    check_plan_sampled_with_ort(tiny_model, tmp_path, (FULL, a, b, FULL, a, b))


def test_partial_attention_stores_no_second_copy_of_qkv(tmp_path):
    """Scatter indices are the only constants a partial variant adds to weights.bin."""
    check_qkv_stored_once(tmp_path, lambda n: Recipe(((partial(range(0, n, 4)), partial(range(0, n, 2))),
                                                      (COMPUTE, COMPUTE)), BRANCHES))


def test_norm_before_a_partial_mlp_runs_on_the_kept_rows(exported):
    """A partial MLP gathers h before its LayerNorm and modulation: its norm output has k rows.
    PARTIAL prunes the MLP of block 0 (5 rows) and block 1 (1 row); block 2 reuses it."""
    _, entries, out = exported
    model = onnx.shape_inference.infer_shapes(onnx.load(str(out / entries[1]["file"]), load_external_data=False))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
    norms = [shapes.get(n.output[0]) for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert [B, K_MLP, D] in norms and [B, 1, D] in norms
    # N rows: norm1 of blocks 0 and 2 (attention needs every row for its keys and values; block 1
    # reuses its attention and forms no input) and the final layer's norm
    assert sum(s == [B, N, D] for s in norms) == 3 and len(norms) == 5, norms
