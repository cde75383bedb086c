"""A trained L2C router's probabilities turned into recipes: by a threshold, or by a FLOP-predicted
speedup target (the least important branches reused first), with the cache steps grouped into at
most `max_variants` distinct recipes (`tcgraph.plan.planners.l2c`).

Probabilities are `[S, depth, len(router_branches)]` (`tcgraph.plan.learning.common`): where the
blocks' branches differ, the columns of branches a block lacks are ignored (zero for the grouping,
never a candidate), and each (block, branch) reused saves its own FLOPs, its rows from the layout."""
from __future__ import annotations

import math

import torch

from tcgraph.errors import TcgraphError
from tcgraph.models.families import ModelConfig
from tcgraph.names import BRANCHES
from tcgraph.plan.flops import branch_flops, branch_rows, fixed_flops
from tcgraph.plan.learning.common import block_branches, branch_mask, cache_steps, max_speedup, router_branches
from tcgraph.plan.plan import COMPUTE, REUSE, Recipe, cache_step_variants, constant_roles


def _branches_of(probs: torch.Tensor, branches: tuple) -> tuple[str, ...]:
    """The router's columns (`router_branches`) of the model's `branches`, checked against `probs`."""
    names = router_branches(branches)
    if probs.shape[-1] != len(names):
        raise TcgraphError(f"router probabilities have {probs.shape[-1]} entries per block, the model's branches "
                           f"are {list(names)}")
    return names


def _slots(probs: torch.Tensor, branches: tuple) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """(`probs` with the columns no block has zeroed, the (block, column) pairs that exist)."""
    _branches_of(probs, branches)
    depth, mask = probs.shape[1], branch_mask(branches, probs.shape[1])
    if mask is None:
        return probs, [(l, j) for l in range(depth) for j in range(probs.shape[2])]
    return probs * mask, [(l, j) for l in range(depth) for j in range(probs.shape[2]) if mask[l, j]]


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
                         computes: dict[int, set[tuple[int, int]]], branches: tuple) -> tuple[Recipe, ...]:
    """Full steps everywhere but at the cache steps of `groups`, which compute the (block, router
    column) pairs of `computes[group]` and reuse the others."""
    full = Recipe.uniform(depth, COMPUTE, branches)
    names, per_block = router_branches(branches), block_branches(branches, depth)
    recipes = [full] * num_steps
    for gi, gr in enumerate(groups):
        rec = Recipe(tuple(tuple(COMPUTE if (l, names.index(br)) in computes[gi] else REUSE for br in per_block[l])
                           for l in range(depth)), full.branches)
        for s in gr:
            recipes[s] = rec
    return tuple(recipes)


def recipes_for_threshold(probs: torch.Tensor, interval: int, threshold: float,
                          max_variants: int | None = None, branches: tuple = BRANCHES) -> tuple[Recipe, ...]:
    """Compute a branch where the (group-mean) probability exceeds `threshold`; `probs` is
    `[S, depth, len(router_branches)]`, `branches` the model's (`ModelConfig.branches`)."""
    S, depth = probs.shape[0], probs.shape[1]
    probs, slots = _slots(probs, branches)
    groups = group_steps(probs, cache_steps(S, interval), cache_step_variants(max_variants, branches, S))
    computes = {}
    for gi, gr in enumerate(groups):
        m = probs[gr].mean(0)
        computes[gi] = {(l, j) for l, j in slots if m[l, j].item() > threshold}
    return _recipes_from_groups(depth, S, groups, computes, branches)


def recipes_for_target(cfg: ModelConfig, probs: torch.Tensor, interval: int, target: float,
                       max_variants: int | None = None, *, text_length: int = 0) -> tuple[Recipe, ...]:
    """Reuse the least important (group, block, branch) first until the predicted speedup reaches `target`
    (FLOPs of the model's branches, a cross branch's at `text_length` text tokens, its keys and values
    of the text projected at step 0 only, as the plan carries them)."""
    S, depth, branches = probs.shape[0], probs.shape[1], cfg.branches
    names = _branches_of(probs, branches)
    probs, slots = _slots(probs, branches)
    groups = group_steps(probs, cache_steps(S, interval), cache_step_variants(max_variants, branches, S))
    reads = [role == "read" for role in constant_roles(branches, S)]
    cost = {read: {(l, j): branch_flops(cfg, names[j], COMPUTE, text_length, read, **branch_rows(cfg, l, names[j]))
                   for l, j in slots} for read in (False, True)}
    total = sum(fixed_flops(cfg, text_length, read) + sum(cost[read].values()) for read in reads)
    budget = total / target  # total FLOPs allowed
    items = []
    for gi, gr in enumerate(groups):
        m = probs[gr].mean(0)
        items += [(m[l, j].item(), gi, l, j) for l, j in slots]
    computes = {gi: set(slots) for gi in range(len(groups))}
    for _, gi, l, j in sorted(items):
        if total <= budget * (1 + 1e-12):
            break
        computes[gi].discard((l, j))
        total -= sum(cost[reads[s]][(l, j)] for s in groups[gi])
    if total > budget * (1 + 1e-12):
        raise TcgraphError(f"interval {interval} cannot reach a predicted {target}x even reusing every branch "
                           f"(at most {max_speedup(cfg, S, interval, text_length):.2f}x); use a longer interval")
    return _recipes_from_groups(depth, S, groups, computes, branches)


#################################################################################
#                                   Planner                                     #
#################################################################################
