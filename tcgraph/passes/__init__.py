from tcgraph.passes.branch_cache import branch_cache, branch_nodes, io_names
from tcgraph.passes.capture import BLOCK_TYPES, BRANCH_TYPES, BlockInfo, Captured, capture, trace
from tcgraph.passes.expand_blocks import expand_blocks
from tcgraph.passes.reference import reference_step
from tcgraph.passes.token_prune import token_prune

__all__ = [
    "branch_cache", "branch_nodes", "io_names", "BLOCK_TYPES", "BRANCH_TYPES", "BlockInfo",
    "Captured", "capture", "trace", "expand_blocks", "reference_step", "token_prune",
]
