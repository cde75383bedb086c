"""The one input every rewrite pass takes besides the graph: what one variant is.

A `RewriteSpec` is a recipe (one action per block and branch) plus what the plan needs the
variant to hand on to later steps: `writes`, the caches it outputs (`cache.<l>.<branch>`),
`input_writes`, the branch-input caches it outputs (`cache.<l>.<branch>.in`, for
branches that some step is dynamic on), and `constant_writes`, the branches whose run
constants it outputs (`cache.<l>.cross.k`/`.v`: the first step of a plan that carries them;
which run constants a step reads, its recipe says). compile builds it from the plan
(`RewriteSpec.of(plan, recipe)`); a pass never sees the plan itself, so a pass can be run
and tested on one variant alone. The checks that need no graph are made here, once.
"""
from __future__ import annotations

from dataclasses import dataclass

from tcgraph.errors import TcgraphError
from tcgraph.names import RUN_CONSTANTS, CacheKey, branch_key, cache_name, input_cache_name
from tcgraph.plan.plan import Plan, Recipe
from tcgraph.plan.recipe import branch_set


def block_order(keys) -> list[CacheKey]:
    """`keys` sorted by block, then branch in recipe order (the order of graph I/O)."""
    return sorted(keys, key=branch_key)


@dataclass(frozen=True)
class RewriteSpec:
    """One variant to rewrite: `recipe`, the caches it writes, the input caches it writes."""

    recipe: Recipe
    writes: tuple[CacheKey, ...] = ()
    input_writes: tuple[CacheKey, ...] = ()
    constant_writes: tuple[CacheKey, ...] = ()
    # where a token action's image rows lie in a branch that also writes other streams' rows:
    # (block, branch) -> (first image row, image rows, all rows); absent: the branch writes image rows only
    token_rows: tuple[tuple[CacheKey, tuple[int, int, int]], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "writes", tuple(block_order(set(map(tuple, self.writes)))))
        object.__setattr__(self, "input_writes", tuple(block_order(set(map(tuple, self.input_writes)))))
        object.__setattr__(self, "constant_writes", tuple(block_order(set(map(tuple, self.constant_writes)))))
        recipe = self.recipe
        for block, branch, action in recipe.items():
            if action.kind == "dynamic" and action.size < 1:
                raise TcgraphError(
                    f"block {block} {branch}: a dynamic action needs k >= 1 (got {action.size}); "
                    "use `reuse` to recompute no token"
                )
            if action.kind == "partial" and (not action.indices or min(action.indices) < 0):
                raise TcgraphError(
                    f"block {block} {branch}: a partial action needs at least one token index, all >= 0 "
                    f"(got {list(action.indices)[:8]}); use `reuse` to recompute no token"
                )
        for block, branch in self.writes:
            if not recipe.has(block, branch):
                raise TcgraphError(f"cannot write {cache_name(block, branch)}: the recipe has {recipe.depth} blocks")
            if not recipe.action(block, branch).computes:
                raise TcgraphError(f"cannot write {cache_name(block, branch)}: the recipe does not compute it")
        for block, branch in self.constant_writes:
            if not (recipe.has(block, branch) and branch in RUN_CONSTANTS):
                raise TcgraphError(f"cannot write run constants of block {block} {branch}: the recipe has "
                                   f"{recipe.depth} blocks with branches {list(branch_set(recipe.branches))}, and only "
                                   f"{list(RUN_CONSTANTS)} branches have run constants")
            if recipe.constants != "write" or recipe.action(block, branch).kind != "compute":
                raise TcgraphError(f"cannot write the run constants of block {block} {branch}: only a plan's "
                                   "first step, computing the branch, writes them")
        alone = [k for k in self.input_writes if k not in self.writes]
        if alone:
            raise TcgraphError(
                f"cannot write {[input_cache_name(*k) for k in alone]}: an input cache is written "
                "beside its branch's output cache, which this recipe does not compute or write"
            )

    def rows_of(self, key: CacheKey) -> tuple[int, int, int] | None:
        """(first image row, image rows, all rows) of a branch writing other streams too, else None."""
        return dict(self.token_rows).get(tuple(key))

    def branch_rows(self, key: CacheKey, indices) -> list[int]:
        """The rows a token action on image tokens `indices` recomputes: for a branch of several
        streams every row of the others, then the image rows of those tokens; else the indices."""
        rows = self.rows_of(key)
        if rows is None:
            return list(indices)
        start, count, total = rows
        return [r for r in range(total) if not start <= r < start + count] + [start + i for i in indices]

    @classmethod
    def of(cls, plan: Plan, recipe: Recipe) -> "RewriteSpec":
        """The spec of `recipe` as a step of `plan`: it writes what later steps of the plan read."""
        layout, rows = plan.block_layout(), plan.stream_rows
        token_rows = []
        for block, branch, action in recipe.items():
            image = layout.image_slice(block, branch, rows)
            total = layout.rows(block, branch, rows)
            if action.kind in ("partial", "dynamic") and image is not None and total != image.stop - image.start:
                token_rows.append(((block, branch), (image.start, image.stop - image.start, total)))
        return cls(recipe, tuple(plan.writes(recipe)), tuple(plan.input_writes(recipe)),
                   tuple(plan.constant_writes(recipe)), tuple(token_rows))
