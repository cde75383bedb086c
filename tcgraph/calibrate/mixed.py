"""A differentiable forward that blends each branch's fresh output with its cache.

Both methods train on the same relaxation of a static plan. For every branch of every
block, with `w` the weight of the fresh value:

    used = w · fresh + (1 − w) · cache,        h = h + gate(c_t) · used

Learning-to-Cache uses one scalar `w = sigmoid(g)` per (step, block, branch); TokenCache's
superposition objective uses one `w` per token (shape `(N, 1)`; a branch that writes other
streams' rows too gives them weight 1). `w = 0.0` or `1.0` given
as Python floats are the hard actions reuse and compute (the unused side is not computed),
so the same function also evaluates a 0/1 plan. `used` is what the next step would find in
the cache, which is how a chain of cache steps is relaxed. A hard partial action is `Rows`
(the image tokens it recomputes): exactly the 0/1 token mask, but a branch that works on each
row alone (an MLP, a cross-attention: `BranchSpec.attention` is None) runs on those rows only.

The block loop is the model adapter's (`tcgraph.models.adapter.run_blocks`), the same one
the eager reference of the passes runs: this function only says what each branch contributes.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from tcgraph.models.adapter import BranchInput, adapter_for, run_blocks
from tcgraph.names import cache_name



class Rows:
    """The weight of a hard partial action: the image tokens recomputed, every other row reused."""

    def __init__(self, indices) -> None:
        self.indices = tuple(int(i) for i in indices)


Weight = float | torch.Tensor | Rows


def mixed_step(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
               weights: dict[str, Weight], caches: dict[str, torch.Tensor]
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One model evaluation with blended branches; returns (output, `used` value per branch).

    `weights` maps `cache.<l>.<branch>` to w (a branch not named computes, w = 1); a branch
    with w != 1 needs its entry in `caches`.
    """
    used: dict[str, torch.Tensor] = {}
    rowwise: dict | None = None

    def branch(block: int, name: str, u: Callable[[], torch.Tensor], fn: nn.Module) -> torch.Tensor:
        nonlocal rowwise
        key = cache_name(block, name)
        w = weights.get(key, 1.0)
        if isinstance(w, Rows):
            if rowwise is None:
                rowwise = _rowwise(model)
            rows = u.token_rows(w.indices)
            value = caches[key].clone()
            value[:, rows] = fn(u()[:, rows]) if rowwise[(block, name)] else fn(u())[:, rows]
            used[key] = value
            return value
        if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] != u.total:
            w = _all_rows(w, u)
        if isinstance(w, float) and w == 0.0:
            value = caches[key]
        else:
            fresh = fn(u())
            value = fresh if isinstance(w, float) and w == 1.0 else w * fresh + (1 - w) * caches[key]
        used[key] = value
        return value

    out = run_blocks(model, x, t, y, branch)
    return out, used


def _all_rows(w: torch.Tensor, u: BranchInput) -> torch.Tensor:
    """A per-token weight of the image tokens [N, 1] as one of every row of a branch that writes other
    streams' rows too: those are always recomputed (weight 1), as its partial and dynamic actions do."""
    full = torch.ones(u.total, 1, dtype=w.dtype, device=w.device)
    full[u.image] = w
    return full


def _rowwise(model: nn.Module) -> dict[tuple[int, str], bool]:
    """(block, branch) -> whether the branch works on each of its rows alone (no self-attention)."""
    adapter = adapter_for(model)
    return {(l, spec.name): spec.attention is None
            for l, (_, kind) in enumerate(adapter.block_table(model)) for spec in kind.branches}
