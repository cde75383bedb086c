"""Pass cache_io: give a block-expanded graph the graph interface of one variant.

docs/design.md ("Graph interface of a variant"): inputs `x, t, y`, then one placeholder per
cache the recipe reads, `cache.<l>.<branch>` (reused, partial, dynamic and forecast
branches; a forecast(n) branch's older history `cache.<l>.<branch>.h1` … `.h<n-1>` and a
dynamic branch's input cache `cache.<l>.<branch>.in` right after it), in block order, then
the run constants the recipe reads (`cache.<l>.cross.k`, `.v`: `Recipe.constant_reads`), then
`forecast.w` where the recipe forecasts;
outputs `out`, then one per cache in `spec.writes` (the branch node's value: the pre-gate
branch output), each followed by `cache.<l>.<branch>.in` where `spec.input_writes` names
it (the branch input u), then the run constants in `spec.constant_writes` (the branch
node's arguments after u that the adapter's `prepare` made: the text's keys and values).

This pass only adds inputs and outputs: the new placeholders have no users yet. The passes
after it connect them: `reuse` (a reused branch reads its cache), `forecast` (a weighted
sum of the history), `run_constants` (a branch reads its keys and values), `token_prune` and
`token_dynamic` (the cache rows a partial or dynamic branch does not recompute; a dynamic
branch also replaces the u it outputs by its updated input cache).
"""
from __future__ import annotations

import torch.fx as fx

from tcgraph.errors import TcgraphError
from tcgraph.names import (FORECAST_WEIGHTS, OUT, RUN_CONSTANTS, cache_name, constant_name, history_name,
                           input_cache_name)
from tcgraph.passes.meta import META_BLOCK, META_IO_NAME, branch_nodes, finish, output_node
from tcgraph.passes.spec import RewriteSpec


def cache_io(gm: fx.GraphModule, spec: RewriteSpec) -> fx.GraphModule:
    """Add the cache inputs and outputs of `spec` to `gm` (from expand_blocks)."""
    recipe = spec.recipe
    graph = gm.graph
    nodes = branch_nodes(gm)
    want = {(block, branch) for block, branch, _ in recipe.items()}
    if set(nodes) != want:
        blocks = len({block for block, _ in nodes})
        raise TcgraphError(
            f"recipe has {recipe.depth} blocks of {len(want)} branches in all but the graph has {blocks} expanded "
            f"blocks of {len(nodes)}; run expand_blocks on a capture of the same model"
        )
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for ph in placeholders:
        ph.meta.setdefault(META_IO_NAME, ph.target)
    last = placeholders[-1]
    dynamic = set(recipe.input_reads())
    points = dict(recipe.forecasts())
    for block, branch in recipe.reads():
        names = [history_name(block, branch, j) for j in range(points.get((block, branch), 1))]
        names += [input_cache_name(block, branch)] if (block, branch) in dynamic else []
        for name in names:
            with graph.inserting_after(last):
                last = graph.placeholder(name.replace(".", "_"))
            last.meta[META_IO_NAME] = name
            last.meta[META_BLOCK] = block
    for block, branch in recipe.constant_reads():
        for name in (constant_name(block, branch, what) for what in RUN_CONSTANTS[branch]):
            with graph.inserting_after(last):
                last = graph.placeholder(name.replace(".", "_"))
            last.meta[META_IO_NAME] = name
            last.meta[META_BLOCK] = block
    if points:
        with graph.inserting_after(last):
            last = graph.placeholder(FORECAST_WEIGHTS.replace(".", "_"))
        last.meta[META_IO_NAME] = FORECAST_WEIGHTS

    out = output_node(gm)
    values, names = [out.args[0]], [OUT]
    inputs_written = set(spec.input_writes)
    for key in spec.writes:
        values.append(nodes[key])
        names.append(cache_name(*key))
        if key in inputs_written:
            values.append(nodes[key].args[0])  # u, the branch input
            names.append(input_cache_name(*key))
    for block, branch in spec.constant_writes:
        whats = RUN_CONSTANTS[branch]
        values.extend(nodes[(block, branch)].args[1:1 + len(whats)])  # the arguments after u
        names.extend(constant_name(block, branch, what) for what in whats)
    out.args = (tuple(values),) if len(values) > 1 else (values[0],)
    out.meta[META_IO_NAME] = names
    return finish(gm, prune=False)
