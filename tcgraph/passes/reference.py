"""Eager reference of a recipe: a plain Python loop over the blocks of a DiT.

This is the definition the rewritten graphs are checked against, written without fx and
without the passes' code: if a pass is wrong, the two disagree.

A partial branch is defined by what it means, not by how token_prune computes it: run
the whole branch on all tokens and keep the rows of the kept tokens. Each output row of
attention depends only on its own query (keys and values come from all tokens) and the
MLP is row-wise, so those rows are exactly "queries from the kept tokens, keys and values
from all tokens" and "the MLP of the kept tokens"; they replace the same rows of the
cached pre-gate output, and the fresh gate multiplies the result.
"""
from __future__ import annotations

import torch

from tcgraph.models.dit import DiT, modulate
from tcgraph.plan.plan import Recipe, cache_name


@torch.no_grad()
def reference_step(
    model: DiT,
    x: torch.Tensor,
    t: torch.Tensor,
    y: torch.Tensor,
    recipe: Recipe,
    caches: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One model evaluation under `recipe`; returns (output, pre-gate branch outputs computed).

    `caches` maps `cache.<l>.<branch>` to the tensors reused and partial branches read. For
    a partial branch the returned `fresh[key]` is the updated cache (old rows elsewhere).
    """
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, False)
    fresh: dict[str, torch.Tensor] = {}
    for l, block in enumerate(model.blocks):
        mod = block.adaLN_modulation(c).chunk(6, dim=1)
        branches = (
            ("attn", block.attn, block.norm1, mod[0], mod[1], mod[2]),
            ("mlp", block.mlp, block.norm2, mod[3], mod[4], mod[5]),
        )
        for (name, fn, norm, shift, scale, gate), action in zip(branches, recipe.actions[l]):
            key = cache_name(l, name)
            if action.kind == "compute":
                branch_out = fn(modulate(norm(h), shift, scale))
                fresh[key] = branch_out
            elif action.kind == "reuse":
                branch_out = caches[key]
            else:
                branch_out = _partial(fn(modulate(norm(h), shift, scale)), caches[key], action.indices)
                fresh[key] = branch_out
            h = h + gate.unsqueeze(1) * branch_out
    h = model.final_layer(h, c)
    return model.unpatchify(h), fresh


def _partial(full: torch.Tensor, cache: torch.Tensor, indices: tuple[int, ...]) -> torch.Tensor:
    """The cache with the rows of the kept tokens replaced by the fresh branch output's."""
    idx = torch.tensor(indices, dtype=torch.long, device=cache.device)
    new = cache.clone()
    new[:, idx] = full[:, idx]
    return new
