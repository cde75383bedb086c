"""Pass token_prune: recompute only the kept tokens of a partial branch (TokenCache).

Runs after cache_io, which gave each partial branch its input `cache.<l>.<branch>` (and,
when the plan reads it later, its output). Each partial branch's kept-token indices `idx`
(k of N, distinct, any order) are constants stored as an int64 buffer of the GraphModule
(`_tcgraph_idx_<l>_<branch>`):

    u    = modulate(norm(h), shift, scale)            # [B, N, D], the branch input, unchanged
    row-wise branch (mlp):
           rows = mlp(modulate(norm(index_select(h, 1, idx)), shift, scale))   # [B, k, D]
    attention branch (attn):
           q    = index_select(u, 1, idx) @ Wq + bq   # [B, k, D]  queries: kept tokens only
           kv   = u @ Wkv + bkv                       # [B, N, 2D] keys/values: all tokens
           rows = proj(sdpa(q, k, v))                 # [B, k, D]
    new  = cache with rows idx replaced by `rows`     # [B, N, D]
    h    = h + gate * new                             # the unchanged gated residual

A branch that writes other streams' rows too (a joint attention over text and image) recomputes
all of those and the kept image rows: `idx` holds their rows in the branch's rows
(`RewriteSpec.branch_rows`); text rows are never pruned. An attention whose adapter names a
rows method (`AttentionSpec.rows`: FLUX's joint attention, with per-stream projections, q/k
norms and RoPE) computes those rows with it (`emit.module_rows`), given the kept image rows'
indices (a second buffer, `_tcgraph_image_idx_<l>_<branch>`).

A row-wise branch gathers h before its norm and modulation, which are row-wise too, so
they run on k rows, not N (`emit.kept_input_rows`); where u has another reader (a branch-input
cache) or is not formed that way, it gathers u itself. An attention branch needs u of every
token for its keys and values. `new` takes the place of the branch node, so the fresh gate multiplies it and the cache
output (if any) is it. Which branch is an attention, and where its q/k/v weight is, the
model adapter says; the weight split is `tcgraph.passes.emit.split_in_proj` (why it is one
shared initializer plus two Slices is told there).

In ONNX: the gathers are `Gather(axis=1)` with constant indices; the scatter is
`index_put(cache, (arange(B)[:, None], idx), rows)`, one `ScatterND` with constant
[B, k, 2] indices (index_copy on dim 1 would export as three Transposes around it).
"""
from __future__ import annotations

import torch.fx as fx

from tcgraph.names import cache_name
from tcgraph.passes.emit import Emitter, attention_rows, branch_prefix, kept_input_rows, module_rows
from tcgraph.passes.meta import block_of, branch_nodes, finish, graph_inputs
from tcgraph.passes.spec import RewriteSpec


def token_prune(gm: fx.GraphModule, spec: RewriteSpec) -> fx.GraphModule:
    """Rewrite every partial branch of `spec.recipe` to recompute its kept tokens only."""
    nodes = branch_nodes(gm)
    inputs = graph_inputs(gm)
    for block, branch, action in spec.recipe.items():
        if action.kind != "partial":
            continue
        node = nodes[(block, branch)]
        path, kind = block_of(gm, block)
        emit = Emitter(gm, block, branch, node, branch_prefix(path, branch, "prune"))
        kept_rows = spec.branch_rows((block, branch), action.indices)  # other streams' rows too, if any
        idx = emit.constant_index(kept_rows)
        k = len(kept_rows)
        attention = kind.branch(branch).attention
        if attention is not None and attention.rows is not None:  # the model's own rows method, on image indices
            rows = module_rows(emit, node, emit.constant_index(list(action.indices), "image"), attention)
        elif attention is not None:
            rows = attention_rows(emit, node, emit.gather(node.args[0], idx), k, attention)
        else:  # row-wise: the branch node itself now reads the kept rows of its input
            u = node.args[0]
            kept = (kept_input_rows(emit, u, path, kind.branch(branch).norm, idx)
                    if spec.rows_of((block, branch)) is None else None)
            node.args = (kept if kept is not None else emit.gather(u, idx), *node.args[1:])
            rows = node  # [B, k, D]
        new = emit.scatter(inputs[cache_name(block, branch)], idx, rows)
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    return finish(gm)
