"""A differentiable forward that blends each branch's fresh output with its cache.

Both methods train on the same relaxation of a static plan. For every branch of every
block, with `w` the weight of the fresh value:

    used = w · fresh + (1 − w) · cache,        h = h + gate(c_t) · used

Learning-to-Cache uses one scalar `w = sigmoid(g)` per (step, block, branch); TokenCache's
superposition objective uses one `w` per token (shape `(N, 1)`; a branch that writes other
streams' rows too gives them weight 1). `w = 0.0` or `1.0` given
as Python floats are the hard actions reuse and compute (the unused side is not computed),
so the same function also evaluates a 0/1 plan. `used` is what the next step would find in
the cache, which is how a chain of cache steps is relaxed.

The block loop is the model adapter's (`tcgraph.models.adapter.run_blocks`), the same one
the eager reference of the passes runs: this function only says what each branch contributes.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from tcgraph.models.adapter import BranchInput, run_blocks
from tcgraph.names import cache_name

Weight = float | torch.Tensor


def mixed_step(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
               weights: dict[str, Weight], caches: dict[str, torch.Tensor]
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One model evaluation with blended branches; returns (output, `used` value per branch).

    `weights` maps `cache.<l>.<branch>` to w (a branch not named computes, w = 1); a branch
    with w != 1 needs its entry in `caches`.
    """
    used: dict[str, torch.Tensor] = {}

    def branch(block: int, name: str, u: Callable[[], torch.Tensor], fn: nn.Module) -> torch.Tensor:
        key = cache_name(block, name)
        w = weights.get(key, 1.0)
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
