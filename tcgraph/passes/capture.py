"""Capture: trace a DiT with torch.fx so that each transformer block is one call_module node.

The block table records, for every block node, what later passes need: its order, its
module path, hidden size, token count and head count. Which module classes are blocks
and which are their branches is a registry (`BLOCK_TYPES`), not an isinstance chain in
the passes, so another DiT family only registers its classes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from tcgraph.errors import TcgraphError
from tcgraph.models.dit import Attention, DiT, DiTBlock, Mlp

# block class -> {branch module attribute: branch name}
BLOCK_TYPES: dict[type, dict[str, str]] = {DiTBlock: {"attn": "attn", "mlp": "mlp"}}
BRANCH_TYPES: dict[type, str] = {Attention: "attn", Mlp: "mlp"}

META_BLOCK = "tcgraph.block"  # int: block index of a node
META_BRANCH = "tcgraph.branch"  # "attn" | "mlp" on the branch's call_module node
META_IO_NAME = "tcgraph.io_name"  # graph input/output names ("x", "cache.3.attn", …)


@dataclass(frozen=True)
class BlockInfo:
    index: int
    path: str  # module path, e.g. "blocks.3"
    node: str  # fx node name in the captured graph
    hidden_size: int
    num_tokens: int
    num_heads: int


@dataclass
class Captured:
    gm: fx.GraphModule
    blocks: list[BlockInfo]


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
    """Trace `model` with each registered block type as one call_module node."""
    if not isinstance(model, DiT):
        raise TcgraphError(f"capture expects a tcgraph DiT, got {type(model).__name__}")
    gm = trace(model.eval(), tuple(BLOCK_TYPES))
    blocks: list[BlockInfo] = []
    cfg = model.config
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), tuple(BLOCK_TYPES)):
            node.meta[META_BLOCK] = len(blocks)
            blocks.append(BlockInfo(len(blocks), node.target, node.name, cfg.hidden_size, cfg.num_tokens, cfg.num_heads))
    expected = sum(1 for m in model.modules() if isinstance(m, tuple(BLOCK_TYPES)))
    if len(blocks) != expected:
        raise TcgraphError(
            f"the traced graph calls {len(blocks)} blocks but the model has {expected}; a block that is "
            "called twice or not at all cannot be cached per step"
        )
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        node.meta[META_IO_NAME] = node.target
    gm.graph.lint()
    gm.recompile()
    return Captured(gm, blocks)
