"""Pass expand_blocks: inline each block node into its ops, keeping branches as leaves.

After capture a block is one opaque call_module node. Caching needs to see inside it: the
modulation, the norm + modulate feeding each branch, the branch itself (kept as a
call_module leaf: the module classes the adapter lists for the branches) and the gated
residual update. Inlined nodes are named `<block path>_<op>` (`blocks_3_norm1`) and carry
`tcgraph.block`; the node calling a branch module (as the adapter names it) also carries
`tcgraph.branch`, the recipe's name for that branch.
"""
from __future__ import annotations

import copy
import operator

import torch.fx as fx
import torch.nn as nn

from tcgraph.errors import TcgraphError
from tcgraph.models.adapter import BlockKind, ModelAdapter
from tcgraph.passes.capture import trace
from tcgraph.passes.meta import META_BLOCK, META_BRANCH, META_STREAM, adapter_of, block_of


def expand_blocks(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace every block call_module node (marked with `tcgraph.block`) by its body."""
    adapter = adapter_of(gm)
    graph = gm.graph
    block_nodes = [n for n in graph.nodes if n.op == "call_module" and META_BLOCK in n.meta]
    for node in block_nodes:
        _inline(gm, node, adapter, block_of(gm, node.meta[META_BLOCK])[1])
    graph.lint()
    # Rebuild so the module tree holds fresh containers down to the leaves the graph calls.
    # The captured graph held each block by reference; later passes delete unused
    # submodules, which must never reach into the user's model.
    expanded = fx.GraphModule(gm, graph, gm.__class__.__name__)
    # fx gives the graph its own containers only down to the modules it calls; a called leaf
    # (a branch module) is still the user's object, and a pass that stops calling it whole
    # (token pruning calls its projections) would delete its unused children from the
    # user's model. Each called module gets its own tree of containers (weights shared).
    for node in graph.nodes:
        if node.op == "call_module":
            parent, _, name = node.target.rpartition(".")
            setattr(expanded.get_submodule(parent), name, _own_tree(expanded.get_submodule(node.target)))
    expanded.meta.update(gm.meta)
    return expanded


def _own_tree(module: nn.Module) -> nn.Module:
    """A shallow copy of `module` whose submodule containers are copies too; parameters and
    buffers are the same tensors."""
    clone = copy.copy(module)
    clone._modules = {n: (None if c is None else _own_tree(c)) for n, c in module._modules.items()}
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    return clone


def _inline(gm: fx.GraphModule, node: fx.Node, adapter: ModelAdapter, kind: BlockKind) -> None:
    prefix = node.target  # "blocks.3"
    block_index = node.meta[META_BLOCK]
    body = trace(gm.get_submodule(prefix), adapter.leaf_types()).graph
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in body.nodes if n.op == "placeholder"]
    for ph, arg in zip(placeholders, node.args):
        env[ph] = arg
    result = None
    with gm.graph.inserting_before(node):
        for n in body.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                result = fx.map_arg(n.args[0], lambda a: env[a])
                continue
            target = f"{prefix}.{n.target}" if n.op in ("call_module", "get_attr") else n.target
            new = gm.graph.create_node(
                n.op,
                target,
                fx.map_arg(n.args, lambda a: env[a]),
                fx.map_arg(n.kwargs, lambda a: env[a]),
                name=f"{prefix.replace('.', '_')}_{n.name}",
            )
            new.meta.update(n.meta)
            new.meta[META_BLOCK] = block_index
            if n.op == "call_module":
                branch = kind.branch_of(n.target)
                if branch is not None:
                    new.meta[META_BRANCH] = branch.name
            env[n] = new
    if isinstance(result, (tuple, list)):  # a block of several streams returns them: its users take items
        for stream, value in zip(kind.streams, result):
            if isinstance(value, fx.Node) and value.meta.get(META_BLOCK) == block_index:
                value.meta[META_STREAM] = stream  # (a stream the block passes on unchanged keeps its own tag)
        for user in list(node.users):
            if user.op != "call_function" or user.target is not operator.getitem or not isinstance(user.args[1], int):
                raise TcgraphError(f"block {prefix} returns {len(result)} streams but the graph uses its result "
                                   f"as {user.format_node()}; a block's streams are read by index")
            user.replace_all_uses_with(result[user.args[1]])
            gm.graph.erase_node(user)
    else:
        node.replace_all_uses_with(result)
    gm.graph.erase_node(node)
