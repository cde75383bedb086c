"""What the passes record on a graph, and how they read it back.

Node meta (STYLE: analysis results in `node.meta["tcgraph.<key>"]`, never node attributes):
`tcgraph.block` (block index of every node inside a block, and of cache placeholders),
`tcgraph.branch` (branch name on a branch's call_module node), `tcgraph.io_name` (graph
input names on placeholders, the list of output names on the output node: `x`,
`cache.3.attn`, … as docs/design.md "Graph interface of a variant" fixes them), `tcgraph.stream`
(on what a block of several streams returns: which stream it is).

Graph meta: `gm.meta["tcgraph.adapter"]` holds the `ModelAdapter` of the captured model,
set by capture and carried by expand_blocks, so that a later pass asks the adapter (for
example where an attention branch keeps its q/k/v weight) without being given the model.
"""
from __future__ import annotations

import torch.fx as fx

from tcgraph.errors import TcgraphError
from tcgraph.models.adapter import BlockKind, ModelAdapter
from tcgraph.names import OUT, CacheKey

META_BLOCK = "tcgraph.block"  # int: block index of a node
META_BRANCH = "tcgraph.branch"  # "attn" | "mlp" on the branch's call_module node
META_IO_NAME = "tcgraph.io_name"  # graph input/output names ("x", "cache.3.attn", …)
META_STREAM = "tcgraph.stream"  # the stream ("image", "text") a block of several streams returns in this node
META_ADAPTER = "tcgraph.adapter"  # gm.meta: the captured model's ModelAdapter
META_BLOCKS = "tcgraph.block_table"  # gm.meta: (module path, kind name) of every block, in global order


def adapter_of(gm: fx.GraphModule) -> ModelAdapter:
    """The adapter capture recorded on `gm` (and expand_blocks carried over)."""
    adapter = gm.meta.get(META_ADAPTER)
    if adapter is None:
        raise TcgraphError("this graph carries no model adapter: build it with capture (then expand_blocks) first")
    return adapter


def block_of(gm: fx.GraphModule, index: int) -> tuple[str, BlockKind]:
    """(module path, block kind) of block `index`, as capture recorded them."""
    table = gm.meta.get(META_BLOCKS)
    if table is None or not 0 <= index < len(table):
        raise TcgraphError(f"this graph records no block {index}: build it with capture (then expand_blocks) first")
    path, kind = table[index]
    return path, adapter_of(gm).kind_named(kind)


def branch_nodes(gm: fx.GraphModule) -> dict[CacheKey, fx.Node]:
    """(block, branch) -> the branch's call_module node in a block-expanded graph."""
    return {
        (n.meta[META_BLOCK], n.meta[META_BRANCH]): n
        for n in gm.graph.nodes
        if n.op == "call_module" and META_BRANCH in n.meta
    }


def graph_inputs(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Graph input name (`x`, `cache.0.attn`, …) -> its placeholder."""
    return {n.meta.get(META_IO_NAME, n.target): n for n in gm.graph.nodes if n.op == "placeholder"}


def output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "output")


def io_names(gm: fx.GraphModule) -> tuple[list[str], list[str]]:
    """(input names, output names) of a rewritten variant graph."""
    inputs = [n.meta.get(META_IO_NAME, n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    outputs = output_node(gm).meta.get(META_IO_NAME, [OUT])
    return inputs, list(outputs)


def finish(gm: fx.GraphModule, *, prune: bool = True) -> fx.GraphModule:
    """End of a pass: drop dead nodes and (with `prune`) the submodules no node uses any more,
    so that a branch a variant does not compute takes no weight into the export; lint; recompile."""
    if prune:
        gm.graph.eliminate_dead_code()
        _delete_unused_submodules(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _delete_unused_submodules(gm: fx.GraphModule) -> None:
    """fx's `delete_all_unused_submodules`, except that a module a get_attr node reads whole (a branch
    module whose method the graph calls, `tcgraph.passes.emit.module_rows`) keeps its submodules, as a
    called module does."""
    used: set[str] = set()
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        parts = node.target.split(".")
        used.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        try:
            module = gm.get_submodule(node.target)
        except AttributeError:  # a parameter or buffer
            continue
        used.update(f"{node.target}.{name}" for name, _ in module.named_modules() if name)
    for name in [name for name, _ in gm.named_modules() if name and name not in used]:
        gm.delete_submodule(name)
