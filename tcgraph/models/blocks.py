"""What a block is made of, as a model adapter tells it: its kinds, streams, branches and attention.

These are data only (`tcgraph.models.adapter` holds the adapter, its registry and the eager block
loop). docs/design.md, "Models and adapters", says how the passes use each field.
"""
from __future__ import annotations

from dataclasses import dataclass

from tcgraph.errors import TcgraphError
from tcgraph.names import IMAGE, RUN_CONSTANTS, STREAMS


@dataclass(frozen=True)
class AttentionSpec:
    """Where token pruning finds the parts of a multi-head self-attention branch.

    Names are module paths inside the branch module. Either `in_proj`, one linear layer
    whose output columns are q, k, v in that order, each split into `num_heads` heads of
    `head_dim` (timm's and the official DiT's layout), or three linear layers `q_proj`,
    `k_proj`, `v_proj` (diffusers' `to_q`, `to_k`, `to_v`); `out_proj` is the output
    projection. `head_dim` is an int attribute of the branch module, or None for
    width / heads. The token passes then emit the attention op by op.

    Or `rows` alone: a method of the branch module, `rows(u, image_idx, *context) -> [B, R, D]`,
    the branch's output rows of every row of the other streams (first, in the branch's row
    order) and of the image rows `image_idx` (int64 indices among the image rows: [k], the same
    for every sample, or [B, k], each sample's own), from the whole input u: queries of those
    rows, keys and values of all rows. An attention whose rows are not all projected alike (a
    joint attention with per-stream projections, q/k norms, rotary positions) says so here, and
    the passes call the method instead of emitting the generic ops.
    """

    out_proj: str | None = None
    num_heads: str | None = None  # int attribute of the branch module
    in_proj: str | None = None
    head_dim: str | None = None
    q_proj: str | None = None
    k_proj: str | None = None
    v_proj: str | None = None
    rows: str | None = None

    def __post_init__(self) -> None:
        if self.rows is not None:
            if any(v is not None for v in (self.out_proj, self.num_heads, self.in_proj, self.head_dim,
                                           self.q_proj, self.k_proj, self.v_proj)):
                raise TcgraphError("an AttentionSpec with a rows method names nothing else")
            return
        if self.out_proj is None or self.num_heads is None:
            raise TcgraphError("an AttentionSpec names its out_proj and num_heads (or a rows method)")
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

    Streams: the fields `norm`, `shift`, `scale`, `gate` describe a branch of the image stream
    (every branch of a one-stream model). A branch of a model with several streams gives `reads`
    instead, one `StreamRead` per stream it reads and writes, in row order: its input u is the
    concatenation of each stream's u along the token axis, its output is split back by the
    rows of the streams it writes, and each part goes to its stream through that stream's gate.
    Its cache holds the rows of the streams it writes (`streams`); a stream it reads without
    writing (`StreamRead.writes` False: SD3's last joint attention reads the text for keys and
    values only) has no rows in its output.
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
    reads: tuple["StreamRead", ...] = ()

    def __post_init__(self) -> None:
        if self.reads and (self.norm, self.shift, self.scale, self.gate) != (None,) * 4:
            raise TcgraphError(f"branch {self.name}: give either norm/shift/scale/gate (one image stream) or "
                               "`reads` (one StreamRead per stream), not both")
        streams = [r.stream for r in self.reads]
        if len(set(streams)) != len(streams) or not set(streams) <= set(STREAMS):
            raise TcgraphError(f"branch {self.name}: reads streams {streams}; each of {list(STREAMS)} at most once")
        if self.reads and not any(r.writes for r in self.reads):
            raise TcgraphError(f"branch {self.name}: it reads {streams} but writes none of them; a branch writes "
                               "one stream at least")
        if any(not r.writes and r.gate is not None for r in self.reads):
            raise TcgraphError(f"branch {self.name}: a stream it does not write has no gate")
        if (self.prepare is not None or self.constants) and self.constants != RUN_CONSTANTS.get(self.name):
            raise TcgraphError(f"branch {self.name}: run constants {list(self.constants)} with prepare={self.prepare!r}; "
                               f"a branch's constants are named {list(RUN_CONSTANTS.get(self.name, ()))} and need a "
                               "prepare method")

    @property
    def inputs(self) -> tuple["StreamRead", ...]:
        """The streams the branch reads and writes, in row order (one image stream unless `reads` says)."""
        return self.reads or (StreamRead(IMAGE, self.norm, self.shift, self.scale, self.gate),)

    @property
    def streams(self) -> tuple[str, ...]:
        """The streams the branch writes, in row order: the rows of its output and its cache."""
        return tuple(r.stream for r in self.inputs if r.writes)

    @property
    def reads_only(self) -> bool:
        """Whether it reads a stream it does not write (its input has rows its output lacks)."""
        return any(not r.writes for r in self.inputs)


@dataclass(frozen=True)
class StreamRead:
    """How one stream enters a branch and takes its share of the output back:
    u_s = modulate(norm(h_s), shift, scale) and h_s = h_s + gate ⊙ out_s, the chunks indexing the
    output of the kind's modulation number `modulation` (a two-stream block modulates each
    stream with its own layer).

    `writes` False: the branch reads the stream (its rows are keys and values of an attention) but
    gives it nothing back (no gate, no rows in the output). `block_input` True: u_s is formed from
    the stream as the block received it, not as the branches before this one left it (SD3.5's
    image-only attention reads the norm of the block's input, like the joint attention before it)."""

    stream: str  # tcgraph.names.STREAMS
    norm: str | None
    shift: int | None
    scale: int | None
    gate: int | None
    modulation: int = 0
    writes: bool = True
    block_input: bool = False


@dataclass(frozen=True)
class BlockKind:
    """One kind of block of a model: its class (a leaf of the fx capture), the container that holds
    the blocks of this kind (an nn.ModuleList), the modulation that feeds its branches, and its
    branches in recipe order. DiT and PixArt have one kind; a model whose blocks differ (FLUX's
    double and single blocks, SD3's last block) lists one kind per block class, in the order the
    forward runs them. Blocks are numbered globally across kinds.

    `streams` are the streams a block of this kind takes and returns, in the order of its
    forward's arguments and results (one: the hidden state; two: image, then text). With
    several streams, or several modulations (`modulation` and `chunks` as tuples, one per
    modulation layer), the branches say which they read (`BranchSpec.reads`). Branches of a
    `parallel` kind all read the block's input (a single-stream MMDiT block runs attention and
    MLP side by side); otherwise each reads the hidden state the branch before it left.
    """

    name: str
    block_type: type
    blocks: str  # module path of the container, e.g. "blocks"
    modulation: str | tuple[str, ...]  # attribute of a block: (*cond) -> [B, chunks * D], split into `chunks`
    chunks: int | tuple[int, ...]
    branches: tuple[BranchSpec, ...]
    streams: tuple[str, ...] = (IMAGE,)
    parallel: bool = False

    def __post_init__(self) -> None:
        mods, chunks = self.modulations, self.chunk_counts
        if len(mods) != len(chunks):
            raise TcgraphError(f"block kind {self.name}: {len(mods)} modulations but {len(chunks)} chunk counts")
        if IMAGE not in self.streams or not set(self.streams) <= set(STREAMS) or len(set(self.streams)) != len(self.streams):
            raise TcgraphError(f"block kind {self.name}: streams {list(self.streams)}; the image stream and others "
                               f"of {list(STREAMS)}, each once")
        for spec in self.branches:
            for read in spec.inputs:
                if read.stream not in self.streams or not 0 <= read.modulation < len(mods):
                    raise TcgraphError(f"block kind {self.name}, branch {spec.name}: reads stream {read.stream!r} "
                                       f"with modulation {read.modulation}; the kind has streams "
                                       f"{list(self.streams)} and {len(mods)} modulations")

    @property
    def modulations(self) -> tuple[str, ...]:
        return self.modulation if isinstance(self.modulation, tuple) else (self.modulation,)

    @property
    def chunk_counts(self) -> tuple[int, ...]:
        return self.chunks if isinstance(self.chunks, tuple) else (self.chunks,)

    @property
    def layout(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """(branch name, the streams it writes in row order) of each branch: what a plan stores."""
        return tuple((b.name, b.streams) for b in self.branches)

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
