"""Pass token_prune: recompute only the kept tokens of a partial branch (TokenCache).

`token_prune(gm, recipe, writes)` takes a block-expanded graph (from expand_blocks) and
rewrites it for any recipe. It first runs branch_cache (compute/reuse branches and the
graph interface: a partial branch reads `cache.<l>.<branch>` and, when in `writes`,
outputs the updated cache), then rewrites each partial branch, whose kept-token indices
`idx` (k of N, distinct, any order) are constants stored as an int64 buffer of the GraphModule
(`_tcgraph_idx_<l>_<branch>`):

    u    = modulate(norm(h), shift, scale)            # [B, N, D], the branch input, unchanged
    mlp:   rows = mlp(index_select(u, 1, idx))        # [B, k, D]
    attn:  q    = index_select(u, 1, idx) @ Wq + bq   # [B, k, D]  queries: kept tokens only
           kv   = u @ Wkv + bkv                       # [B, N, 2D] keys/values: all tokens
           rows = proj(sdpa(q, k, v))                 # [B, k, D]
    new  = cache with rows idx replaced by `rows`     # [B, N, D]
    h    = h + gate * new                             # the unchanged gated residual

`new` takes the place of the branch node, so the fresh gate multiplies it and the cache
output (if any) is it.

Splitting the fused `qkv` weight W ([3D, D]): the graph reads W with get_attr, transposes
it and takes column slices of W.T ([D, 3D]): Wq = W.T[:, :D], Wkv = W.T[:, D:] (biases
likewise). Nothing is added to the module, and the exported ONNX keeps W.T, the same
initializer (same content, so the same canonical name in the shared weights file) that a
variant computing the branch reads, plus two Slice ops: on disk every weight stays once.
Two consequences, measured (torch 2.13, onnxscript 0.7, onnxruntime 1.31):
- the ONNX exporter's optimizer folds a Slice whose input has at most 8192 elements
  (D <= 52, test-sized models): there the slices become their own small initializers;
- ONNX Runtime's own constant folding (session load, default optimization level) turns
  the two Slices into session-private tensors, so a session holds one extra copy of the
  qkv weight of each block whose attention it prunes (3·D² floats) even when weights are
  shared between sessions; no slicing is left at run time.
The alternative that never slices, one qkv product over all tokens and then a gather of
the query rows, keeps memory fully shared but spends (N - k)·D² more multiply-adds on
queries nobody reads (and departs from `branch_flops`).

In ONNX: the gathers are `Gather(axis=1)` with constant indices; the scatter is
`index_put(cache, (arange(B)[:, None], idx), rows)`, one `ScatterND` with constant
[B, k, 2] indices (index_copy on dim 1 would export as three Transposes around it).

Dynamic branches (`dynamic(k)`, ToCa-style: the k tokens chosen per sample in the graph)
are rewritten by `tcgraph.passes.token_dynamic`, called from here; `input_writes` names
the computed branches that also output their branch input `cache.<l>.<branch>.in`.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from tcgraph.errors import TcgraphError
from tcgraph.passes.branch_cache import branch_cache, branch_nodes
from tcgraph.passes.capture import META_BLOCK, META_BRANCH, META_IO_NAME
from tcgraph.plan.plan import Recipe
from tcgraph.names import cache_name


def token_prune(gm: fx.GraphModule, recipe: Recipe, writes: list[tuple[int, str]],
                input_writes: list[tuple[int, str]] = ()) -> fx.GraphModule:
    """Rewrite `gm` (from expand_blocks) for `recipe`, partial and dynamic branches included."""
    from tcgraph.passes.token_dynamic import add_input_caches, dynamic_branch, stand_in

    gm = branch_cache(gm, stand_in(recipe), writes, keep_partial=True)
    nodes = branch_nodes(gm)
    inputs = {n.meta.get(META_IO_NAME): n for n in gm.graph.nodes if n.op == "placeholder"}
    input_caches = add_input_caches(gm, recipe, input_writes, nodes, inputs)
    for block, branch, action in recipe.items():
        if action.kind == "dynamic":
            dynamic_branch(gm, block, branch, action.size, nodes[(block, branch)],
                           inputs[cache_name(block, branch)], input_caches[(block, branch)])
            continue
        if action.kind != "partial":
            continue
        _check_indices(action.indices, block, branch)
        node = nodes[(block, branch)]
        emit = _Emitter(gm, block, branch, node)
        idx = emit.constant_index(action.indices)
        if branch == "attn":
            rows = _prune_attn(emit, node, emit.gather(node.args[0], idx), len(action.indices))
        else:
            rows = _prune_mlp(emit, node, idx, len(action.indices))
        new = emit.scatter(inputs[cache_name(block, branch)], idx, rows)
        node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


def _check_indices(indices, block: int, branch: str) -> None:
    if not indices or min(indices) < 0:
        raise TcgraphError(
            f"block {block} {branch}: a partial action needs at least one token index, all >= 0 "
            f"(got {list(indices)[:8]}); use `reuse` to recompute no token"
        )


class _Emitter:
    """Creates nodes before one branch node, marked with its block and branch."""

    def __init__(self, gm: fx.GraphModule, block: int, branch: str, anchor: fx.Node):
        self.gm, self.block, self.branch, self.anchor = gm, block, branch, anchor
        self.prefix = f"blocks_{block}_{branch}_prune"

    def __call__(self, op: str, target, *args, name: str = "op", **kwargs) -> fx.Node:
        with self.gm.graph.inserting_before(self.anchor):
            node = self.gm.graph.create_node(op, target, args, kwargs, name=f"{self.prefix}_{name}")
        node.meta[META_BLOCK] = self.block
        node.meta[META_BRANCH] = self.branch
        return node

    def fn(self, target, *args, name: str = "op", **kwargs) -> fx.Node:
        return self("call_function", target, *args, name=name, **kwargs)

    def constant_index(self, indices) -> fx.Node:
        """The kept-token ids as an int64 buffer of the module (an ONNX initializer)."""
        attr = f"_tcgraph_idx_{self.block}_{self.branch}"
        self.gm.register_buffer(attr, torch.tensor(indices, dtype=torch.long))
        return self("get_attr", attr, name="idx")

    def batch(self, like: fx.Node) -> fx.Node:
        """The (static) batch size of `like`, as a graph value."""
        return self("call_method", "size", like, 0, name="batch")

    def gather(self, u: fx.Node, idx: fx.Node) -> fx.Node:
        return self.fn(torch.index_select, u, 1, idx, name="gather")  # [B, k, D]

    def scatter(self, cache: fx.Node, idx: fx.Node, rows: fx.Node) -> fx.Node:
        """`cache` with rows `idx` (dim 1) replaced by `rows`: one ScatterND in ONNX.

        Inserted after `rows` (for a partial MLP, `rows` is the branch node itself)."""
        self.anchor = rows.next
        device = self.fn(getattr, cache, "device", name="device")
        b = self.fn(torch.arange, self.batch(cache), device=device, name="batch_ids")
        b = self("call_method", "unsqueeze", b, 1, name="batch_ids")  # [B, 1], broadcasts with idx [k]
        return self.fn(torch.index_put, cache, (b, idx), rows, name="scatter")  # [B, N, D]


def _prune_mlp(emit: _Emitter, node: fx.Node, idx: fx.Node, k: int) -> fx.Node:
    """The MLP on the kept tokens only: the branch node now reads the gathered rows."""
    node.args = (emit.gather(node.args[0], idx), *node.args[1:])
    return node  # [B, k, D]


def _prune_attn(emit: _Emitter, node: fx.Node, kept: fx.Node, k: int) -> fx.Node:
    """Attention with queries from the kept rows `kept` ([B, k, D], gathered from the branch
    input u) and keys/values from all tokens of u."""
    attn = emit.gm.get_submodule(node.target)
    d, heads, head_dim = attn.proj.in_features, attn.num_heads, attn.head_dim
    (u,) = node.args
    batch = emit.batch(u)
    wq, bq, wkv, bkv = _split_qkv(emit, node.target, d)
    q = emit.fn(operator.add, emit.fn(torch.matmul, kept, wq, name="q"), bq, name="q")
    kv = emit.fn(operator.add, emit.fn(torch.matmul, u, wkv, name="kv"), bkv, name="kv")  # [B, N, 2D]
    q = emit("call_method", "reshape", q, batch, k, heads, head_dim, name="q")
    q = emit("call_method", "transpose", q, 1, 2, name="q")  # [B, h, k, d]
    kv = emit("call_method", "reshape", kv, batch, -1, 2, heads, head_dim, name="kv")
    kv = emit("call_method", "permute", kv, 2, 0, 3, 1, 4, name="kv")  # [2, B, h, N, d]
    key, value = (emit.fn(operator.getitem, kv, i, name=n) for i, n in ((0, "k"), (1, "v")))
    out = emit.fn(F.scaled_dot_product_attention, q, key, value, name="sdpa")  # [B, h, k, d]
    out = emit("call_method", "transpose", out, 1, 2, name="mix")
    out = emit("call_method", "reshape", out, batch, k, d, name="mix")  # [B, k, D]
    return emit("call_module", f"{node.target}.proj", out, name="proj")  # [B, k, D]


def _split_qkv(emit: _Emitter, target: str, d: int) -> tuple[fx.Node, ...]:
    """Wq [D, D], bq [D], Wkv [D, 2D], bkv [2D]: column slices of qkv.weight.T and of the bias."""
    weight = emit("get_attr", f"{target}.qkv.weight", name="qkv_weight")
    bias = emit("get_attr", f"{target}.qkv.bias", name="qkv_bias")
    wt = emit.fn(torch.t, weight, name="qkv_weight_t")  # [D, 3D]
    return (
        emit.fn(torch.narrow, wt, 1, 0, d, name="wq"),
        emit.fn(torch.narrow, bias, 0, 0, d, name="bq"),
        emit.fn(torch.narrow, wt, 1, d, 2 * d, name="wkv"),
        emit.fn(torch.narrow, bias, 0, d, 2 * d, name="bkv"),
    )
