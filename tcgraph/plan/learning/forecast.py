"""Forecasting inside the learned planners: which cached branches forecast, with which weights.

A learned planner (l2c, tokencache, tokencache+l2c) first chooses what each branch does at
each step with reuse and partial actions only. Here every such cached (step, block, branch)
whose branch has a computed output before it may become `forecast(n)`
(n ≤ `points`; where fewer outputs exist yet, the missing entries get weight 0), with least-squares weights per (step, block, branch)
fitted on the training trajectories, where that is better on the held-out trajectories.

Everything needed is in the **output Grams** of each branch: with O_s the full model's
pre-gate branch output at step s (teacher-forced along the calibration trajectories),
`G[s, s', i] = Σ_{rows, D} O_s[·, i, ·] · O_{s'}[·, i, ·]` per token i, an S × S × N tensor per
branch accumulated over calibration chunks. Summed over tokens it gives the normal equations
of any forecast (history steps h, target s: `G[h, h] w = G[h, s]`) and its squared error
`G[s,s] − 2 wᵀG[h,s] + wᵀG[h,h]w`; reuse is w = 1 on the newest entry; a partial step's error
counts only the tokens it does not recompute. So trying every forecast costs one forward per
step and image, and no branch output is stored (the S × S × N Grams are small).

Decisions are per branch (a branch's history does not depend on other branches) and per
recipe (every step of one recipe decides alike, so forecasting adds no variant), scored over
the whole schedule: a forecast step is not a computing step, so it is not a history entry of
later forecasts. `--max-cache-mb` caps the history memory: branches whose forecasts gain least
per extra history byte go back to their original actions until the plan fits.

A branch's Gram has one entry per row of its output, in the layout's row order (a joint
attention's text rows, then its image rows; a text MLP's text rows): the normal equations sum
over all of them, and a partial step recomputes every text row and its kept image rows
(`image_rows`), so only the image rows it does not keep count as its error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tcgraph.calibrate import Trajectories, add_grams, mixed_step, stack_outputs
from tcgraph.errors import TcgraphError
from tcgraph.models.official.dit import DiT
from tcgraph.names import CacheKey, branch_key
from tcgraph.plan.learning.extrapolate import solve_weights
from tcgraph.plan.plan import Action, Recipe, forecast
from tcgraph.progress import SILENT, Phase

MARGIN = 0.02  # a forecast replaces an action only if its held-out error is this much lower (relative)


@torch.no_grad()
def output_grams(model: DiT, traj: Trajectories, *, chunk: int = 4, phase: Phase = SILENT) -> dict[CacheKey, torch.Tensor]:
    """(block, branch) -> G [S, S, N] (float64) of the full model's branch outputs on `traj` (see the module
    docstring), for every branch of the model's blocks (`ModelConfig.branches`): the Grams calibration kept
    for exactly these images (`calibrate(..., grams_at=...)`), else one more pass over them."""
    kept = traj.output_grams()
    if kept is not None:
        return kept
    grams: dict[CacheKey, torch.Tensor] = {}
    for lo in range(0, traj.num_images, chunk):
        rows = torch.arange(lo, min(lo + chunk, traj.num_images))
        outs = []
        for s in range(traj.num_steps):
            outs.append(mixed_step(model, *traj.model_inputs(s, rows), {}, {})[1])
            phase.tick()
        add_grams(grams, stack_outputs(outs))
    return grams


@dataclass
class Choice:
    step: int
    key: CacheKey
    action: Action  # the forecast
    replaced: Action  # what it replaces
    weights: tuple[float, ...]
    held_error: float  # held-out squared error of the forecast (summed over rows, tokens, D)
    replaced_error: float  # ... of reusing the newest history entry instead


def _error(g: torch.Tensor, hist: list[int], s: int, w: torch.Tensor) -> float:
    """Σ ||Σ_j w_j O_hist[j] − O_s||² from a token-summed Gram `g` [S, S]."""
    h = torch.tensor(hist)
    return float(g[s, s] - 2 * w @ g[h, s] + w @ g[h][:, h] @ w)


def _current_error(gt: torch.Tensor, newest: int, s: int, action: Action, image: slice | None = None) -> float:
    """Held-out error of reuse / partial at step s with the newest history entry at `newest` ([S, S, rows]
    Gram); `image`: where the image rows lie among the branch's rows (None: every row is an image row)."""
    per_token = gt[newest, newest] - 2 * gt[newest, s] + gt[s, s]  # [rows]
    if action.kind == "partial":
        start = 0 if image is None else image.start
        keep = torch.zeros_like(per_token, dtype=torch.bool)
        if image is not None:  # a partial step recomputes every row of the other streams
            keep[:] = True
            keep[image] = False
        keep[[start + i for i in action.indices]] = True
        per_token = per_token.masked_fill(keep, 0.0)
    return float(per_token.sum())


def choose_forecasts(recipes: list[Recipe], train: dict[CacheKey, torch.Tensor], held: dict[CacheKey, torch.Tensor],
                     *, points: int, image_rows=None) -> list[Choice]:
    """The forecasts that lower a branch's held-out error, decided per (recipe, branch): all steps
    that share a recipe keep sharing one, so the plan has no more variants than before.

    For each branch, the distinct cache recipes are tried in order of first use: forecasting
    the branch at every step of that recipe, from min(`points`, the most computed outputs any
    of those steps has) history points (steps with fewer fit weights on the entries they have,
    the others 0), replaces its reuse or partial action there if the
    branch's held-out error summed over the whole schedule drops (a partial step that becomes
    a forecast is no history entry any more, so later steps are counted too). `image_rows(key)`: where
    a branch's image rows lie among its rows (`Layout.image_slice`); None: every row is an image row."""
    if points < 2:
        raise TcgraphError(f"a forecast needs at least 2 history points, got {points}")
    order = list(dict.fromkeys(recipes))
    choices: list[Choice] = []
    for key in sorted(train, key=branch_key):
        actions = [r.action(*key) for r in recipes]
        image = None if image_rows is None else image_rows(key)
        best, _ = _schedule_error(actions, train[key], held[key], image)
        for group in order:
            steps = [s for s, r in enumerate(recipes) if r == group]
            if actions[steps[0]].kind not in ("reuse", "partial"):
                continue
            if not any(a.computes for a in actions[:steps[0]]):
                continue
            n = min(points, max(sum(1 for a in actions[:s] if a.computes) for s in steps))
            trial = list(actions)
            for s in steps:
                trial[s] = forecast(n)
            err, _ = _schedule_error(trial, train[key], held[key], image)
            if err < best * (1 - MARGIN):
                best, actions = err, trial
        _, per_step = _schedule_error(actions, train[key], held[key], image)
        original = [r.action(*key) for r in recipes]
        for s, (w, err, cur) in per_step.items():
            choices.append(Choice(s, key, actions[s], original[s], w, err, cur))
    return choices


def _schedule_error(actions: list[Action], train: torch.Tensor, held: torch.Tensor, image: slice | None = None
                    ) -> tuple[float, dict[int, tuple[tuple[float, ...], float, float]]]:
    """A branch's held-out squared error summed over its cached steps, and per forecast step
    (weights fitted on `train`, its held-out error, the held-out error reuse would have)."""
    gt, gh = train.sum(-1), held.sum(-1)
    history: list[int] = []
    total, per_step = 0.0, {}
    for s, action in enumerate(actions):
        if action.kind == "forecast":
            if not history:  # an earlier forecast took the only entry this one would have
                return math.inf, {}
            hist = history[:action.points]  # fewer while fewer exist: the missing ones get weight 0
            h = torch.tensor(hist)
            w = torch.tensor(solve_weights(gt[h][:, h], gt[h, s]), dtype=torch.float64)
            err = _error(gh, hist, s, w)
            padded = tuple(float(v) for v in w) + (0.0,) * (action.points - len(hist))
            per_step[s] = (padded, err, _current_error(held, history[0], s, Action("reuse"), image))
            total += err
        elif action.kind in ("reuse", "partial"):
            total += _current_error(held, history[0], s, action, image)
        if action.computes:
            history.insert(0, s)
    return total, per_step


def apply_choices(recipes: list[Recipe], choices: list[Choice]) -> tuple[tuple[Recipe, ...], dict]:
    """The recipes with `choices` made, and their forecast weights (`Plan.weights`)."""
    actions = [[list(acts) for acts in r.actions] for r in recipes]
    weights: dict = {}
    for c in choices:
        actions[c.step][c.key[0]][recipes[c.step].block_branches(c.key[0]).index(c.key[1])] = c.action
        weights.setdefault(c.step, {})[c.key] = c.weights
    return tuple(Recipe(tuple(tuple(acts) for acts in a), r.branches) for a, r in zip(actions, recipes)), weights


def cap_history(choices: list[Choice], slot_bytes, budget: int | None) -> list[Choice]:
    """Drop whole branches' forecasts, least held-out gain per extra history byte first, until the
    extra history memory (slots beyond the cache itself, `slot_bytes` each: bytes, or a function of the
    (block, branch), whose rows the layout gives) fits `budget` bytes."""
    if budget is None:
        return choices
    by_key: dict[CacheKey, list[Choice]] = {}
    for c in choices:
        by_key.setdefault(c.key, []).append(c)

    def extra(cs: list[Choice]) -> int:
        slot = slot_bytes(cs[0].key) if callable(slot_bytes) else slot_bytes
        return (max(c.action.points for c in cs) - 1) * slot

    def gain(cs: list[Choice]) -> float:
        return sum(c.replaced_error - c.held_error for c in cs)

    kept = dict(by_key)
    while kept and sum(extra(cs) for cs in kept.values()) > budget:
        worst = min(kept, key=lambda k: gain(kept[k]) / max(extra(kept[k]), 1))
        del kept[worst]
    return [c for c in choices if c.key in kept]
