"""Graph passes: capture a model with torch.fx, expand its blocks, rewrite one variant.

    gm = expand_blocks(capture(model).gm)
    for p in (cache_io, run_constants, reuse, forecast, token_prune, token_dynamic):   # tcgraph.compile.PIPELINE
        gm = p(gm, spec)                                      # spec: RewriteSpec of one recipe

Each rewrite pass is a plain function `(GraphModule, RewriteSpec) -> GraphModule` that
leaves a linted, recompiled graph; no pass calls another, and their shared node-emitting
helpers are `tcgraph.passes.emit`'s. `reference_step` is the eager definition they are
checked against. What a model is made of, the passes ask its model adapter.
"""
from tcgraph.passes.cache_io import cache_io
from tcgraph.passes.capture import BlockInfo, Captured, capture, trace
from tcgraph.passes.constants import run_constants
from tcgraph.passes.expand_blocks import expand_blocks
from tcgraph.passes.forecast import forecast
from tcgraph.passes.meta import branch_nodes, io_names
from tcgraph.passes.reference import reference_step
from tcgraph.passes.reuse import reuse
from tcgraph.passes.spec import RewriteSpec
from tcgraph.passes.token_dynamic import token_dynamic
from tcgraph.passes.token_prune import token_prune

__all__ = [
    "BlockInfo", "Captured", "RewriteSpec", "branch_nodes", "cache_io", "capture", "expand_blocks", "forecast", "io_names",
    "reference_step", "reuse", "run_constants", "token_dynamic", "token_prune", "trace",
]
