"""A differentiable forward that blends each branch's fresh output with its cache.

Both methods train on the same relaxation of a static plan. For every branch of every
block, with `w` the weight of the fresh value:

    used = w · fresh + (1 − w) · cache,        h = h + gate(c_t) · used

Learning-to-Cache uses one scalar `w = sigmoid(g)` per (step, block, branch); TokenCache's
superposition objective uses one `w` per token (shape `(N, 1)`). `w = 0.0` or `1.0` given
as Python floats are the hard actions reuse and compute (the unused side is not computed),
so the same function also evaluates a 0/1 plan. `used` is what the next step would find in
the cache, which is how a chain of cache steps is relaxed.
"""
from __future__ import annotations

import torch

from tcgraph.models.dit import DiT, modulate
from tcgraph.names import cache_name

Weight = float | torch.Tensor


def mixed_step(model: DiT, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
               weights: dict[str, Weight], caches: dict[str, torch.Tensor]
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One model evaluation with blended branches; returns (output, `used` value per branch).

    `weights` maps `cache.<l>.<branch>` to w (a branch not named computes, w = 1); a branch
    with w != 1 needs its entry in `caches`.
    """
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, False)
    used: dict[str, torch.Tensor] = {}
    for l, block in enumerate(model.blocks):
        mod = block.adaLN_modulation(c).chunk(6, dim=1)
        for name, fn, norm, (shift, scale, gate) in (("attn", block.attn, block.norm1, mod[0:3]),
                                                    ("mlp", block.mlp, block.norm2, mod[3:6])):
            key = cache_name(l, name)
            w = weights.get(key, 1.0)
            if isinstance(w, float) and w == 0.0:
                value = caches[key]
            else:
                fresh = fn(modulate(norm(h), shift, scale))
                value = fresh if isinstance(w, float) and w == 1.0 else w * fresh + (1 - w) * caches[key]
            used[key] = value
            h = h + gate.unsqueeze(1) * value
    h = model.final_layer(h, c)
    return model.unpatchify(h), used
