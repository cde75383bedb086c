"""Capture: trace a model with torch.fx so that each transformer block is one call_module node.

Which module class is a block, and where the blocks are, is the model adapter's to say
(`tcgraph.models.adapter`): capture refuses a model without one. The block table records,
for every block node, what later passes need: its order, its module path, hidden size,
token count and head count. The adapter is kept on the graph (`gm.meta`, see
`tcgraph.passes.meta`) for the passes that follow.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from tcgraph.errors import TcgraphError
from tcgraph.models.adapter import ModelAdapter, adapter_for
from tcgraph.passes.meta import META_ADAPTER, META_BLOCK, META_BLOCKS, META_IO_NAME


@dataclass(frozen=True)
class BlockInfo:
    index: int
    path: str  # module path, e.g. "blocks.3"
    kind: str  # the adapter's block kind
    node: str  # fx node name in the captured graph
    hidden_size: int
    num_tokens: int
    num_heads: int


@dataclass
class Captured:
    gm: fx.GraphModule
    blocks: list[BlockInfo]
    adapter: ModelAdapter


class LeafTracer(fx.Tracer):
    """An fx tracer that keeps the given module classes as leaves and remembers where it is,
    so a trace failure can name the module that failed."""

    def __init__(self, leaf_types: tuple[type, ...]):
        super().__init__()
        self.leaf_types = leaf_types
        self.path: list[str] = []
        self.failed_in: str | None = None  # innermost module whose forward raised

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.path.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.path[-1]
            raise
        finally:
            self.path.pop()


def trace(module: torch.nn.Module, leaf_types: tuple[type, ...]) -> fx.GraphModule:
    """Symbolically trace `module` with `leaf_types` as leaves; errors name the failing module."""
    tracer = LeafTracer(leaf_types)
    try:
        graph = tracer.trace(module)
    except Exception as e:  # fx raises many types (TraceError, TypeError, RuntimeError)
        where = tracer.failed_in or "<top-level forward>"
        raise TcgraphError(
            f"torch.fx cannot trace {type(module).__name__}: failed inside module {where!r}: "
            f"{type(e).__name__}: {e}. Remove data-dependent Python control flow (if/for on tensor "
            "values, int(tensor), .item()) from that forward, or register the module as a leaf"
        ) from None
    name = type(module).__name__
    return fx.GraphModule(tracer.root, graph, name)


def capture(model: torch.nn.Module) -> Captured:
    """Trace `model` with each of its blocks (as its adapter names them) as one call_module node."""
    adapter = adapter_for(model)
    table = adapter.block_table(model)
    gm = trace(model.eval(), tuple(kind.block_type for kind in adapter.kinds))
    paths = [path for path, _ in table]
    kinds = dict(table)
    dims = adapter.dims(model)
    wanted = set(paths)
    blocks: list[BlockInfo] = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target in wanted:
            node.meta[META_BLOCK] = len(blocks)
            blocks.append(BlockInfo(len(blocks), node.target, kinds[node.target].name, node.name,
                                    dims.hidden_size, dims.num_tokens, dims.num_heads))
    if [b.path for b in blocks] != paths:
        raise TcgraphError(
            f"the traced graph calls {len(blocks)} blocks but the model has {len(paths)}; a block that is "
            "called twice, out of order or not at all cannot be cached per step"
        )
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            node.meta[META_IO_NAME] = node.target
    gm.meta[META_ADAPTER] = adapter
    gm.meta[META_BLOCKS] = tuple((path, kind.name) for path, kind in table)
    gm.graph.lint()
    gm.recompile()
    return Captured(gm, blocks, adapter)
