"""TokenCache's schedule (Lou et al. 2024, arXiv 2409.18523): Two-Phase Round-Robin (TPRR),
the FLOP budget and adaptive block selection, as pure functions of the Cache Predictor's
scores and the blocks' sensitivities (`tcgraph.plan.learning.predictor` learns both).

**Adaptive block selection.** The sensitivity of block l is the held-out eps MSE per cache
step when *only* block l is pruned to the predictor's top `round(keep_ratio · N)` tokens at
every cache step of a probe schedule (a full step every 2 steps, `l2c.rounds(S, 2)`), every
other branch computed. Each block then gets a keep count `k_l` (ratio `k_l / N`; N means
unpruned) by this greedy rule, for a given TPRR schedule and FLOP target: all blocks start
at N; blocks are taken in order of increasing sensitivity (ties: lower index first); the
current block is lowered to the largest k in [floor, N − 1] with which the plan meets the
target, where floor = `ceil(min_keep · N)`; if even the floor misses, it stays at the floor
and the next block is taken. So the least sensitive blocks are pruned first and hardest,
at most one block ends between the floor and N, and the plan prunes no more than the target
needs. FLOPs are `branch_flops` (a partial branch counts attention q/proj/scores on k rows,
K/V on all N rows, cross-attention q/proj/scores on k rows with K/V of the plan's
`text_length` text tokens, and the MLP on k rows; a branch that writes text rows too adds its
L text rows); a block at k = 0 (`min_keep = 0`) is reused.

**Branches.** A block is pruned as a whole by the rule of `tcgraph.plan.learning.pruning`: its
branches that write image rows take `partial(kept)` (a joint branch recomputes its text rows with
the kept image rows), its text-only ones compute, and at k = 0 every branch is reused. Each
branch's FLOPs count its own rows. Sensitivities (`predictor.block_sensitivity`) are measured with
the probed block pruned by this rule.

**TPRR** (docs/design.md), with the project's exact formula:

- rounds (`tprr_rounds`): phase 1 has rounds starting at 0, K1, 2·K1, … below b, each cut
  at b; phase 2 has rounds starting at b, b + K2, …, the last cut at S. A round is its full
  step then its cache steps (C = the round's length − 1). b = 0 means one phase of K2;
  b = S one phase of K1. Every step is in exactly one round, and step 0 is a full step.
- what a cache step does: unpruned blocks compute every branch; a pruned block l makes
  every branch that writes image rows (both of a DiT's, the three of PixArt's) `partial(kept)`
  and computes its text-only ones, or reuses every branch if `kept` is empty.
- the cache "bears" `max_stale` cache steps. A round with C <= max_stale cache steps uses
  the predictor's top-k_l at each cache step (no rotation; the full step refreshes every
  token at least every C + 1 steps).
- round-robin, for a round with C > max_stale: pruned block l rotates which tokens it
  recomputes. With the round's ranking `order` (tokens by score, best first),
  `k' = max(k_l, ceil(N / C))` tokens per cache step (the fewest that can cover N tokens in
  C steps), `m = min(k', ceil((N − k') / (C − 1)))` rotating tokens per step, the *core* =
  `order[:k' − m]` recomputed at every cache step and the *tail* = `order[k' − m:]`
  (N − k' + m tokens); cache step j = 0 … C−1 of the round recomputes
  `core ∪ {tail[(j·m + i) mod len(tail)] : i < m}`. Since C·m >= len(tail), **every token of
  every pruned block is recomputed at least once during the cache steps of every such
  round**, each step recomputes k' >= k_l tokens (the FLOP accounting uses k'), and the
  most important tokens (the core) are never stale.
- the token ranking (bounded variants, see below): a rotated round ranks by the mean
  logits over all cache steps of the rotated rounds of its phase with the same C (one
  ordering, so the slices tile it); a non-rotated cache step ranks by the mean logits of
  its *group*: the cache steps of its phase at the same position j within their rounds.

`b, K1, K2` are given (`tprr=(b, K1, K2)`) or searched: intervals K around the smallest
single-phase interval that can reach the target with every block at the floor, b in
{S/3, S/2, 2S/3} snapped to a multiple of K1 (no cut phase-1 round), plus single-phase
schedules; every candidate gets its own block selection, and the one with the lowest
held-out `plan_error` is kept (the search table is in the plan params).

**Variants.** Partial recipes with different indices are different graphs. A cache step's
recipe is a function of its group: (phase, position j) without rotation, (phase, C, j) with
it; so a schedule has at most 1 + (K1 − 1) + (K2 − 1) + (cut-round groups) variants. When
that exceeds `max_variants`, the non-rotated groups of each phase are merged into one per
phase (one ranking from the phase's mean logits); if it is still over the cap, that TPRR
candidate is refused (searched: skipped; given: an error), since merging rotated positions
would break the round-robin guarantee.


`tprr_choices` is the whole step from scores to recipes for a list of TPRR candidates: the
planner scores its choices by held-out error, benchmarks build plans of the same shape from
untrained scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from tcgraph.errors import TcgraphError
from tcgraph.models.families import ModelConfig
from tcgraph.models.layout import Layout
from tcgraph.names import BRANCHES
from tcgraph.plan.learning.common import block_branches
from tcgraph.plan.learning.evaluate import speedup_of
from tcgraph.plan.learning.pruning import block_actions, block_flops, image_branches
from tcgraph.plan.flops import fixed_flops
from tcgraph.plan.plan import COMPUTE, Recipe, cache_step_variants, constant_roles

TPRR = tuple[int, int, int]  # (b, K1, K2)


#################################################################################
#                                TPRR skeleton                                  #
#################################################################################


@dataclass(frozen=True)
class Round:
    full: int  # the round's full step
    cache: tuple[int, ...]  # its cache steps
    phase: int  # 1 (s < b) or 2


def tprr_rounds(num_steps: int, b: int, k1: int, k2: int) -> list[Round]:
    """Rounds of the two phases: starts 0, K1, … below b (cut at b), then b, b + K2, … (cut at S)."""
    if not 0 <= b <= num_steps:
        raise TcgraphError(f"TPRR boundary b={b} is outside 0..{num_steps} (the step count)")
    if k1 < 1 or k2 < 1:
        raise TcgraphError(f"TPRR rounds need K1, K2 >= 1, got {k1}, {k2}")
    out = []
    for phase, lo, hi, k in ((1, 0, b, k1), (2, b, num_steps, k2)):
        for s0 in range(lo, hi, k):
            out.append(Round(s0, tuple(range(s0 + 1, min(s0 + k, hi))), phase))
    return out


@dataclass(frozen=True)
class Slot:
    """One cache step of a TPRR schedule."""

    step: int
    phase: int
    position: int  # j: index among its round's cache steps
    rotate: int  # C (its round's cache-step count) when round-robin applies, else 0
    group: tuple  # variant key: cache steps with one group share one recipe
    rank: tuple  # ranking key: cache steps whose mean logits give one token order


def tprr_layout(num_steps: int, b: int, k1: int, k2: int, max_stale: int = 2,
                max_variants: int | None = None, branches: tuple[str, ...] = BRANCHES) -> list[Slot]:
    """The cache steps of a TPRR schedule with their variant groups (see the module docstring);
    `branches` the model's (a text model's full steps are two variants, `cache_step_variants`)."""
    slots = []
    for r in tprr_rounds(num_steps, b, k1, k2):
        c = len(r.cache)
        rot = c if c > max_stale else 0
        for j, s in enumerate(r.cache):
            group = (r.phase, rot, j)
            slots.append(Slot(s, r.phase, j, rot, group, (r.phase, rot) if rot else group))
    cap = cache_step_variants(max_variants, branches, num_steps)
    if cap is not None and len({sl.group for sl in slots}) > cap:
        slots = [sl if sl.rotate else Slot(sl.step, sl.phase, sl.position, 0, (sl.phase, 0, -1), (sl.phase, 0, -1))
                 for sl in slots]
        n = len({sl.group for sl in slots})
        if n > cap:
            raise TcgraphError(f"TPRR b={b}, K1={k1}, K2={k2} needs {n + max_variants - cap} distinct variants "
                               "(round-robin rotates "
                               f"the kept tokens at every cache step of a round); max_variants is {max_variants}")
    return slots


def rotation(num_tokens: int, keep: int, cache_steps: int) -> tuple[int, int]:
    """(k', m) of a round-robin round: tokens recomputed per cache step, of which m rotate."""
    n, c = num_tokens, cache_steps
    k_eff = max(keep, math.ceil(n / c))
    if k_eff >= n:
        return n, 0
    return k_eff, min(k_eff, math.ceil((n - k_eff) / (c - 1)))


def kept_tokens(order: Sequence[int], keep: int, rotate: int = 0, position: int = 0) -> tuple[int, ...] | None:
    """Tokens a pruned block recomputes (None = all: the block computes).

    `order` ranks the tokens, most important first; `rotate` is the round's cache-step count
    when round-robin applies (0: plain top-k), `position` the cache step's index in the round.
    """
    n = len(order)
    if keep >= n:
        return None
    if not rotate:
        return tuple(order[:keep])
    k_eff, m = rotation(n, keep, rotate)
    if k_eff >= n:
        return None
    core, tail = list(order[: k_eff - m]), list(order[k_eff - m:])
    return tuple(core + [tail[(position * m + i) % len(tail)] for i in range(m)])


def token_order(scores: torch.Tensor) -> list[int]:
    """Tokens by descending score, ties by lower index."""
    return torch.argsort(-scores.double(), stable=True).tolist()


def tprr_recipes(scores: torch.Tensor, keep: Sequence[int], b: int, k1: int, k2: int, *, max_stale: int = 2,
                 max_variants: int | None = None, branches: tuple | Layout = BRANCHES) -> tuple[Recipe, ...]:
    """The recipes of a TPRR schedule: `scores` `[S, depth, N]` predictor logits, `keep[l]` the
    keep count of block l (N = unpruned), `branches` the model's: a tuple every block has, each
    branch writing the image rows (`ModelConfig.branches` of a DiT or PixArt), or the model's
    `Layout` (`ModelConfig.block_layout()`), whose blocks act by `block_actions`. Pure: the same
    inputs give the same recipes."""
    S, depth, n = scores.shape
    if len(keep) != depth or any(not 0 <= k <= n for k in keep):
        raise TcgraphError(f"need one keep count in 0..{n} per block ({depth}), got {list(keep)}")
    layout = branches if isinstance(branches, Layout) else Layout.image(block_branches(branches, depth))
    if layout.depth != depth:
        raise TcgraphError(f"the layout has {layout.depth} blocks, the scores {depth}")
    names, image = layout.branches(), image_branches(layout)
    slots = tprr_layout(S, b, k1, k2, max_stale, max_variants, names)
    members: dict[tuple, list[int]] = {}
    for sl in slots:
        members.setdefault(sl.rank, []).append(sl.step)
    orders = {key: [token_order(scores[steps, l].mean(0)) for l in range(depth)] for key, steps in members.items()}
    full = Recipe.uniform(depth, COMPUTE, names)
    recipes = [full] * S
    made: dict[tuple, Recipe] = {}
    for sl in slots:
        if sl.group not in made:
            acts = tuple(block_actions(names[l], image[l],
                                       kept_tokens(orders[sl.rank][l], keep[l], sl.rotate, sl.position))
                         for l in range(depth))
            made[sl.group] = Recipe(acts, names)
        recipes[sl.step] = made[sl.group]
    return tuple(recipes)



#################################################################################
#                                 FLOP budget                                   #
#################################################################################


def layout_speedup(cfg: ModelConfig, num_steps: int, slots: Sequence[Slot], keep: Sequence[int],
                   text_length: int = 0) -> float:
    """`speedup_of` of `tprr_recipes(…)` computed from the layout alone (no recipes built), the
    run constants carried as a plan carries them (step 0 projects the text, a full step); each
    block's FLOPs by its own branches and their rows (`ModelConfig.block_layout()`)."""
    n = cfg.num_tokens
    layout = cfg.block_layout()
    names, image = layout.branches(), image_branches(layout)
    # a block's FLOPs depend on its branches and the streams they write alone: blocks of one kind share
    memo: dict[tuple, int] = {}

    def bf(l, k, read):
        key = (layout.blocks[l], k, read)
        if key not in memo:
            memo[key] = block_flops(cfg, l, names[l], image[l], k, text_length, read)
        return memo[key]

    reads = [role == "read" for role in constant_roles(cfg.branches, num_steps)]
    full = {read: fixed_flops(cfg, text_length, read) + sum(bf(l, n, read) for l in range(cfg.depth))
            for read in (False, True)}
    per_rot: dict[tuple[int, bool], int] = {}
    cached = {sl.step for sl in slots}
    total = sum(full[reads[s]] for s in range(num_steps) if s not in cached)
    for sl in slots:
        key = (sl.rotate, reads[sl.step])
        if key not in per_rot:
            ks = [k if k >= n or not sl.rotate else rotation(n, k, sl.rotate)[0] for k in keep]
            per_rot[key] = fixed_flops(cfg, text_length, key[1]) + sum(bf(l, k, key[1]) for l, k in enumerate(ks))
        total += per_rot[key]
    return sum(full[read] for read in reads) / total


def select_blocks(sensitivity: Sequence[float], num_tokens: int, floor: int,
                  speedup: Callable[[list[int]], float], target: float) -> list[int] | None:
    """Greedy block selection (module docstring): keep counts per block, or None if the target is
    out of reach with every block at `floor`. `speedup(keep)` must not increase with any k."""
    n = num_tokens
    keep = [n] * len(sensitivity)
    if speedup(keep) >= target:
        return keep
    for l in sorted(range(len(sensitivity)), key=lambda i: (sensitivity[i], i)):
        keep[l] = floor
        if speedup(keep) < target:
            continue
        lo, hi = floor, n - 1  # speedup(lo) meets the target; find the largest k that does
        while lo < hi:
            mid = (lo + hi + 1) // 2
            keep[l] = mid
            if speedup(keep) >= target:
                lo = mid
            else:
                hi = mid - 1
        keep[l] = lo
        return keep
    return None


#################################################################################
#                                 TPRR search                                   #
#################################################################################


def keep_floor(cfg: ModelConfig, min_keep: float) -> int:
    """The lowest keep count of a pruned block: ceil(min_keep · N), at most N − 1."""
    return min(math.ceil(min_keep * cfg.num_tokens - 1e-9), cfg.num_tokens - 1)


def floor_speedup(cfg: ModelConfig, num_steps: int, tprr: TPRR, min_keep: float, max_stale: int,
                  max_variants: int | None, text_length: int = 0) -> float:
    """The most a TPRR schedule can reach: every block at the floor (0.0 when over the variant cap)."""
    try:
        slots = tprr_layout(num_steps, *tprr, max_stale, max_variants, cfg.branches)
    except TcgraphError:
        return 0.0
    return layout_speedup(cfg, num_steps, slots, [keep_floor(cfg, min_keep)] * cfg.depth, text_length)


def tprr_candidates(cfg: ModelConfig, num_steps: int, target: float, min_keep: float, max_stale: int,
                    max_variants: int | None, text_length: int = 0) -> list[tuple[int, int, int]]:
    """(b, K1, K2) to try: K around the smallest single-phase K that reaches `target` at the floor."""
    S = num_steps
    kf = next((k for k in range(2, S + 1)
               if floor_speedup(cfg, S, (0, k, k), min_keep, max_stale, max_variants, text_length) >= target),
              None)
    if kf is None:
        raise unreachable(cfg, S, target, min_keep, max_stale, max_variants, text_length=text_length)
    ks = [k for k in (kf - 1, kf, kf + 1, kf + 2) if 2 <= k <= S]
    out = [(0, k, k) for k in ks]
    for k1 in ks:
        for k2 in ks:
            if k1 == k2:
                continue
            for frac in (1 / 3, 1 / 2, 2 / 3):
                b = max(k1, round(S * frac / k1) * k1)
                if b < S and (b, k1, k2) not in out:
                    out.append((b, k1, k2))
    return out


def tprr_search_space(cfg: ModelConfig, num_steps: int, target: float, *, min_keep: float, max_stale: int,
                      max_variants: int | None, tprr: TPRR | None = None, text_length: int = 0) -> list[TPRR]:
    """The TPRR candidates a planner tries: the given `tprr` (checked: within the variant cap and
    able to reach `target` at the floor) or `tprr_candidates`. Cheap: call it before learning."""
    if tprr is None:
        return tprr_candidates(cfg, num_steps, target, min_keep, max_stale, max_variants, text_length)
    tprr_layout(num_steps, *tprr, max_stale, max_variants, cfg.branches)
    if floor_speedup(cfg, num_steps, tprr, min_keep, max_stale, max_variants, text_length) < target:
        raise unreachable(cfg, num_steps, target, min_keep, max_stale, max_variants, tprr, text_length=text_length)
    return [tuple(tprr)]


def unreachable(cfg: ModelConfig, S: int, target: float, min_keep: float, max_stale: int, max_variants: int | None,
                tprr: TPRR | None = None, *, text_length: int = 0) -> TcgraphError:
    """The error for a target no TPRR schedule (or the given one) reaches with every block at the floor."""
    if tprr is not None:
        best = floor_speedup(cfg, S, tprr, min_keep, max_stale, max_variants, text_length)
        where = f"TPRR b={tprr[0]}, K1={tprr[1]}, K2={tprr[2]}"
    else:
        best = max(floor_speedup(cfg, S, (0, k, k), min_keep, max_stale, max_variants, text_length)
                   for k in range(1, S + 1))
        where = f"{S} steps of this model"
    return TcgraphError(f"a predicted speedup of {target}x is out of reach for {where} with every block kept at "
                        f"min_keep={min_keep} (at most {best:.2f}x); ask for less, lower --min-keep or use longer "
                        "rounds")


#################################################################################
#                        Scores -> recipes, per TPRR candidate                  #
#################################################################################


@dataclass(frozen=True)
class TprrChoice:
    """One TPRR candidate after block selection: its keep counts and recipes, or why it was skipped."""

    tprr: TPRR
    keep: list[int] | None = None
    recipes: tuple[Recipe, ...] | None = None
    predicted_speedup: float | None = None
    skipped: str | None = None


def tprr_choices(cfg: ModelConfig, scores: torch.Tensor, sensitivity: Sequence[float], target: float,
                 candidates: Sequence[TPRR], *, min_keep: float, max_stale: int,
                 max_variants: int | None, text_length: int = 0) -> list[TprrChoice]:
    """Per candidate (b, K1, K2): greedy block selection for `target` from `sensitivity`, then the
    TPRR recipes of `scores` (`[S, depth, N]` predictor logits) for the model's layout, FLOPs at
    `text_length` text tokens. Pure; a candidate over the variant cap or out of reach at the floor
    comes back with `skipped` set."""
    S, n = scores.shape[0], cfg.num_tokens
    floor = keep_floor(cfg, min_keep)
    out = []
    for tp in candidates:
        try:
            slots = tprr_layout(S, *tp, max_stale, max_variants, cfg.branches)
        except TcgraphError as e:
            out.append(TprrChoice(tuple(tp), skipped=str(e)))
            continue
        keep = select_blocks(sensitivity, n, floor,
                             lambda k, sl=slots: layout_speedup(cfg, S, sl, k, text_length), target)
        if keep is None:
            out.append(TprrChoice(tuple(tp), skipped="out of reach with every block at the floor"))
            continue
        recipes = tprr_recipes(scores, keep, *tp, max_stale=max_stale, max_variants=max_variants,
                               branches=cfg.block_layout())
        sp = speedup_of(cfg, recipes, text_length)
        if sp < target * (1 - 1e-9):
            raise TcgraphError(f"TPRR {tuple(tp)}: the recipes reach {sp}x but the layout predicted >= {target}x; "
                               "this is a tcgraph bug: please report it with the plan options")
        out.append(TprrChoice(tuple(tp), keep, recipes, sp))
    return out
