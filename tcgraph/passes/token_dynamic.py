"""Pass token_dynamic: dynamic token recomputation (ToCa-style), `dynamic(k)` branches.

A `dynamic(k)` branch recomputes k tokens per sample, and *which* k is decided inside the
graph from the sample itself: the tokens whose branch input changed most since their
cache row was written. Besides the pre-gate output cache `cache.<l>.<branch>` ([B, N, D])
the branch reads and writes its input cache `cache.<l>.<branch>.in` ([B, N, D]: the
modulated normed hidden state u that produced each cached row, see tcgraph.plan.plan);
cache_io added both inputs, and the outputs the plan asks for:

    u      = modulate(norm(h), shift, scale)               # [B, N, D], the branch input
    score  = sum_D (u - cache_in)²                          # [B, N]   Sub, Mul, ReduceSum
    idx    = topk(score, k, dim=1).indices                  # [B, k]   TopK (k static)
    kept   = u[b, idx]                                      # [B, k, D] GatherND (b: [B, 1] batch ids)
    row-wise (mlp): rows = mlp(kept)                        # [B, k, D]
    attention:      rows = proj(sdpa(kept @ Wq + bq, K(u), V(u)))  # queries: k rows; keys/values: all N
    new    = index_put(cache, (b, idx), rows)               # [B, N, D] ScatterND
    new_in = index_put(cache_in, (b, idx), kept)            # [B, N, D] ScatterND
    h      = h + gate * new                                 # the unchanged gated residual

A branch that writes other streams' rows too (a joint attention over text and image) scores and
chooses among its image rows only and recomputes every other row at each dynamic step. An
attention with a rows method (`AttentionSpec.rows`) computes the rows with it, given the chosen
image rows [B, k] (`emit.module_rows`).

`new` and `new_in` are the outputs `cache.<l>.<branch>` and `cache.<l>.<branch>.in` (cache_io
wrote u as the latter; it is replaced here). The attention rows and the q/k/v weight split
are `tcgraph.passes.emit`'s, shared with token_prune: no weight is added beyond what a
partial attention adds. Ties in the score are broken by TopK's implementation (torch and
ONNX Runtime may differ on exactly equal scores).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from tcgraph.models.adapter import AttentionSpec
from tcgraph.names import cache_name, input_cache_name
from tcgraph.passes.emit import Emitter, attention_rows, branch_prefix, module_rows
from tcgraph.passes.meta import META_IO_NAME, block_of, branch_nodes, finish, graph_inputs, output_node
from tcgraph.passes.spec import RewriteSpec


def token_dynamic(gm: fx.GraphModule, spec: RewriteSpec) -> fx.GraphModule:
    """Rewrite every dynamic branch of `spec.recipe` to recompute its k most changed tokens per sample."""
    nodes = branch_nodes(gm)
    inputs = graph_inputs(gm)
    for block, branch, action in spec.recipe.items():
        if action.kind != "dynamic":
            continue
        path, kind = block_of(gm, block)
        emit = Emitter(gm, block, branch, nodes[(block, branch)], branch_prefix(path, branch, "dynamic"))
        _dynamic_branch(emit, action.size, inputs[cache_name(block, branch)],
                        inputs[input_cache_name(block, branch)], kind.branch(branch).attention,
                        spec.rows_of((block, branch)))
    return finish(gm)


def _dynamic_branch(emit: Emitter, k: int, cache: fx.Node, cache_in: fx.Node,
                    attention: AttentionSpec | None, rows: tuple[int, int, int] | None) -> None:
    """Rewrite one dynamic branch (the emitter's anchor, its call_module node). `rows` is
    (first image row, image rows, all rows) of a branch that writes other streams' rows too:
    the k rows are chosen among its image rows, and every other row is recomputed as well."""
    node = emit.anchor
    u = node.args[0]
    diff = emit.fn(operator.sub, u, cache_in, name="diff")
    if rows is not None:
        diff = emit.fn(torch.narrow, diff, 1, rows[0], rows[1], name="diff_image")
    score = emit.fn(torch.sum, emit.fn(operator.mul, diff, diff, name="sq"), -1, name="score")  # [B, N]
    top = emit.fn(torch.topk, score, k, 1, name="topk")
    idx = emit.fn(operator.getitem, top, 1, name="idx")  # [B, k] per-sample token ids
    image_idx = idx  # among the image rows: what a rows method of the model takes
    if rows is not None:  # the other streams' rows first (each sample), then the chosen image rows
        start, count, total = rows
        others = emit.constant_index([r for r in range(total) if not start <= r < start + count])
        others = emit("call_method", "expand", emit("call_method", "unsqueeze", others, 0, name="others"),
                      emit.batch(u), -1, name="others")  # [B, L]
        idx = emit.fn(torch.cat, [others, emit.fn(operator.add, idx, start, name="idx")], 1, name="idx")
        k = total - count + k
    b = emit.batch_ids(u)
    kept = emit.gather_rows(u, b, idx)  # [B, k, D]
    if attention is not None and attention.rows is not None:
        rows = module_rows(emit, node, image_idx, attention)
    elif attention is not None:
        rows = attention_rows(emit, node, kept, k, attention)
    else:
        node.args = (kept, *node.args[1:])
        rows = node  # [B, k, D]
    new = emit.scatter(cache, idx, rows, b)  # [B, N, D]
    new_in = emit.scatter(cache_in, idx, kept, b, name="scatter_in")
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    # the branch's own input-cache output (another branch may read the same u: a parallel block's
    # branches share one normed input, and each writes its own `.in`)
    out = output_node(emit.gm)
    names = out.meta.get(META_IO_NAME, [])
    name = input_cache_name(emit.block, emit.branch)
    if name in names:
        values = list(out.args[0]) if len(names) > 1 else [out.args[0]]
        values[names.index(name)] = new_in
        out.args = (tuple(values),) if len(names) > 1 else (values[0],)
