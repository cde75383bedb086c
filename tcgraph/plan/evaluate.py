"""How good and how cheap a sequence of recipes is, before anything is exported.

- `speedup_of`: FLOP-predicted speedup over computing everything (as `plan_flops`; partial
  branches count at their k).
- `plan_error`: mean guided-eps MSE per step of a hard plan on calibration trajectories,
  teacher-forced (each step starts from the full model's state), caches carried from step
  to step as the graphs carry them; full steps count 0. Every learned planner scores its
  candidates with it.
"""
from __future__ import annotations

from typing import Sequence

import torch

from tcgraph.calibrate import Trajectories, mixed_step
from tcgraph.errors import TcgraphError
from tcgraph.models.dit import DiT, DiTConfig
from tcgraph.names import cache_name
from tcgraph.plan.flops import recipe_flops
from tcgraph.plan.plan import COMPUTE, Recipe


def speedup_of(cfg: DiTConfig, recipes: Sequence[Recipe]) -> float:
    """FLOP-predicted speedup of `recipes` (one per step) over computing everything."""
    full = recipe_flops(cfg, Recipe.uniform(recipes[0].depth, COMPUTE), 1)
    return full * len(recipes) / sum(recipe_flops(cfg, r, 1) for r in recipes)


def token_mask(indices: Sequence[int], n: int) -> torch.Tensor:
    m = torch.zeros(n, 1)
    m[list(indices)] = 1.0
    return m


def recipe_weights(recipe: Recipe, num_tokens: int) -> dict[str, float | torch.Tensor]:
    """`mixed_step` weights that run `recipe` exactly: 1.0 compute, 0.0 reuse, a 0/1 token mask for partial."""
    out: dict[str, float | torch.Tensor] = {}
    for l, br, a in recipe.items():
        if a.kind not in ("compute", "reuse", "partial"):
            raise TcgraphError(f"block {l} {br}: {a.kind} actions have no static token mask to evaluate")
        out[cache_name(l, br)] = 1.0 if a.kind == "compute" else (0.0 if a.kind == "reuse" else
                                                                  token_mask(a.indices, num_tokens))
    return out


@torch.no_grad()
def plan_error(model: DiT, traj: Trajectories, recipes: Sequence[Recipe]) -> float:
    """Mean eps MSE per step of a hard plan on `traj` (see the module docstring)."""
    rows = torch.arange(traj.num_images)
    n = model.config.num_tokens
    caches: dict[str, torch.Tensor] = {}
    total = 0.0
    for s, recipe in enumerate(recipes):
        if recipe.is_full:
            _, used = mixed_step(model, *traj.model_inputs(s, rows), {}, {})
        else:
            out, used = mixed_step(model, *traj.model_inputs(s, rows), recipe_weights(recipe, n), caches)
            total += torch.mean((traj.eps_of(out) - traj.eps[s]) ** 2).item()
        caches = dict(used)
    return total / len(recipes)
