"""The model's block table, as an artifact's manifest records it: where the blocks are, of which
kind, where each branch's module sits inside its block, and the model's other top-level modules.

Inspection reads a variant's ONNX graph without the model. It places a node in block l by the
weights it reads (initializers under that block's module path, `<container>.<i>.…`) or its cache
inputs (`cache.<l>.…`), in a branch by the module scope the exporter recorded (the branch
module's path inside the block, or one of the norms that prepare its input), and outside the
blocks by the top-level module it runs in. The manifest's checks refuse weights of blocks the
model does not have. Both ask this table; neither names a family's modules.

The manifest entry (`"blocks"`), written by `write_artifact` from the variant graphs (capture
records the adapter and every block's path and kind on them)::

    {"kinds": [{"name": "block", "container": "transformer_blocks", "count": 28,
                "branches": [{"name": "attn", "module": "attn1", "norms": ["norm1.norm"]},
                             {"name": "mlp", "module": "ff", "norms": ["norm3"]}]}],
     "top": {"before": ["pos_embed"], "after": ["proj_out_1", "norm_out", "proj_out_2"]}}

Blocks are numbered globally, the kinds' containers one after another (docs/design.md, "Block
kinds and streams"). `top` lists the model's children that are not block containers, in the order
the forward first calls them, split at the blocks (for display order only). Folders written before
the table existed are read with their family's table (`OLD_MANIFESTS`), which is what these
families' graphs record (tests/inspection/test_blocks.py checks it).

No torch import: `tcgraph inspect` reads the table without torch.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tcgraph.errors import TcgraphError
from tcgraph.names import BRANCH_ORDER, CACHE_PREFIX

# The graph meta capture writes (tcgraph.passes.meta: META_ADAPTER, META_BLOCKS); export may not
# import the passes, and a test checks that the keys agree.
GRAPH_ADAPTER = "tcgraph.adapter"
GRAPH_BLOCKS = "tcgraph.block_table"

_PATH = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*")  # a module path: `norm1.norm`, `ff.net.0`


def _under(path: str, module: str) -> bool:
    """Whether module path `path` is `module` or lies inside it."""
    return path == module or path.startswith(module + ".")


@dataclass(frozen=True)
class BranchPaths:
    """One branch of a block kind: its recipe name, its module's path inside the block, and the
    norms that prepare its input (paths inside the block; none where u is the hidden state)."""

    name: str
    module: str
    norms: tuple[str, ...] = ()


@dataclass(frozen=True)
class KindPaths:
    """One block kind: the container of its blocks (`<container>.<i>` is a block), how many it
    holds, and its branches in recipe order."""

    name: str
    container: str
    count: int
    branches: tuple[BranchPaths, ...]

    def branch_at(self, scope: str) -> str | None:
        """The branch whose module runs `scope` (a module path inside a block of this kind), or None."""
        return next((b.name for b in self.branches if _under(scope, b.module)), None)

    def is_norm(self, scope: str) -> bool:
        """Whether `scope` is one of the norms that prepare a branch's input."""
        return any(_under(scope, n) for b in self.branches for n in b.norms)


@dataclass(frozen=True)
class BlockTable:
    """Where a model's blocks are (see the module docstring); `before` and `after` are the model's
    other top-level modules, those its forward calls before the blocks and after them."""

    kinds: tuple[KindPaths, ...]
    before: tuple[str, ...] = ()
    after: tuple[str, ...] = ()

    @property
    def depth(self) -> int:
        return sum(k.count for k in self.kinds)

    def kind_at(self, block: int) -> KindPaths:
        start = 0
        for kind in self.kinds:
            if start <= block < start + kind.count:
                return kind
            start += kind.count
        raise TcgraphError(f"block {block} is not one of the model's {self.depth} blocks")

    def branches(self) -> tuple[tuple[str, ...], ...]:
        """Each block's branch names, in global block order."""
        return tuple(tuple(b.name for b in k.branches) for k in self.kinds for _ in range(k.count))

    def _locate(self, name: str) -> tuple[int, int, int] | None:
        """(global index of the kind's first block, index among the kind's blocks, the kind's count) of
        a tensor or module under `<container>.<i>.`, or None. Kinds that share a container hold its
        blocks one run after another (the last of them also any index past the container's blocks)."""
        start = 0
        found = None
        offsets: dict[str, int] = {}  # blocks of a shared container held by the kinds before
        for kind in self.kinds:
            prefix = kind.container + "."
            offset = offsets.get(kind.container, 0)
            offsets[kind.container] = offset + kind.count
            if name.startswith(prefix) and (found is None or len(prefix) > found[3]
                                            or (len(prefix) == found[3] and found[1] >= found[2])):
                head, dot, _ = name[len(prefix):].partition(".")
                if dot and head.isdigit() and int(head) >= offset:
                    found = (start, int(head) - offset, kind.count, len(prefix))
            start += kind.count
        return None if found is None else found[:3]

    def block_of(self, name: str) -> int | None:
        """Global block index of a weight `<container>.<i>.…` of one of the model's blocks, or of a
        cache `cache.<l>.…`; None for any other name (and for a block the model does not have)."""
        if name.startswith(CACHE_PREFIX):
            head = name[len(CACHE_PREFIX):].partition(".")[0]
            return int(head) if head.isdigit() and int(head) < self.depth else None
        at = self._locate(name)
        return at[0] + at[1] if at is not None and at[1] < at[2] else None

    def is_foreign(self, name: str) -> bool:
        """Whether `name` lies under a block container at an index past the blocks it holds."""
        at = self._locate(name)
        return at is not None and at[1] >= at[2]

    def top_module(self, scope: str) -> str | None:
        """The top-level module (outside the blocks) that runs `scope`, a module path from the model."""
        return next((m for m in (*self.before, *self.after) if _under(scope, m)), None)

    def top_rank(self, module: str) -> int:
        """Display order of a unit outside the blocks: 0 before the blocks, 2 after them, 3 unknown."""
        return 0 if module in self.before else 2 if module in self.after else 3

    # ---- JSON ------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"kinds": [{"name": k.name, "container": k.container, "count": k.count,
                           "branches": [{"name": b.name, "module": b.module, "norms": list(b.norms)}
                                        for b in k.branches]} for k in self.kinds],
                "top": {"before": list(self.before), "after": list(self.after)}}

    @classmethod
    def from_dict(cls, raw: Any, where: str, todo: str) -> BlockTable:
        """The table of a manifest (untrusted: every field checked), refused by name where it is not one."""

        def bad(what: str) -> TcgraphError:
            return TcgraphError(f"{where}: the block table's {what}; {todo}")

        def paths(value, what: str) -> tuple[str, ...]:
            if not isinstance(value, list) or not all(isinstance(p, str) and _PATH.fullmatch(p) for p in value):
                raise bad(f"{what} is {value!r}, not a list of module paths")
            return tuple(value)

        if not isinstance(raw, dict) or not isinstance(raw.get("kinds"), list) or not raw["kinds"]:
            raise bad("'kinds' is missing or not a non-empty list")
        kinds = []
        for i, k in enumerate(raw["kinds"]):
            if not isinstance(k, dict):
                raise bad(f"kind {i} is {type(k).__name__}, not an object")
            name, container, count = k.get("name"), k.get("container"), k.get("count")
            if not isinstance(name, str) or not isinstance(container, str) or not _PATH.fullmatch(container):
                raise bad(f"kind {i} has name {name!r} and container {container!r}, not a name and a module path")
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise bad(f"kind {name} has count {count!r}, not a whole number")
            if not isinstance(k.get("branches"), list) or not k["branches"]:
                raise bad(f"kind {name} has no list of branches")
            branches = []
            for b in k["branches"]:
                if not isinstance(b, dict) or b.get("name") not in BRANCH_ORDER or not isinstance(b.get("module"), str) \
                        or not _PATH.fullmatch(b["module"]):
                    raise bad(f"kind {name} has branch {b!r}; a branch is a name of {list(BRANCH_ORDER)} and a "
                              "module path")
                branches.append(BranchPaths(b["name"], b["module"], paths(b.get("norms", []), f"norms of {b['name']}")))
            kinds.append(KindPaths(name, container, count, tuple(branches)))
        containers = list(dict.fromkeys(k.container for k in kinds))  # kinds sharing one follow one another
        runs = [k.container for i, k in enumerate(kinds) if i == 0 or kinds[i - 1].container != k.container]
        if len(runs) != len(containers) or any(_under(a, b) for i, a in enumerate(containers)
                                               for j, b in enumerate(containers) if i != j):
            raise bad(f"containers {[k.container for k in kinds]} are not distinct modules, none inside another "
                      "(kinds that share one follow one another)")
        top = raw.get("top", {})
        if not isinstance(top, dict):
            raise bad(f"'top' is {top!r}, not an object")
        return cls(tuple(kinds), paths(top.get("before", []), "top.before"), paths(top.get("after", []), "top.after"))

    def check(self, depth: int, branches: Sequence[Sequence[str]], where: str, todo: str) -> None:
        """The table has the model config's `depth` blocks, each with the plan's `branches`."""
        if self.depth != depth:
            raise TcgraphError(f"{where}: the block table holds {self.depth} blocks "
                               f"({', '.join(f'{k.count} in {k.container}' for k in self.kinds)}), but the model "
                               f"config has {depth}; {todo}")
        mine = self.branches()
        other = next((l for l in range(depth) if tuple(branches[l]) != mine[l]), None)
        if other is not None:
            raise TcgraphError(f"{where}: block {other} has branches {list(mine[other])} in the block table but "
                               f"{list(branches[other])} in the plan; {todo}")


#################################################################################
#                         From the graphs, and for old folders                  #
#################################################################################


def graph_block_table(gm) -> BlockTable | None:
    """The block table of a captured variant graph (`gm.meta` names its adapter and every block's
    path and kind); None for a graph that does not come from capture.

    `gm` holds the model's modules that the graph calls, under their paths, in the order the graph
    first calls them: its children that are not block containers are the top-level modules."""
    meta = getattr(gm, "meta", None) or {}
    adapter, table = meta.get(GRAPH_ADAPTER), meta.get(GRAPH_BLOCKS)
    if adapter is None or table is None:
        return None
    kind_names = [kind for _, kind in table]
    kinds = tuple(KindPaths(kind.name, kind.blocks, kind_names.count(kind.name),
                            tuple(BranchPaths(b.name, b.module,
                                              tuple(dict.fromkeys(r.norm for r in b.inputs if r.norm is not None)))
                                  for b in kind.branches))
                  for kind in adapter.kinds)
    before: list[str] = []
    after: list[str] = []
    seen_blocks = False
    children = getattr(gm, "source_children", None) or [name for name, _ in gm.named_children()]  # a gated step's
    for child in children:
        if any(_under(k.container, child) for k in kinds):  # a container, or a module that holds one
            seen_blocks = True
        else:
            (after if seen_blocks else before).append(child)
    return BlockTable(kinds, tuple(before), tuple(after))


def variants_block_table(variants: Sequence) -> BlockTable | None:
    """The block table of an artifact's variant graphs (`graph_block_table` of each: their kinds must
    agree; the top-level modules of all of them); None where the graphs do not come from capture."""
    tables = [graph_block_table(getattr(v, "gm", None)) for v in variants]
    if not tables or any(t is None for t in tables):
        return None
    if any(t.kinds != tables[0].kinds for t in tables):
        raise TcgraphError(f"the variant graphs record different blocks ({[t.to_dict()['kinds'] for t in tables]}); "
                           "build every variant of one model (tcgraph.compile.build_variants)")
    return BlockTable(tables[0].kinds, tuple(dict.fromkeys(m for t in tables for m in t.before)),
                      tuple(dict.fromkeys(m for t in tables for m in t.after)))


def _old(container: str, branches: dict[str, tuple[str, tuple[str, ...]]], before: tuple[str, ...],
         after: tuple[str, ...]) -> dict:
    return {"kinds": [{"name": "block", "container": container, "count": 0,
                       "branches": [{"name": n, "module": m, "norms": list(norms)} for n, (m, norms) in branches.items()]}],
            "top": {"before": list(before), "after": list(after)}}


# The tables of the families whose folders predate the manifest's block table, by family name:
# what their graphs record (one kind; its count is the config's depth). A family added later
# always writes its table, so it has no entry here.
OLD_MANIFESTS = {
    "official": _old("blocks", {"attn": ("attn", ("norm1",)), "mlp": ("mlp", ("norm2",))},
                     ("x_embedder", "t_embedder", "y_embedder"), ("final_layer",)),
    "diffusers": _old("transformer_blocks", {"attn": ("attn1", ("norm1.norm",)), "mlp": ("ff", ("norm3",))},
                      ("pos_embed",), ("proj_out_1", "norm_out", "proj_out_2")),
    "pixart": _old("transformer_blocks",
                   {"attn": ("attn1", ("norm1",)), "cross": ("attn2", ()), "mlp": ("ff", ("norm2",))},
                   ("pos_embed", "adaln_single", "caption_projection"), ("norm_out", "proj_out")),
}


def old_manifest_table(family: str, depth: int) -> BlockTable | None:
    """The block table of a folder of `family` written before manifests recorded it; None for a
    family that always records its own."""
    raw = OLD_MANIFESTS.get(family)
    if raw is None:
        return None
    raw = {**raw, "kinds": [{**raw["kinds"][0], "count": depth}]}
    return BlockTable.from_dict(raw, "tcgraph.export.blocks", "this is a bug in tcgraph, please report it")
