"""Model adapters: what one architecture is made of, told once, so that nothing else names its modules.

The passes (capture, expand_blocks, token pruning), the eager reference and calibration's
blended step never name a module of an architecture (docs/design.md, "Models and adapters").
They ask the model's `ModelAdapter`:

- which module class is a block (a leaf of the fx capture) and where the blocks are, in order;
- each block's branches, in recipe order (names from `tcgraph.names.BRANCH_ORDER`), with how the branch
  input u is formed from the hidden state h (norm, then adaLN shift/scale from the block's
  modulation), the gate that scales the branch output into the residual, the branch module,
  and, for an attention branch, where its fused q/k/v and output projection are;
- how x and the conditioning become the hidden state h and the conditioning vector c, and
  how the last hidden state becomes the model output.

`run_blocks` is the one eager block loop built from these facts: the eager reference
(`tcgraph.passes.reference`) and calibration's `mixed_step` both run it, each deciding
what every branch contributes through a callback.

Adapters live in a registry keyed by model class (`ADAPTERS`, looked up along the class's
MRO, so a subclass keeps its parent's layout), not in isinstance chains in the passes;
`adapter_for` refuses an unknown architecture by name and lists the supported ones.
tcgraph's own DiT (official facebookresearch/DiT layout) is registered here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn as nn

from tcgraph.errors import TcgraphError
from tcgraph.models.blocks import AttentionSpec, BlockKind, BranchSpec, StreamRead  # noqa: F401  (re-exported)
from tcgraph.models.official.dit import Attention, DiT, DiTBlock, Mlp, modulate
from tcgraph.names import BRANCH_ORDER, IMAGE


@dataclass(frozen=True)
class ModelDims:
    """Sizes the block table records: token count and width of the hidden state, heads."""

    depth: int
    num_tokens: int
    hidden_size: int
    num_heads: int


class BranchInput:
    """A branch's input u, formed only when called (a reused branch never forms it), and its rows.

    `rows` is (stream, row count) of each stream the branch reads, in row order: u holds those
    rows one after another; `written` those of the streams it writes, the rows of its output and
    cache (the same unless it reads a stream for keys and values only). `image` is the slice of
    the image rows among the written rows, the only rows a token action chooses from (other
    streams' rows are always recomputed).
    """

    def __init__(self, make: Callable[[], torch.Tensor], rows: tuple[tuple[str, int], ...],
                 written: tuple[tuple[str, int], ...] | None = None):
        self._make, self.rows = make, rows
        self.written = rows if written is None else written

    def __call__(self) -> torch.Tensor:
        return self._make()

    @property
    def same_rows(self) -> bool:
        """Whether u and the output have the same rows (no stream read for keys and values only)."""
        return self.written == self.rows

    @property
    def image(self) -> slice:
        start = 0
        for stream, count in self.written:
            if stream == IMAGE:
                return slice(start, start + count)
            start += count
        raise TcgraphError("this branch writes no image rows: no token of it can be chosen")

    @property
    def total(self) -> int:
        return sum(count for _, count in self.written)

    def token_rows(self, indices) -> list[int]:
        """The output rows a token action on image tokens `indices` recomputes: every row of the
        other streams it writes, then the image rows of those tokens."""
        image = self.image
        return [r for r in range(self.total) if not image.start <= r < image.stop] + [image.start + i for i in indices]


class BranchFn(Protocol):
    """What a caller of `run_blocks` decides for each branch: its pre-gate output.

    `u()` computes the branch input (`BranchInput`: only call it when the branch is
    evaluated; `u.rows` says which streams' rows it holds); `fn(u)` is the branch function
    (the branch module, with its context arguments bound).
    """

    def __call__(self, block: int, branch: str, u: BranchInput,
                 fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor: ...


class ConstantsFn(Protocol):
    """What a caller of `run_blocks` decides for a branch with run constants (`BranchSpec.prepare`):
    the arguments of its function after u. `prepare()` computes them from the conditioning; the
    first ones are the run constants, which a caller may take from elsewhere (a cache)."""

    def __call__(self, block: int, branch: str,
                 prepare: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]: ...


def _prepared(block: int, branch: str, prepare: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    return prepare()


@dataclass(frozen=True)
class ModelAdapter:
    """The facts tcgraph needs about one model architecture (see the module docstring)."""

    name: str  # shown in messages, e.g. "DiT"
    model_type: type  # the registry key
    kinds: tuple[BlockKind, ...]  # the model's block kinds, in the order its forward runs them
    # (model, x, t, y) -> (h, cond): y is the model's conditioning input (class ids, or a tuple of
    # tensors such as (text embeddings, mask)); h the hidden state (a tuple of the streams in
    # `streams` order for a model of several); cond is the conditioning the blocks' modulation and
    # `final` take, one tensor (DiT's c) or a tuple of them (passed as separate arguments)
    embed: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[object, object]]
    final: Callable[..., torch.Tensor]  # (model, h, *cond) -> output (h as embed gives it)
    dims: Callable[[nn.Module], ModelDims]
    streams: tuple[str, ...] = (IMAGE,)  # the model's streams, in the order embed gives them

    def __post_init__(self) -> None:
        if not self.kinds or len({k.name for k in self.kinds}) != len(self.kinds) \
                or len({k.block_type for k in self.kinds}) != len(self.kinds):
            raise TcgraphError(f"adapter {self.name}: give one block kind or more, with distinct names and block classes")
        for kind in self.kinds:
            names = kind.branch_names
            if not names or names != tuple(b for b in BRANCH_ORDER if b in names):
                raise TcgraphError(
                    f"adapter {self.name}: branches {names} of block kind {kind.name} must be distinct names of "
                    f"{BRANCH_ORDER}, in that order: recipes list one action per branch in that order"
                )
            if kind.streams != tuple(s for s in self.streams if s in kind.streams):
                raise TcgraphError(f"adapter {self.name}: block kind {kind.name} takes streams {list(kind.streams)}; "
                                   f"the model's are {list(self.streams)} (a kind takes some of them, in that order)")

    @property
    def uniform(self) -> bool:
        """Whether every block has the same branches, each writing the image stream alone."""
        return len({k.layout for k in self.kinds}) == 1 and all(
            b.streams == (IMAGE,) for b in self.kinds[0].branches)

    @property
    def branch_names(self) -> tuple[str, ...]:
        """The branches' names in recipe order, every block's (a DiT's: `tcgraph.names.BRANCHES`); a
        model whose kinds differ has none: ask `layout(model)`."""
        if len({k.branch_names for k in self.kinds}) != 1:
            raise TcgraphError(f"adapter {self.name}: its block kinds have different branches "
                               f"({[k.branch_names for k in self.kinds]}); ask for each block's (`layout`)")
        return self.kinds[0].branch_names

    @property
    def branches(self) -> tuple[BranchSpec, ...]:
        """The branch specs of a one-kind adapter; a model of several kinds asks `block_kinds` per block."""
        if len(self.kinds) != 1:
            raise TcgraphError(f"adapter {self.name} has {len(self.kinds)} block kinds: ask for a block's kind")
        return self.kinds[0].branches

    # ---- structure ------------------------------------------------------------------

    def block_table(self, model: nn.Module) -> list[tuple[str, BlockKind]]:
        """(module path, kind) of every block, in global order: the kinds' containers one after another.
        Kinds may share a container (SD3's blocks differ but sit in one list): each block then is of
        the kind whose class is exactly its own, and each kind's blocks must follow one another in
        the order of `kinds`."""
        table: list[tuple[str, BlockKind]] = []
        for container in dict.fromkeys(k.blocks for k in self.kinds):
            kinds = [k for k in self.kinds if k.blocks == container]
            for i, block in enumerate(model.get_submodule(container)):
                kind = kinds[0] if len(kinds) == 1 else next((k for k in kinds if type(block) is k.block_type), None)
                if kind is None:
                    raise TcgraphError(f"adapter {self.name}: block {container}.{i} is a {type(block).__name__}; the "
                                       f"kinds of {container} are {[k.block_type.__name__ for k in kinds]}")
                table.append((f"{container}.{i}", kind))
        order = [self.kinds.index(kind) for _, kind in table]
        if order != sorted(order):
            raise TcgraphError(f"adapter {self.name}: the blocks' kinds {[k.name for _, k in table]} do not follow "
                               f"one another in the order {[k.name for k in self.kinds]}")
        return table

    def block_paths(self, model: nn.Module) -> list[str]:
        return [path for path, _ in self.block_table(model)]

    def layout(self, model: nn.Module) -> tuple[tuple[tuple[str, tuple[str, ...]], ...], ...]:
        """Per block, (branch, the streams it writes) of each branch: a plan's `Layout` of this model."""
        return tuple(kind.layout for _, kind in self.block_table(model))

    def kind_named(self, name: str) -> BlockKind:
        for kind in self.kinds:
            if kind.name == name:
                return kind
        raise TcgraphError(f"adapter {self.name} has no block kind {name!r}; kinds: {[k.name for k in self.kinds]}")

    def leaf_types(self) -> tuple[type, ...]:
        """Module classes kept whole when a block body is traced: the branch functions of every kind."""
        return tuple(dict.fromkeys(b.type for kind in self.kinds for b in kind.branches))

    # ---- eager evaluation -------------------------------------------------------------

    def run_blocks(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                   branch_fn: BranchFn, constants_fn: ConstantsFn = _prepared,
                   after_block: Callable[[int, dict], None] | None = None) -> torch.Tensor:
        """The model's forward with every branch's pre-gate output decided by `branch_fn`
        (and the arguments of a branch with run constants by `constants_fn`).

        With `branch_fn = lambda l, b, u, fn: fn(u())` this is the model itself. The op
        order is fixed here once; the reference and calibration share it. A branch reading
        several streams gets their u concatenated along the tokens and gives each its rows of
        the output through its own gate; the branches of a parallel kind all read the block's input.
        `after_block(l, hidden states by stream)`, where given, sees the hidden states out of each
        block (what a gated step's indicator is formed from).
        """
        h, cond = self.embed(model, x, t, y)
        cond = cond if isinstance(cond, tuple) else (cond,)
        one = len(self.streams) == 1
        hs = dict(zip(self.streams, (h,) if one else h))
        for l, (path, kind) in enumerate(self.block_table(model)):
            block = model.get_submodule(path)
            mods = [getattr(block, m)(*cond).chunk(c, dim=1) for m, c in zip(kind.modulations, kind.chunk_counts)]
            start = dict(hs)
            for spec in kind.branches:
                source = {r.stream: (start if kind.parallel or r.block_input else hs)[r.stream] for r in spec.inputs}
                value = branch_fn(l, spec.name, _input_of(block, spec, mods, source),
                                  _function_of(block.get_submodule(spec.module), spec, [cond[i] for i in spec.context],
                                               lambda prepare, l=l, name=spec.name: constants_fn(l, name, prepare)))
                at = 0
                writes = [read for read in spec.inputs if read.writes]
                for read in writes:
                    rows = source[read.stream].shape[1]
                    part = value if len(writes) == 1 or value.dim() == 0 else value[:, at:at + rows]
                    at += rows
                    gate = mods[read.modulation][read.gate].unsqueeze(1) if read.gate is not None else None
                    hs[read.stream] = hs[read.stream] + gate * part if gate is not None else hs[read.stream] + part
            if after_block is not None:
                after_block(l, dict(hs))
        return self.final(model, hs[IMAGE] if one else tuple(hs[s] for s in self.streams), *cond)


def _input_of(block: nn.Module, spec: BranchSpec, mods: list[tuple[torch.Tensor, ...]],
              hs: dict[str, torch.Tensor]) -> BranchInput:
    """u of one branch, formed only when asked for (the streams bound now, not when called); `hs`
    holds each stream it reads as it reads it (the block's input for a `block_input` read)."""

    def one(read: StreamRead) -> torch.Tensor:
        h = hs[read.stream]
        v = block.get_submodule(read.norm)(h) if read.norm is not None else h
        if read.shift is not None:
            mod = mods[read.modulation]
            v = modulate(v, mod[read.shift], mod[read.scale])
        return v

    reads = spec.inputs
    rows = tuple((r.stream, hs[r.stream].shape[1]) for r in reads)
    written = tuple((r.stream, hs[r.stream].shape[1]) for r in reads if r.writes)
    if len(reads) == 1:
        return BranchInput(lambda: one(reads[0]), rows, written)
    return BranchInput(lambda: torch.cat([one(r) for r in reads], dim=1), rows, written)


def _function_of(module: nn.Module, spec: BranchSpec, context: list[torch.Tensor],
                 constants: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    """The branch function u -> module(u, *context), or module(u, *prepare(*context)) for a
    branch with run constants, its arguments asked of `constants` when the branch runs."""
    if spec.prepare is not None:
        prepare = getattr(module, spec.prepare)
        return lambda u: module(u, *constants(lambda: prepare(*context)))
    return (lambda u: module(u, *context)) if context else module


# ---- registry ---------------------------------------------------------------------------

ADAPTERS: dict[type, ModelAdapter] = {}


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    """Make `adapter_for` answer `adapter` for its model class (and subclasses without their own)."""
    ADAPTERS[adapter.model_type] = adapter
    return adapter


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of `model`'s class; refuses an architecture without one, naming the supported ones."""
    for cls in type(model).__mro__:
        if cls in ADAPTERS:
            return ADAPTERS[cls]
    known = ", ".join(a.name for a in ADAPTERS.values())
    raise TcgraphError(
        f"tcgraph has no model adapter for {type(model).__name__}; supported architectures: {known}. "
        "Load the model as one of these (tcgraph.models.load_model for DiT checkpoints), or register a "
        "ModelAdapter for its class with tcgraph.models.adapter.register_adapter"
    )


def run_blocks(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
               branch_fn: BranchFn, constants_fn: ConstantsFn = _prepared,
               after_block: Callable[[int, dict], None] | None = None) -> torch.Tensor:
    """`adapter_for(model).run_blocks(...)`: one eager forward, branches decided by `branch_fn`."""
    return adapter_for(model).run_blocks(model, x, t, y, branch_fn, constants_fn, after_block)


# ---- tcgraph's DiT (official facebookresearch/DiT layout) --------------------------------


def _dit_embed(model: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = model.x_embedder(x) + model.pos_embed  # (N, T, D)
    c = model.t_embedder(t) + model.y_embedder(y, False)  # (N, D); labels as given (no dropout)
    return h, c


def _dit_final(model: DiT, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return model.unpatchify(model.final_layer(h, c))  # (N, C_out, H, W)


def config_dims(model: nn.Module) -> ModelDims:
    """The block table's sizes from a model's `DiTConfig` (every adapter's models carry one)."""
    cfg = model.config
    return ModelDims(cfg.depth, cfg.num_tokens, cfg.hidden_size, cfg.num_heads)


DIT = register_adapter(ModelAdapter(
    name="DiT",
    model_type=DiT,
    kinds=(BlockKind(
        name="block",
        block_type=DiTBlock,
        blocks="blocks",
        modulation="adaLN_modulation",  # shift, scale, gate of attn, then of mlp
        chunks=6,
        branches=(
            BranchSpec("attn", "attn", Attention, "norm1", 0, 1, 2,
                       AttentionSpec(in_proj="qkv", out_proj="proj", num_heads="num_heads", head_dim="head_dim")),
            BranchSpec("mlp", "mlp", Mlp, "norm2", 3, 4, 5),
        ),
    ),),
    embed=_dit_embed,
    final=_dit_final,
    dims=config_dims,
))
