"""Pass forecast: a forecast branch becomes a weighted sum of its history (docs/design.md, "Forecast actions").

Runs after cache_io, which gave each `forecast(n)` branch its history inputs, newest first:
`cache.<l>.<branch>` (H_0) and `cache.<l>.<branch>.h1` … `.h<n-1>`, and the variant its
weights input `forecast.w` (float32, the recipe's forecast branches in block order, n
weights each). The branch's call_module node is replaced by

    ŷ = w[o] · H_0 + w[o+1] · H_1 + … + w[o+n-1] · H_{n-1}        (o: the branch's offset)

and, like a reused branch, the fresh adaLN gate of this step multiplies ŷ. The ops that
only fed the branch die, and so do its weights. Weights are an input rather than graph
constants so that one variant serves every step of the same recipe structure, whatever
its weights (learned weights differ at every step). The sum is n multiplies and n − 1 adds
over [B, N, D]: element-wise work that a backend fuses.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from tcgraph.names import FORECAST_WEIGHTS, history_name
from tcgraph.passes.meta import META_BLOCK, branch_nodes, finish, graph_inputs
from tcgraph.passes.spec import RewriteSpec


def forecast(gm: fx.GraphModule, spec: RewriteSpec) -> fx.GraphModule:
    """Replace every branch `spec.recipe` forecasts by the weighted sum of its history inputs."""
    layout = spec.recipe.forecasts()
    if not layout:
        return gm
    graph = gm.graph
    nodes = branch_nodes(gm)
    inputs = graph_inputs(gm)
    weights = inputs[FORECAST_WEIGHTS]
    offset = 0
    for (block, branch), points in layout:
        node = nodes[(block, branch)]
        with graph.inserting_before(node):
            total = None
            for j in range(points):
                w = graph.call_function(operator.getitem, (weights, offset + j))
                term = graph.call_function(torch.mul, (inputs[history_name(block, branch, j)], w))
                total = term if total is None else graph.call_function(torch.add, (total, term))
                for made in (w, term, total):
                    made.meta[META_BLOCK] = block
        node.replace_all_uses_with(total)
        graph.erase_node(node)
        offset += points
    return finish(gm)
