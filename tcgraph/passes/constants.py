"""Pass run_constants: a branch reads its run constants instead of computing them.

Runs after cache_io, which gave a recipe that reads run constants (a plan's later steps:
`Recipe.constant_reads`) the inputs `cache.<l>.cross.k` and `cache.<l>.cross.v`. In the
block-expanded graph a cross branch's node is `attn2(u, k, v, bias)`, its keys and values
made in the block body by the branch module's `prepare` (the projections of the text).
Here those arguments become the inputs; the projections, and the caption projection they
read, die with `finish` and take their weights out of the variant. The first step of the
plan computes them and outputs them (cache_io), so a sampling run projects the text once.
"""
from __future__ import annotations

import torch.fx as fx

from tcgraph.names import RUN_CONSTANTS, constant_name
from tcgraph.passes.meta import branch_nodes, finish, graph_inputs
from tcgraph.passes.spec import RewriteSpec


def run_constants(gm: fx.GraphModule, spec: RewriteSpec) -> fx.GraphModule:
    """Make every branch in `spec.recipe.constant_reads()` take its run constants from the graph inputs."""
    keys = spec.recipe.constant_reads()
    if not keys:
        return gm
    nodes = branch_nodes(gm)
    inputs = graph_inputs(gm)
    for block, branch in keys:
        node = nodes[(block, branch)]
        read = [inputs[constant_name(block, branch, what)] for what in RUN_CONSTANTS[branch]]
        node.args = (node.args[0], *read, *node.args[1 + len(read):])
    return finish(gm)
