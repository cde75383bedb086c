"""How good and how cheap a sequence of recipes is, before anything is exported.

- `speedup_of`: FLOP-predicted speedup over computing everything (as `plan_flops`; partial
  branches count at their k).
- `plan_error`: mean guided-eps MSE per step of a hard plan on calibration trajectories,
  teacher-forced (each step starts from the full model's state), caches carried from step
  to step as the graphs carry them; full steps count 0. Every learned planner scores its
  candidates with it.
- `free_running_samples`: the samples a plan makes along a whole sampling run from given
  noise (no teacher forcing): how learned planners choose their final plan, since the
  per-step error can rank plans opposite to their final quality (docs/design.md, measured facts).

Both run a plan through `PlanState`: the caches and, for forecast branches, the history a
plan's graphs carry (the newest computed output first), with `calibrate.mixed_step` doing
the model's work. A forecast branch is `mixed_step`'s reuse of a value computed beforehand,
Σ_j w_j H_j: a forecast does not depend on the step's input.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch

from tcgraph.calibrate import Trajectories, mixed_step
from tcgraph.calibrate.mixed import Rows
from tcgraph.errors import TcgraphError
from tcgraph.models.official.dit import DiT
from tcgraph.models.families import ModelConfig
from tcgraph.names import cache_name
from tcgraph.plan.flops import recipe_flops
from tcgraph.plan.plan import COMPUTE, Plan, Recipe, constant_roles
from tcgraph.sampling import sampler_for
from tcgraph.progress import SILENT, Phase
from tcgraph.sampling.conditioning import Text, take


def speedup_of(cfg: ModelConfig, recipes: Sequence[Recipe], text_length: int = 0) -> float:
    """FLOP-predicted speedup of `recipes` (one per step) over computing everything (`text_length`:
    the plan's, for a text-conditioned model), with the run constants as a `Plan` of them carries
    them: `plan_flops(...)["predicted_speedup"]` of that plan."""
    roles = constant_roles(recipes[0].branches, len(recipes))
    full = Recipe.uniform(recipes[0].depth, COMPUTE, recipes[0].branches)
    baseline = sum(recipe_flops(cfg, replace(full, constants=role), 1, text_length) for role in roles)
    return baseline / sum(recipe_flops(cfg, replace(r, constants=role), 1, text_length)
                          for r, role in zip(recipes, roles))


def token_mask(indices: Sequence[int], n: int) -> torch.Tensor:
    m = torch.zeros(n, 1)
    m[list(indices)] = 1.0
    return m


def recipe_weights(recipe: Recipe, num_tokens: int) -> dict[str, float | Rows]:
    """`mixed_step` weights that run `recipe` exactly: 1.0 compute, 0.0 reuse, the kept tokens for
    partial (`Rows`: their 0/1 token mask, with a row-wise branch run on them only)."""
    out: dict[str, float | Rows] = {}
    for l, br, a in recipe.items():
        if a.kind not in ("compute", "reuse", "partial", "forecast"):
            raise TcgraphError(f"block {l} {br}: {a.kind} actions have no static token mask to evaluate")
        out[cache_name(l, br)] = 1.0 if a.kind == "compute" else (0.0 if a.kind in ("reuse", "forecast") else
                                                                  Rows(a.indices))
    return out


class PlanState:
    """The caches and history a plan carries from step to step, for `mixed_step`.

    `step(model, s, x, t, y)` runs step s of the plan's recipes and returns the model output
    (`y`: the model's conditioning, class ids or a text model's (embeddings, mask)); `weights`
    are the plan's forecast weights (`Plan.weights`). The recipes may be of any model's branches."""

    def __init__(self, recipes: Sequence[Recipe], weights: dict | None = None, num_tokens: int | None = None):
        self.recipes, self.weights = list(recipes), weights or {}
        self.num_tokens = num_tokens
        self.history: dict[str, list[torch.Tensor]] = {}  # cache name -> computed outputs, newest first
        self.depth = {cache_name(*k): max(p, 1) for r in self.recipes for k, p in r.forecasts()}

    def step(self, model: DiT, s: int, x: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
        recipe = self.recipes[s]
        n = self.num_tokens or model.config.num_tokens
        if recipe.is_full:
            out, used = mixed_step(model, x, t, y, {}, {})
        else:
            caches = {}
            for block, branch, a in recipe.items():
                name = cache_name(block, branch)
                if a.kind == "forecast":
                    w = self.weights[s][(block, branch)]
                    caches[name] = sum(wj * h for wj, h in zip(w, self.history[name]))  # missing entries: w = 0
                elif a.reads_cache:
                    caches[name] = self.history[name][0]
            out, used = mixed_step(model, x, t, y, recipe_weights(recipe, n), caches)
        for block, branch, a in recipe.items():
            if a.computes:
                name = cache_name(block, branch)
                entries = self.history.setdefault(name, [])
                entries.insert(0, used[name])
                del entries[self.depth.get(name, 1):]
        return out


@torch.no_grad()
def plan_error(model: DiT, traj: Trajectories, recipes: Sequence[Recipe], weights: dict | None = None) -> float:
    """Mean eps MSE per step of a hard plan on `traj` (see the module docstring); `weights`:
    the forecast weights of a plan that forecasts."""
    rows = torch.arange(traj.num_images)
    state = PlanState(recipes, weights)
    total = 0.0
    for s, recipe in enumerate(recipes):
        out = state.step(model, s, *traj.model_inputs(s, rows))
        if not recipe.is_full:
            total += torch.mean((traj.eps_of(out) - traj.eps[s]) ** 2).item()
    return total / len(recipes)


@torch.no_grad()
def plan_errors(model: DiT, traj: Trajectories, candidates: Sequence[Sequence[Recipe]],
                phase: Phase = SILENT) -> list[float]:
    """`plan_error` of each candidate (hard plans of compute, reuse and partial actions), with every
    model call that candidates share made once: teacher-forced, a step's output depends only on its
    recipe and the recipes since the last full step, so candidates that agree on those share it (a
    full step at the same index always does). `phase` ticks once per step."""
    if any(r.forecasts() for recipes in candidates for r in recipes):  # forecasts read a history: one by one
        return [plan_error(model, traj, recipes) for recipes in candidates]
    rows = torch.arange(traj.num_images)
    n = model.config.num_tokens
    totals = [0.0] * len(candidates)
    states: list[tuple] = [()] * len(candidates)  # the recipes since the last full step: what a step depends on
    caches: dict[tuple, dict[str, torch.Tensor]] = {}
    for s in range(traj.num_steps):
        groups: dict[tuple, list[int]] = {}
        for c, recipes in enumerate(candidates):
            recipe = recipes[s]
            key = ((s, recipe),) if recipe.is_full else states[c] + ((s, recipe),)
            groups.setdefault(key, []).append(c)
        made = {}
        for key, members in groups.items():
            recipe = key[-1][1]
            if recipe.is_full:
                _, used = mixed_step(model, *traj.model_inputs(s, rows), {}, {})
                err = 0.0
            else:
                out, used = mixed_step(model, *traj.model_inputs(s, rows), recipe_weights(recipe, n), caches[key[:-1]])
                err = torch.mean((traj.eps_of(out) - traj.eps[s]) ** 2).item()
            made[key] = used
            for c in members:
                totals[c] += err
                states[c] = key
        caches = made  # only the states some candidate is in live on
        phase.tick()
    return [t / traj.num_steps for t in totals]


@torch.no_grad()
def free_running_samples(model: DiT, plan: Plan, noise: torch.Tensor, y: torch.Tensor | Text,
                         chunk: int = 32) -> torch.Tensor:
    """Samples of `plan` along whole sampling runs from `noise` and conditioning `y` (eager, in
    chunks): class ids, or a text-conditioned model's `Text` (e.g. its calibration trajectories' `y`)."""
    sampler = sampler_for(plan.settings, model.config)
    parts = []
    for lo in range(0, noise.shape[0], chunk):
        state = PlanState(plan.recipes, plan.weights)
        parts.append(sampler.sample(lambda s, x, t, yy: state.step(model, s, x, t, yy),
                                    noise[lo:lo + chunk], take(y, slice(lo, lo + chunk))))
    return torch.cat(parts)
