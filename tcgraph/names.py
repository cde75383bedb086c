"""Names that the plan, the passes, export and the runtimes share: branches and graph I/O.

DESIGN.md ("Graph interface of a variant") fixes them: a variant graph reads `x`, `t`, the
model's conditioning (`y` for class-conditional DiTs) and one `cache.<block>.<branch>` per
cache it reuses; it writes `out` and the caches it refreshes. Dynamic-token branches carry
a second cache, their branch input, `cache.<block>.<branch>.in`. This module imports
nothing of tcgraph, so every layer may use it.
"""
from __future__ import annotations

BRANCHES = ("attn", "mlp")  # the branches of a DiT block, in the order recipes list them

CacheKey = tuple[int, str]  # (block, branch)

X, T, Y, OUT = "x", "t", "y", "out"
MODEL_INPUTS = (X, T, Y)  # the inputs of every variant graph, before its caches

CACHE_PREFIX = "cache."
INPUT_SUFFIX = ".in"  # cache.<l>.<branch>.in: branch input of the cached rows (dynamic actions)


def cache_name(block: int, branch: str) -> str:
    """Graph I/O name of a cache tensor, as DESIGN.md fixes it."""
    return f"{CACHE_PREFIX}{block}.{branch}"


def input_cache_name(block: int, branch: str) -> str:
    """Graph I/O name of a branch-input cache (`cache.3.attn.in`), read and written by dynamic actions."""
    return cache_name(block, branch) + INPUT_SUFFIX


def is_cache(name: str) -> bool:
    return name.startswith(CACHE_PREFIX)
