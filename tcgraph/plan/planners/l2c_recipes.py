"""A trained L2C router's probabilities turned into recipes: by a threshold, or by a FLOP-predicted
speedup target (the least important branches reused first), with the cache steps grouped into at
most `max_variants` distinct recipes (`tcgraph.plan.planners.l2c`)."""
from __future__ import annotations

import math

import torch

from tcgraph.errors import TcgraphError
from tcgraph.models.families import ModelConfig
from tcgraph.names import BRANCHES
from tcgraph.plan.flops import branch_flops, fixed_flops
from tcgraph.plan.learning.common import cache_steps, max_speedup
from tcgraph.plan.plan import COMPUTE, REUSE, Recipe, cache_step_variants, constant_roles


def _branches_of(probs: torch.Tensor, branches: tuple[str, ...]) -> tuple[str, ...]:
    if probs.shape[-1] != len(branches):
        raise TcgraphError(f"router probabilities have {probs.shape[-1]} entries per block, the model's branches "
                           f"are {list(branches)}")
    return tuple(branches)


def group_steps(probs: torch.Tensor, steps: list[int], max_groups: int | None) -> list[list[int]]:
    """Merge cache steps with similar router probabilities (Ward linkage) into at most `max_groups`."""
    groups = [[s] for s in steps]
    if max_groups is None:
        return groups
    vec = {s: probs[s].flatten().double() for s in steps}

    def mean(gr):
        return torch.stack([vec[s] for s in gr]).mean(0)

    while len(groups) > max_groups:
        best, pair = math.inf, (0, 1)
        means = [mean(gr) for gr in groups]
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                na, nb = len(groups[i]), len(groups[j])
                cost = na * nb / (na + nb) * torch.sum((means[i] - means[j]) ** 2).item()
                if cost < best:
                    best, pair = cost, (i, j)
        i, j = pair
        groups[i] = sorted(groups[i] + groups[j])
        del groups[j]
    return groups


def _recipes_from_groups(depth: int, num_steps: int, groups: list[list[int]],
                         computes: dict[int, set[tuple[int, int]]], branches: tuple[str, ...]) -> tuple[Recipe, ...]:
    """Full steps everywhere but at the cache steps of `groups`, which compute the (block, branch
    index) pairs of `computes[group]` and reuse the others."""
    full = Recipe.uniform(depth, COMPUTE, branches)
    recipes = [full] * num_steps
    for gi, gr in enumerate(groups):
        rec = Recipe(tuple(tuple(COMPUTE if (l, j) in computes[gi] else REUSE for j in range(len(branches)))
                           for l in range(depth)), branches)
        for s in gr:
            recipes[s] = rec
    return tuple(recipes)


def recipes_for_threshold(probs: torch.Tensor, interval: int, threshold: float,
                          max_variants: int | None = None, branches: tuple[str, ...] = BRANCHES
                          ) -> tuple[Recipe, ...]:
    """Compute a branch where the (group-mean) probability exceeds `threshold`; `probs` is
    `[S, depth, len(branches)]`, `branches` the model's (`ModelConfig.branches`)."""
    S, depth = probs.shape[0], probs.shape[1]
    branches = _branches_of(probs, branches)
    groups = group_steps(probs, cache_steps(S, interval), cache_step_variants(max_variants, branches, S))
    computes = {}
    for gi, gr in enumerate(groups):
        m = probs[gr].mean(0)
        computes[gi] = {(l, j) for l in range(depth) for j in range(len(branches)) if m[l, j].item() > threshold}
    return _recipes_from_groups(depth, S, groups, computes, branches)


def recipes_for_target(cfg: ModelConfig, probs: torch.Tensor, interval: int, target: float,
                       max_variants: int | None = None, *, text_length: int = 0) -> tuple[Recipe, ...]:
    """Reuse the least important (group, block, branch) first until the predicted speedup reaches `target`
    (FLOPs of the model's branches, a cross branch's at `text_length` text tokens, its keys and values
    of the text projected at step 0 only, as the plan carries them)."""
    S, depth = probs.shape[0], probs.shape[1]
    branches = _branches_of(probs, cfg.branches)
    groups = group_steps(probs, cache_steps(S, interval), cache_step_variants(max_variants, branches, S))
    reads = [role == "read" for role in constant_roles(branches, S)]
    per_branch = {read: [branch_flops(cfg, br, COMPUTE, text_length, read) for br in branches] for read in (False, True)}
    total = sum(fixed_flops(cfg, text_length, read) + depth * sum(per_branch[read]) for read in reads)
    budget = total / target  # total FLOPs allowed
    items = []
    for gi, gr in enumerate(groups):
        m = probs[gr].mean(0)
        items += [(m[l, j].item(), gi, l, j) for l in range(depth) for j in range(len(branches))]
    computes = {gi: {(l, j) for l in range(depth) for j in range(len(branches))} for gi in range(len(groups))}
    for _, gi, l, j in sorted(items):
        if total <= budget * (1 + 1e-12):
            break
        computes[gi].discard((l, j))
        total -= sum(per_branch[reads[s]][j] for s in groups[gi])
    if total > budget * (1 + 1e-12):
        raise TcgraphError(f"interval {interval} cannot reach a predicted {target}x even reusing every branch "
                           f"(at most {max_speedup(cfg, S, interval, text_length):.2f}x); use a longer interval")
    return _recipes_from_groups(depth, S, groups, computes, branches)


#################################################################################
#                                   Planner                                     #
#################################################################################
