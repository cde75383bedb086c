"""Output Grams: what forecast weights are fitted from, accumulated while the full model runs.

With O_s a branch's pre-gate output at step s (rows × tokens × D), its output Gram is
`G[s, s', i] = Σ_{rows, D} O_s[·, i, ·] · O_{s'}[·, i, ·]` per token i, an S × S × N tensor
(float64) per branch, summed over images. `tcgraph.plan.learning.forecast` reads every
forecast's normal equations and error from it. Calibration computes the Grams in its own
pass (`calibrate(..., grams_at=...)`), so no branch output is stored past one chunk of images.
"""
from __future__ import annotations

import torch

from tcgraph.names import CacheKey

Grams = dict[CacheKey, torch.Tensor]  # (block, branch) -> G [S, S, N], float64


def _key(name: str) -> CacheKey:
    """`cache.<l>.<branch>` -> (l, branch)."""
    _, block, branch = name.split(".", 2)
    return int(block), branch


def stack_outputs(outs: list[dict[str, torch.Tensor]]) -> dict[CacheKey, torch.Tensor]:
    """Per-step `mixed_step` outputs (cache name -> [R, N, D]) -> (block, branch) -> [S, R, N, D]."""
    return {_key(name): torch.stack([o[name] for o in outs]) for name in outs[0]}


def chunk_grams(outputs: dict[CacheKey, torch.Tensor]) -> Grams:
    """The Grams of one chunk of rows: (block, branch) -> [S, S, N] from outputs [S, R, N, D]."""
    grams = {}
    for key, o in outputs.items():
        o = o.permute(2, 0, 1, 3).flatten(2)  # [N, S, R·D]
        grams[key] = torch.bmm(o, o.transpose(1, 2)).permute(1, 2, 0).double()  # [S, S, N], a chunk in float32
    return grams


def add_grams(total: Grams, outputs: dict[CacheKey, torch.Tensor]) -> Grams:
    """Add one chunk's Grams (from its outputs [S, R, N, D]) to `total`, in place; returns it."""
    for key, g in chunk_grams(outputs).items():
        total[key] = g if key not in total else total[key] + g
    return total
