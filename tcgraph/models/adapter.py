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
from tcgraph.models.official.dit import Attention, DiT, DiTBlock, Mlp, modulate
from tcgraph.names import BRANCH_ORDER, RUN_CONSTANTS


@dataclass(frozen=True)
class AttentionSpec:
    """Where token pruning finds the parts of a multi-head self-attention branch.

    Names are module paths inside the branch module. Either `in_proj`, one linear layer
    whose output columns are q, k, v in that order, each split into `num_heads` heads of
    `head_dim` (timm's and the official DiT's layout), or three linear layers `q_proj`,
    `k_proj`, `v_proj` (diffusers' `to_q`, `to_k`, `to_v`); `out_proj` is the output
    projection. `head_dim` is an int attribute of the branch module, or None for
    width / heads.
    """

    out_proj: str
    num_heads: str  # int attribute of the branch module
    in_proj: str | None = None
    head_dim: str | None = None
    q_proj: str | None = None
    k_proj: str | None = None
    v_proj: str | None = None

    def __post_init__(self) -> None:
        separate = [p is not None for p in (self.q_proj, self.k_proj, self.v_proj)]
        if not ((self.in_proj is not None and not any(separate)) or (self.in_proj is None and all(separate))):
            raise TcgraphError("an AttentionSpec names either a fused in_proj or all of q_proj, k_proj, v_proj")

    @property
    def fused(self) -> bool:
        return self.in_proj is not None


@dataclass(frozen=True)
class BranchSpec:
    """One residual branch of a block: `h = h + gate ⊙ module(modulate(norm(h), shift, scale))`.

    `shift`, `scale`, `gate` index the chunks of the block's modulation output; a gate of
    None is an ungated branch (`h + out`); shift and scale of None leave u = norm(h); a norm
    of None takes h itself. The cached value is the branch output before its gate.
    `attention` says where q/k/v and the output projection are (None: the branch works on
    each token alone, like an MLP, so it may run on a subset of the token rows).
    `context` indexes the conditioning tuple for extra arguments of the branch function after
    u: a cross-attention branch reads the text and its mask bias (its rows still depend on
    their own query alone, so it runs row-wise like an MLP). With `prepare`, a method of the
    branch module, those arguments go through it first: the branch function is
    `module(u, *module.prepare(*context))`, and the first `len(constants)` values prepare
    returns are run constants (they depend on the conditioning alone: a sampling run computes
    them once and carries them as caches `cache.<l>.<branch>.<name>`; names as
    `tcgraph.names.RUN_CONSTANTS` fixes them). PixArt's cross branch: prepare(text, bias) ->
    (k, v, bias), the keys and values of the text.
    """

    name: str  # the recipe's branch name: "attn", "mlp"
    module: str  # attribute of the block: the branch function
    type: type  # the branch module's class: a leaf when the block body is traced
    norm: str | None
    shift: int | None
    scale: int | None
    gate: int | None
    attention: AttentionSpec | None = None
    context: tuple[int, ...] = ()
    prepare: str | None = None
    constants: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.prepare is not None or self.constants) and self.constants != RUN_CONSTANTS.get(self.name):
            raise TcgraphError(f"branch {self.name}: run constants {list(self.constants)} with prepare={self.prepare!r}; "
                               f"a branch's constants are named {list(RUN_CONSTANTS.get(self.name, ()))} and need a "
                               "prepare method")


@dataclass(frozen=True)
class BlockKind:
    """One kind of block of a model: its class (a leaf of the fx capture), the container that holds
    the blocks of this kind (an nn.ModuleList), the modulation that feeds its branches, and its
    branches in recipe order. DiT and PixArt have one kind; a model whose blocks differ (FLUX's
    double and single blocks, SD3's last block) lists one kind per block class, in the order the
    forward runs them. Blocks are numbered globally across kinds."""

    name: str
    block_type: type
    blocks: str  # module path of the container, e.g. "blocks"
    modulation: str  # attribute of a block: (*cond) -> [B, chunks * D], split into `chunks` along dim 1
    chunks: int
    branches: tuple[BranchSpec, ...]

    @property
    def branch_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.branches)

    def branch(self, name: str) -> BranchSpec:
        for spec in self.branches:
            if spec.name == name:
                return spec
        raise TcgraphError(f"block kind {self.name} has no branch {name!r}; its branches: {list(self.branch_names)}")

    def branch_of(self, relative_target: str) -> BranchSpec | None:
        """The branch whose module is `relative_target` (a path inside the block), if any."""
        return next((b for b in self.branches if b.module == relative_target), None)


@dataclass(frozen=True)
class ModelDims:
    """Sizes the block table records: token count and width of the hidden state, heads."""

    depth: int
    num_tokens: int
    hidden_size: int
    num_heads: int


class BranchFn(Protocol):
    """What a caller of `run_blocks` decides for each branch: its pre-gate output.

    `u()` computes the branch input (only call it when the branch is evaluated: a reused
    branch never forms its input); `fn(u)` is the branch function (the branch module, with
    its context arguments bound).
    """

    def __call__(self, block: int, branch: str, u: Callable[[], torch.Tensor],
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
    # tensors such as (text embeddings, mask)); cond is the conditioning the blocks' modulation and
    # `final` take, one tensor (DiT's c) or a tuple of them (passed as separate arguments)
    embed: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, object]]
    final: Callable[..., torch.Tensor]  # (model, h, *cond) -> output
    dims: Callable[[nn.Module], ModelDims]

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
        if len({k.branch_names for k in self.kinds}) > 1:
            raise TcgraphError(f"adapter {self.name}: its block kinds have different branches "
                               f"({[k.branch_names for k in self.kinds]}); a plan gives every block the same "
                               "branches until plans carry per-block branch layouts")

    @property
    def branch_names(self) -> tuple[str, ...]:
        """The branches' names in recipe order, every block's (a DiT's: `tcgraph.names.BRANCHES`)."""
        return self.kinds[0].branch_names

    @property
    def branches(self) -> tuple[BranchSpec, ...]:
        """The branch specs of a one-kind adapter; a model of several kinds asks `block_kinds` per block."""
        if len(self.kinds) != 1:
            raise TcgraphError(f"adapter {self.name} has {len(self.kinds)} block kinds: ask for a block's kind")
        return self.kinds[0].branches

    # ---- structure ------------------------------------------------------------------

    def block_table(self, model: nn.Module) -> list[tuple[str, BlockKind]]:
        """(module path, kind) of every block, in global order: the kinds' containers one after another."""
        return [(f"{kind.blocks}.{i}", kind) for kind in self.kinds
                for i in range(len(model.get_submodule(kind.blocks)))]

    def block_paths(self, model: nn.Module) -> list[str]:
        return [path for path, _ in self.block_table(model)]

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
                   branch_fn: BranchFn, constants_fn: ConstantsFn = _prepared) -> torch.Tensor:
        """The model's forward with every branch's pre-gate output decided by `branch_fn`
        (and the arguments of a branch with run constants by `constants_fn`).

        With `branch_fn = lambda l, b, u, fn: fn(u())` this is the model itself. The op
        order is fixed here once; the reference and calibration share it.
        """
        h, cond = self.embed(model, x, t, y)
        cond = cond if isinstance(cond, tuple) else (cond,)
        for l, (path, kind) in enumerate(self.block_table(model)):
            block = model.get_submodule(path)
            mod = getattr(block, kind.modulation)(*cond).chunk(kind.chunks, dim=1)
            for spec in kind.branches:
                value = branch_fn(l, spec.name, _input_of(block, spec, mod, h),
                                  _function_of(block.get_submodule(spec.module), spec, [cond[i] for i in spec.context],
                                               lambda prepare, l=l, name=spec.name: constants_fn(l, name, prepare)))
                h = h + mod[spec.gate].unsqueeze(1) * value if spec.gate is not None else h + value
        return self.final(model, h, *cond)


def _input_of(block: nn.Module, spec: BranchSpec, mod: tuple[torch.Tensor, ...],
              h: torch.Tensor) -> Callable[[], torch.Tensor]:
    """u of one branch, formed only when asked for (h bound now, not when called)."""

    def u() -> torch.Tensor:
        v = block.get_submodule(spec.norm)(h) if spec.norm is not None else h
        if spec.shift is not None:
            v = modulate(v, mod[spec.shift], mod[spec.scale])
        return v

    return u


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
               branch_fn: BranchFn, constants_fn: ConstantsFn = _prepared) -> torch.Tensor:
    """`adapter_for(model).run_blocks(...)`: one eager forward, branches decided by `branch_fn`."""
    return adapter_for(model).run_blocks(model, x, t, y, branch_fn, constants_fn)


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
