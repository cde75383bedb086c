"""Dynamic token recomputation (ToCa-style), part of the token_prune pass.

A `dynamic(k)` branch recomputes k tokens per sample, and *which* k is decided inside the
graph from the sample itself: the tokens whose branch input changed most since their
cache row was written. Besides the pre-gate output cache `cache.<l>.<branch>` ([B, N, D])
the branch reads and writes its input cache `cache.<l>.<branch>.in` ([B, N, D]: the
modulated normed hidden state u that produced each cached row, see tcgraph.plan.plan):

    u      = modulate(norm(h), shift, scale)               # [B, N, D], the branch input
    score  = sum_D (u - cache_in)²                          # [B, N]   Sub, Mul, ReduceSum
    idx    = topk(score, k, dim=1).indices                  # [B, k]   TopK (k static)
    idx_e  = idx[..., None].expand(B, k, D)                 # [B, k, D]
    kept   = gather(u, 1, idx_e)                            # [B, k, D] GatherElements
    mlp:     rows = mlp(kept)                               # [B, k, D]
    attn:    rows = proj(sdpa(kept @ Wq + bq, K(u), V(u)))   # queries: k rows; keys/values: all N
    new    = scatter(cache, 1, idx_e, rows)                 # [B, N, D] ScatterElements
    new_in = scatter(cache_in, 1, idx_e, kept)              # [B, N, D] ScatterElements
    h      = h + gate * new                                 # the unchanged gated residual

`new` and `new_in` are the outputs `cache.<l>.<branch>` and `cache.<l>.<branch>.in`. A
computed branch in `input_writes` outputs its u as `cache.<l>.<branch>.in`. The attention
rewrite and the qkv weight split are token_prune's (`_prune_attn`, `_split_qkv`): no weight
is added beyond what a partial attention adds. Ties in the score are broken by TopK's
implementation (torch and ONNX Runtime may differ on exactly equal scores).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from tcgraph.errors import TcgraphError
from tcgraph.passes.capture import META_BLOCK, META_IO_NAME
from tcgraph.passes.token_prune import _Emitter, _prune_attn
from tcgraph.plan.plan import Action, Recipe
from tcgraph.names import cache_name, input_cache_name


def stand_in(recipe: Recipe) -> Recipe:
    """`recipe` with each dynamic action replaced by a partial one of the same k, for
    branch_cache: it gives the branch its cache input and output and keeps its node."""
    pairs = []
    for block, pair in enumerate(recipe.actions):
        new = []
        for branch, action in zip(("attn", "mlp"), pair):
            if action.kind == "dynamic":
                if action.size < 1:
                    raise TcgraphError(
                        f"block {block} {branch}: a dynamic action needs k >= 1 (got {action.size}); "
                        "use `reuse` to recompute no token"
                    )
                action = Action("partial", tuple(range(action.size)))
            new.append(action)
        pairs.append(tuple(new))
    return Recipe(tuple(pairs))


def add_input_caches(gm: fx.GraphModule, recipe: Recipe, input_writes, nodes: dict,
                     inputs: dict[str, fx.Node]) -> dict[tuple[int, str], fx.Node]:
    """Placeholders `cache.<l>.<branch>.in` for the dynamic branches (each right after its
    `cache.<l>.<branch>`), and outputs `cache.<l>.<branch>.in` for `input_writes` (each right
    after its `cache.<l>.<branch>` output; the branch input u for now, which dynamic_branch
    replaces by the updated cache). Returns (block, branch) -> input-cache placeholder."""
    graph = gm.graph
    placeholders: dict[tuple[int, str], fx.Node] = {}
    for block, branch in recipe.input_reads():
        name = input_cache_name(block, branch)
        with graph.inserting_after(inputs[cache_name(block, branch)]):
            ph = graph.placeholder(name.replace(".", "_"))
        ph.meta[META_IO_NAME] = name
        ph.meta[META_BLOCK] = block
        inputs[name] = ph
        placeholders[(block, branch)] = ph
    input_writes = set(input_writes)
    if not input_writes:
        return placeholders
    out_node = next(n for n in graph.nodes if n.op == "output")
    names = list(out_node.meta.get(META_IO_NAME, ["out"]))
    values = out_node.args[0] if isinstance(out_node.args[0], tuple) else (out_node.args[0],)
    new_names, new_values = [], []
    for name, value in zip(names, values):
        new_names.append(name)
        new_values.append(value)
        key = next(((b, br) for b, br in input_writes if cache_name(b, br) == name), None)
        if key is not None:
            new_names.append(input_cache_name(*key))
            new_values.append(nodes[key].args[0])  # u, the branch input
            input_writes.discard(key)
    if input_writes:
        raise TcgraphError(
            f"cannot write {[input_cache_name(*k) for k in sorted(input_writes)]}: an input cache is written "
            "beside its branch's output cache, which this recipe does not compute or write"
        )
    out_node.args = (tuple(new_values),)
    out_node.meta[META_IO_NAME] = new_names
    return placeholders


def dynamic_branch(gm: fx.GraphModule, block: int, branch: str, k: int, node: fx.Node,
                   cache: fx.Node, cache_in: fx.Node) -> None:
    """Rewrite one dynamic branch (its call_module `node`, already given its cache inputs)."""
    emit = _Emitter(gm, block, branch, node)
    emit.prefix = f"blocks_{block}_{branch}_dynamic"
    u = node.args[0]
    diff = emit.fn(operator.sub, u, cache_in, name="diff")
    score = emit.fn(torch.sum, emit.fn(operator.mul, diff, diff, name="sq"), -1, name="score")  # [B, N]
    top = emit.fn(torch.topk, score, k, 1, name="topk")
    idx = emit.fn(operator.getitem, top, 1, name="idx")  # [B, k] per-sample token ids
    width = emit("call_method", "size", u, -1, name="width")
    idx = emit("call_method", "unsqueeze", idx, -1, name="idx")
    idx = emit("call_method", "expand", idx, -1, -1, width, name="idx")  # [B, k, D]
    kept = emit.fn(torch.gather, u, 1, idx, name="gather")  # [B, k, D]
    if branch == "attn":
        rows = _prune_attn(emit, node, kept, k)
    else:
        node.args = (kept, *node.args[1:])
        rows = node  # [B, k, D]
    emit.anchor = rows.next
    new = emit.fn(torch.scatter, cache, 1, idx, rows, name="scatter")  # [B, N, D]
    new_in = emit.fn(torch.scatter, cache_in, 1, idx, kept, name="scatter_in")  # [B, N, D]
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    if u in out_node.all_input_nodes:
        out_node.replace_input_with(u, new_in)
