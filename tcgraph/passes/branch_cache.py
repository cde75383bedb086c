"""Pass branch_cache: rewrite a block-expanded graph into the static graph of one recipe.

- A reused branch becomes a read of graph input `cache.<l>.<branch>` (the pre-gate branch
  output of an earlier step); the fresh adaLN gate still multiplies it, which is the
  Learning-to-Cache semantics. Ops that only fed the branch (norm, modulate) die.
- A computed branch whose cache the plan reads becomes an extra graph output.
- Graph inputs are `x, t, y, cache…`; outputs `out, cache…` (DESIGN.md, graph interface).

Partial actions (token pruning) belong to the token_prune pass: they are refused here
unless `keep_partial=True` (what token_prune passes), which gives a partial branch its cache
input and output like any other read and write but leaves the branch node for token_prune
to rewrite.
"""
from __future__ import annotations

import torch.fx as fx

from tcgraph.errors import TcgraphError
from tcgraph.passes.capture import META_BLOCK, META_BRANCH, META_IO_NAME
from tcgraph.plan.plan import Recipe
from tcgraph.names import BRANCHES, cache_name


def branch_nodes(gm: fx.GraphModule) -> dict[tuple[int, str], fx.Node]:
    """(block, branch) -> the branch's call_module node in a block-expanded graph."""
    found = {
        (n.meta[META_BLOCK], n.meta[META_BRANCH]): n
        for n in gm.graph.nodes
        if n.op == "call_module" and META_BRANCH in n.meta
    }
    return found


def branch_cache(gm: fx.GraphModule, recipe: Recipe, writes: list[tuple[int, str]], *,
                 keep_partial: bool = False) -> fx.GraphModule:
    """Rewrite `gm` (from expand_blocks) for `recipe`, outputting the caches in `writes`.

    With `keep_partial`, a partial branch keeps its call_module node (still computing all
    tokens) and gains its `cache.<l>.<branch>` input: only valid as token_prune's first stage.
    """
    graph = gm.graph
    nodes = branch_nodes(gm)
    if len(nodes) != 2 * recipe.depth:
        raise TcgraphError(
            f"recipe has {recipe.depth} blocks but the graph has {len(nodes) // 2} expanded blocks; "
            "run expand_blocks on a capture of the same model"
        )
    for block, branch, action in recipe.items():
        if action.kind == "partial" and not keep_partial:
            raise TcgraphError(
                f"block {block} {branch}: partial recomputation needs the token_prune pass; "
                "branch_cache only rewrites compute/reuse"
            )
    for block, branch in writes:
        if not recipe.action(block, branch).computes:
            raise TcgraphError(f"cannot write {cache_name(block, branch)}: the recipe does not compute it")

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for ph in placeholders:
        ph.meta.setdefault(META_IO_NAME, ph.target)
    last_input = placeholders[-1]
    out_node = next(n for n in graph.nodes if n.op == "output")
    model_out = out_node.args[0]

    # Cache reads: new placeholders after the existing ones, in block/branch order.
    for block, branch in recipe.reads():
        name = cache_name(block, branch)
        with graph.inserting_after(last_input):
            ph = graph.placeholder(name.replace(".", "_"))
        ph.meta[META_IO_NAME] = name
        ph.meta[META_BLOCK] = block
        last_input = ph
        if recipe.action(block, branch).kind == "partial":
            continue  # token_prune reads this input and rewrites the branch node
        node = nodes[(block, branch)]
        node.replace_all_uses_with(ph)
        graph.erase_node(node)

    order = {k: i for i, k in enumerate((b, br) for b in range(recipe.depth) for br in BRANCHES)}
    cache_outs = [nodes[k] for k in sorted(writes, key=order.__getitem__)]
    out_node.args = ((model_out, *cache_outs),) if cache_outs else (model_out,)
    out_node.meta[META_IO_NAME] = ["out"] + [cache_name(*k) for k in sorted(writes, key=order.__getitem__)]

    graph.eliminate_dead_code()
    # A reused branch's weights must not travel into the exported graph.
    gm.delete_all_unused_submodules()
    graph.lint()
    gm.recompile()
    return gm


def io_names(gm: fx.GraphModule) -> tuple[list[str], list[str]]:
    """(input names, output names) of a rewritten variant graph."""
    inputs = [n.meta.get(META_IO_NAME, n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = out_node.meta.get(META_IO_NAME, ["out"])
    return inputs, list(outputs)
