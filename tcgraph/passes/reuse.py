"""Pass reuse: a reused branch reads its cache instead of computing (Learning-to-Cache).

A reused branch's call_module node is replaced by graph input `cache.<l>.<branch>` (added
by cache_io): the pre-gate branch output of an earlier step. The fresh adaLN gate of this
step still multiplies it, which is the Learning-to-Cache semantics. The ops that only fed
the branch (norm, modulate) die, and so do the branch's weights: they must not travel
into the exported graph.
"""
from __future__ import annotations

import torch.fx as fx

from tcgraph.names import cache_name
from tcgraph.passes.meta import branch_nodes, finish, graph_inputs
from tcgraph.passes.spec import RewriteSpec


def reuse(gm: fx.GraphModule, spec: RewriteSpec) -> fx.GraphModule:
    """Replace every branch `spec.recipe` reuses by its cache input."""
    nodes = branch_nodes(gm)
    inputs = graph_inputs(gm)
    for block, branch, action in spec.recipe.items():
        if action.kind == "reuse":
            node = nodes[(block, branch)]
            node.replace_all_uses_with(inputs[cache_name(block, branch)])
            gm.graph.erase_node(node)
    return finish(gm)
