"""TokenCache (Lou et al. 2024, arXiv 2409.18523), learned data-free on one machine.

Three parts, as DESIGN.md's TokenCache section names them; the definitions below are the
ones the code and the tests follow.

**Cache Predictor.** Input-invariant, timestep-variant importance logits `g[s, l, i]`, one
per (step, block, token), shape `[S, depth, N]`. One score per token is *shared by both
branches of a block* (attention and MLP of block l keep the same tokens), so a pruned
block is one token set per step. Training reuses Learning-to-Cache's machinery
(`l2c.fit_logits` and `l2c.round_loss`, teacher-forced calibration trajectories, `calibrate.mixed_step`): a
training round is one full step `s0` (fills every cache, no grad) followed by the next
`train_window − 1` steps, for every `s0` in 0 … S−2, so every step s >= 1 is trained as a
cache step. At a cache step every branch of every block blends per token (the
superposition objective), `used = w ⊙ fresh + (1 − w) ⊙ cache` with
`w = sigmoid(g[s, l])` of shape `(N, 1)`, and

    loss = Σ_s MSE(guided eps, traj.eps[s]) / n + μ · Σ_{s, l} (mean_i w[s, l, i] − r)² / n

with r the target keep ratio (`keep_ratio`) and μ = `mu` × the eps MSE of reusing every
branch at a cache step (the data's own scale, from `l2c.lambda_unit`). Model weights are
frozen; only g moves. The kept tokens of a (step, block) at keep count k are the top-k by
score (ties: lower token index first).

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
K/V on all N rows, and the MLP on k rows); a block at k = 0 (`min_keep = 0`) is reused.

**TPRR** (DESIGN.md), with the project's exact formula:

- rounds (`tprr_rounds`): phase 1 has rounds starting at 0, K1, 2·K1, … below b, each cut
  at b; phase 2 has rounds starting at b, b + K2, …, the last cut at S. A round is its full
  step then its cache steps (C = the round's length − 1). b = 0 means one phase of K2;
  b = S one phase of K1. Every step is in exactly one round, and step 0 is a full step.
- what a cache step does: unpruned blocks compute both branches; a pruned block l makes
  both branches `partial(kept)`, `reuse` if `kept` is empty.
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

Candidates are scored with `plan.evaluate` (`speedup_of`, `plan_error`), shared with
Learning-to-Cache; partial branches run there as 0/1 token masks through `mixed_step`,
exactly the partial semantics of `passes.reference`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from tcgraph.errors import TcgraphError
from tcgraph.models.dit import DiT, DiTConfig
from tcgraph.plan.flops import branch_flops, fixed_flops
from tcgraph.plan.evaluate import plan_error, speedup_of, token_mask
from tcgraph.plan.l2c import (
    calibration_split,
    check_learning_options,
    fit_logits,
    held_out_count,
    lambda_unit,
    rounds,
)
from tcgraph.plan.plan import COMPUTE, REUSE, Action, Plan, Recipe, partial
from tcgraph.names import BRANCHES, cache_name
from tcgraph.sampling import SamplerSettings

DEFAULT_TARGET = 1.5
DEFAULT_MAX_VARIANTS = 8  # full step + 7 cache recipes


@dataclass(frozen=True)
class TokenCacheConfig:
    target_speedup: float = DEFAULT_TARGET  # FLOP-predicted, over computing every branch at every step
    tprr: tuple[int, int, int] | None = None  # (b, K1, K2); searched when None
    keep_ratio: float = 0.5  # r: the predictor's target keep ratio, and the sensitivity probe's
    min_keep: float = 0.25  # floor of a pruned block's keep ratio (0 allows reusing whole blocks)
    max_stale: int = 2  # cache steps a round may have before round-robin rotation starts
    max_variants: int | None = DEFAULT_MAX_VARIANTS
    calib_images: int = 48
    held_out: int | None = None  # default: a third of the calibration images
    epochs: int = 8
    batch_images: int = 8
    lr: float = 0.1
    mu: float = 10.0  # keep-ratio penalty, in units of the reuse-everything eps MSE
    train_window: int = 3  # training rounds: a full step then train_window - 1 cache steps
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.target_speedup > 1.0:
            raise TcgraphError(f"target speedup must be > 1, got {self.target_speedup}")
        if self.tprr is not None:
            if len(self.tprr) != 3:
                raise TcgraphError(f"tprr is (b, K1, K2), got {self.tprr!r}")
            b, k1, k2 = self.tprr
            if b < 0 or k1 < 1 or k2 < 1:
                raise TcgraphError(f"tprr needs b >= 0 and K1, K2 >= 1, got b={b}, K1={k1}, K2={k2}")
        if not 0.0 < self.keep_ratio < 1.0:
            raise TcgraphError(f"keep ratio must be in (0, 1), got {self.keep_ratio}")
        if not 0.0 <= self.min_keep < 1.0:
            raise TcgraphError(f"min keep ratio must be in [0, 1), got {self.min_keep}")
        if self.max_stale < 1:
            raise TcgraphError(f"max_stale must be >= 1, got {self.max_stale}")
        check_learning_options(self.calib_images, self.held_out, self.max_variants)
        if self.epochs < 1 or self.batch_images < 1 or self.train_window < 2 or self.mu < 0:
            raise TcgraphError("epochs and batch_images must be >= 1, train_window >= 2 and mu >= 0")

    @property
    def num_held_out(self) -> int:
        return held_out_count(self.calib_images, self.held_out)


def parse_tprr(value) -> tuple[int, int, int]:
    """`"b,K1,K2"` (the CLI's form) or a sequence of three ints."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        out = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        raise TcgraphError(f"tprr must be three integers b,K1,K2, got {value!r}") from None
    if len(out) != 3:
        raise TcgraphError(f"tprr must be three integers b,K1,K2, got {value!r}")
    return out


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
                max_variants: int | None = None) -> list[Slot]:
    """The cache steps of a TPRR schedule with their variant groups (see the module docstring)."""
    slots = []
    for r in tprr_rounds(num_steps, b, k1, k2):
        c = len(r.cache)
        rot = c if c > max_stale else 0
        for j, s in enumerate(r.cache):
            group = (r.phase, rot, j)
            slots.append(Slot(s, r.phase, j, rot, group, (r.phase, rot) if rot else group))
    cap = None if max_variants is None else max_variants - 1
    if cap is not None and len({sl.group for sl in slots}) > cap:
        slots = [sl if sl.rotate else Slot(sl.step, sl.phase, sl.position, 0, (sl.phase, 0, -1), (sl.phase, 0, -1))
                 for sl in slots]
        n = len({sl.group for sl in slots})
        if n > cap:
            raise TcgraphError(f"TPRR b={b}, K1={k1}, K2={k2} needs {n + 1} distinct variants (round-robin rotates "
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


def _order(scores: torch.Tensor) -> list[int]:
    """Tokens by descending score, ties by lower index."""
    return torch.argsort(-scores.double(), stable=True).tolist()


def tprr_recipes(scores: torch.Tensor, keep: Sequence[int], b: int, k1: int, k2: int, *, max_stale: int = 2,
                 max_variants: int | None = None) -> tuple[Recipe, ...]:
    """The recipes of a TPRR schedule: `scores` `[S, depth, N]` predictor logits, `keep[l]` the
    keep count of block l (N = unpruned). Pure: the same inputs give the same recipes."""
    S, depth, n = scores.shape
    if len(keep) != depth or any(not 0 <= k <= n for k in keep):
        raise TcgraphError(f"need one keep count in 0..{n} per block ({depth}), got {list(keep)}")
    slots = tprr_layout(S, b, k1, k2, max_stale, max_variants)
    members: dict[tuple, list[int]] = {}
    for sl in slots:
        members.setdefault(sl.rank, []).append(sl.step)
    orders = {key: [_order(scores[steps, l].mean(0)) for l in range(depth)] for key, steps in members.items()}
    full = Recipe.uniform(depth, COMPUTE)
    recipes = [full] * S
    made: dict[tuple, Recipe] = {}
    for sl in slots:
        if sl.group not in made:
            acts = []
            for l in range(depth):
                kept = kept_tokens(orders[sl.rank][l], keep[l], sl.rotate, sl.position)
                a = COMPUTE if kept is None else (partial(kept) if kept else REUSE)
                acts.append((a, a))
            made[sl.group] = Recipe(tuple(acts))
        recipes[sl.step] = made[sl.group]
    return tuple(recipes)


#################################################################################
#                                 FLOP budget                                   #
#################################################################################


def _block_flops(cfg: DiTConfig, k: int) -> int:
    n = cfg.num_tokens
    a = COMPUTE if k >= n else (REUSE if k == 0 else Action("partial", tuple(range(k))))
    return sum(branch_flops(cfg, br, a) for br in BRANCHES)


def layout_speedup(cfg: DiTConfig, num_steps: int, slots: Sequence[Slot], keep: Sequence[int]) -> float:
    """`speedup_of` of `tprr_recipes(…)` computed from the layout alone (no recipes built)."""
    n = cfg.num_tokens
    memo: dict[int, int] = {}

    def bf(k):
        if k not in memo:
            memo[k] = _block_flops(cfg, k)
        return memo[k]

    fixed = fixed_flops(cfg)
    full = fixed + cfg.depth * bf(n)
    per_rot: dict[int, int] = {}
    total = full * (num_steps - len(slots))
    for sl in slots:
        if sl.rotate not in per_rot:
            ks = [k if k >= n or not sl.rotate else rotation(n, k, sl.rotate)[0] for k in keep]
            per_rot[sl.rotate] = fixed + sum(bf(k) for k in ks)
        total += per_rot[sl.rotate]
    return full * num_steps / total


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
#                              Cache Predictor                                  #
#################################################################################


@dataclass
class PredictorResult:
    keep_ratio: float
    mu: float
    logits: torch.Tensor  # (S, depth, N); the rows of step 0 are unused
    history: list[float] = field(default_factory=list)  # mean training loss per epoch

    def weights(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)


def init_predictor(num_steps: int, depth: int, num_tokens: int, keep_ratio: float, seed: int = 0) -> torch.Tensor:
    """Untrained logits: sigmoid = keep_ratio plus a tiny seeded jitter (a random token ranking)."""
    g = torch.Generator().manual_seed(seed)
    base = math.log(keep_ratio / (1 - keep_ratio))
    return base + 0.01 * torch.randn(num_steps, depth, num_tokens, generator=g)


def training_rounds(num_steps: int, window: int) -> list[tuple[int, list[int]]]:
    """A full step at every s0 < S − 1, then its next `window − 1` steps as cache steps."""
    return [(s0, list(range(s0 + 1, min(s0 + window, num_steps)))) for s0 in range(num_steps - 1)]


def _token_weights(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """(depth, N) weights -> per-branch `(N, 1)` weights, one set per block for both branches."""
    return {cache_name(l, br): w[l].unsqueeze(-1) for l in range(w.shape[0]) for br in BRANCHES}


def mu_unit(model: DiT, traj) -> float:
    """The eps MSE of reusing every branch at a cache step (L2C's λ unit summed over branches)."""
    return lambda_unit(model, traj, 2) * 2 * model.config.depth


def train_predictor(model: DiT, traj, keep_ratio: float, mu: float, *, window: int = 3, epochs: int = 8,
                    batch_images: int = 8, lr: float = 0.1, seed: int = 0, init: torch.Tensor | None = None,
                    progress: Callable[[], None] | None = None) -> PredictorResult:
    """Learn the predictor's logits on `traj` with the superposition objective (eps MSE +
    μ·Σ (mean w − r)²); only the logits move."""
    S, depth, n = traj.num_steps, model.config.depth, model.config.num_tokens
    init = init if init is not None else init_predictor(S, depth, n, keep_ratio, seed)
    logits, history = fit_logits(model, traj, init, training_rounds(S, window), lambda w, s: _token_weights(w[s]),
                                 lambda w, cs: mu * ((w[cs].mean(-1) - keep_ratio) ** 2).sum(), epochs=epochs,
                                 batch_images=batch_images, lr=lr, seed=seed, progress=progress)
    return PredictorResult(keep_ratio, mu, logits, history)


#################################################################################
#                       Errors: hard plans and block probes                     #
#################################################################################


@torch.no_grad()
def block_sensitivity(model: DiT, traj, scores: torch.Tensor, keep_ratio: float,
                      progress: Callable[[], None] | None = None) -> list[float]:
    """Per block: eps MSE per cache step when only that block keeps its top round(keep_ratio·N)
    tokens (both branches) at the cache steps of `l2c.rounds(S, 2)`, everything else computed."""
    from tcgraph.calibrate import mixed_step

    depth, n = model.config.depth, model.config.num_tokens
    k = min(max(round(keep_ratio * n), 1), n - 1)
    rows = torch.arange(traj.num_images)
    err, count = [0.0] * depth, 0
    for s0, cs in rounds(traj.num_steps, 2):
        if not cs:
            continue
        _, caches = mixed_step(model, *traj.model_inputs(s0, rows), {}, {})
        for s in cs:
            count += 1
            for l in range(depth):
                m = token_mask(_order(scores[s, l])[:k], n)
                out, _ = mixed_step(model, *traj.model_inputs(s, rows), {cache_name(l, br): m for br in BRANCHES},
                                    caches)
                err[l] += torch.mean((traj.eps_of(out) - traj.eps[s]) ** 2).item()
                if progress:
                    progress()
    return [e / max(count, 1) for e in err]


#################################################################################
#                                 TPRR search                                   #
#################################################################################


def _floor(cfg: DiTConfig, min_keep: float) -> int:
    return min(math.ceil(min_keep * cfg.num_tokens - 1e-9), cfg.num_tokens - 1)


def _floor_speedup(cfg: DiTConfig, num_steps: int, tprr: tuple[int, int, int], min_keep: float, max_stale: int,
                   max_variants: int | None) -> float:
    """The most a TPRR schedule can reach: every block at the floor (0.0 when over the variant cap)."""
    try:
        slots = tprr_layout(num_steps, *tprr, max_stale, max_variants)
    except TcgraphError:
        return 0.0
    return layout_speedup(cfg, num_steps, slots, [_floor(cfg, min_keep)] * cfg.depth)


def tprr_candidates(cfg: DiTConfig, num_steps: int, target: float, min_keep: float, max_stale: int,
                    max_variants: int | None) -> list[tuple[int, int, int]]:
    """(b, K1, K2) to try: K around the smallest single-phase K that reaches `target` at the floor."""
    S = num_steps
    kf = next((k for k in range(2, S + 1)
               if _floor_speedup(cfg, S, (0, k, k), min_keep, max_stale, max_variants) >= target), None)
    if kf is None:
        raise _unreachable(cfg, S, target, min_keep, max_stale, max_variants)
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


def _unreachable(cfg, S, target, min_keep, max_stale, max_variants, tprr=None) -> TcgraphError:
    if tprr is not None:
        best = _floor_speedup(cfg, S, tprr, min_keep, max_stale, max_variants)
        where = f"TPRR b={tprr[0]}, K1={tprr[1]}, K2={tprr[2]}"
    else:
        best = max(_floor_speedup(cfg, S, (0, k, k), min_keep, max_stale, max_variants) for k in range(1, S + 1))
        where = f"{S} steps of this model"
    return TcgraphError(f"a predicted speedup of {target}x is out of reach for {where} with every block kept at "
                        f"min_keep={min_keep} (at most {best:.2f}x); ask for less, lower --min-keep or use longer "
                        "rounds")


#################################################################################
#                                   Planner                                     #
#################################################################################


def learn_predictor(cfg: TokenCacheConfig, model: DiT, train, held,
                    tick: Callable[[str, int], Callable[[], None]] | None = None) -> tuple[PredictorResult, list[float]]:
    """The target-independent part: the trained Cache Predictor and the per-block sensitivities."""
    tick = tick or (lambda desc, total: (lambda: None))
    S, depth = train.num_steps, model.config.depth
    pred = train_predictor(model, train, cfg.keep_ratio, cfg.mu * mu_unit(model, train), window=cfg.train_window,
                           epochs=cfg.epochs, batch_images=cfg.batch_images, lr=cfg.lr, seed=cfg.seed,
                           progress=tick("train predictor", cfg.epochs * (S - 1)))
    sens = block_sensitivity(model, held, pred.logits, cfg.keep_ratio,
                             progress=tick("block sensitivity", depth * len(rounds(S, 2))))
    return pred, sens


def make_tokencache(cfg: TokenCacheConfig, model: DiT, settings: SamplerSettings,
                    progress: Callable[[str, int], Callable[[], None]] | None = None, traj=None,
                    learned: tuple[PredictorResult, list[float]] | None = None) -> Plan:
    """Calibrate, train the Cache Predictor, measure block sensitivities, pick the TPRR schedule and
    the block keep counts for the target, and return the plan (see the module docstring).

    `traj` and `learned` (from `learn_predictor` on the same trajectories and keep ratio) let
    benchmarks plan several targets from one calibration and one predictor."""

    mcfg = model.config
    S, n, depth = settings.num_steps, mcfg.num_tokens, mcfg.depth
    if S < 2:
        raise TcgraphError("TokenCache needs at least 2 steps")
    target, floor = cfg.target_speedup, _floor(mcfg, cfg.min_keep)
    # out-of-reach targets and impossible schedules are refused before the expensive part
    if cfg.tprr is not None:
        tprr_layout(S, *cfg.tprr, cfg.max_stale, cfg.max_variants)
        if _floor_speedup(mcfg, S, cfg.tprr, cfg.min_keep, cfg.max_stale, cfg.max_variants) < target:
            raise _unreachable(mcfg, S, target, cfg.min_keep, cfg.max_stale, cfg.max_variants, cfg.tprr)
        candidates = [tuple(cfg.tprr)]
    else:
        candidates = tprr_candidates(mcfg, S, target, cfg.min_keep, cfg.max_stale, cfg.max_variants)

    tick = progress or (lambda desc, total: (lambda: None))
    train, held = calibration_split(model, settings, cfg, traj, tick)

    pred, sens = learned if learned is not None else learn_predictor(cfg, model, train, held, tick)
    mu = pred.mu
    scores = pred.logits

    search_tick = tick("TPRR search", len(candidates))
    table, found = [], []
    for tp in candidates:
        row = {"b": tp[0], "K1": tp[1], "K2": tp[2]}
        try:
            slots = tprr_layout(S, *tp, cfg.max_stale, cfg.max_variants)
        except TcgraphError as e:
            table.append({**row, "skipped": str(e)})
            search_tick()
            continue
        keep = select_blocks(sens, n, floor, lambda k, sl=slots: layout_speedup(mcfg, S, sl, k), target)
        if keep is None:
            table.append({**row, "skipped": "out of reach with every block at the floor"})
            search_tick()
            continue
        recipes = tprr_recipes(scores, keep, *tp, max_stale=cfg.max_stale, max_variants=cfg.max_variants)
        sp = speedup_of(mcfg, recipes)
        if sp < target * (1 - 1e-9):  # layout_speedup and the recipes disagree: a bug, not a user error
            raise AssertionError(f"TPRR {tp}: recipes reach {sp}x, the layout said >= {target}x")
        err = plan_error(model, held, recipes)
        table.append({**row, "keep": keep, "predicted_speedup": round(sp, 4), "held_out_error": err,
                      "variants": len(set(recipes))})
        found.append((err, tp, keep, recipes))
        search_tick()
    if not found:
        raise _unreachable(mcfg, S, target, cfg.min_keep, cfg.max_stale, cfg.max_variants, cfg.tprr)
    err, tp, keep, recipes = min(found, key=lambda c: c[0])
    random_scores = init_predictor(S, depth, n, cfg.keep_ratio, cfg.seed)
    random_err = plan_error(
        model, held, tprr_recipes(random_scores, keep, *tp, max_stale=cfg.max_stale, max_variants=cfg.max_variants))
    w = pred.weights()[1:]
    params = {
        "method": "tokencache",
        "b": tp[0], "K1": tp[1], "K2": tp[2],
        "tprr_given": cfg.tprr is not None,
        "target_speedup": target,
        "predicted_speedup": round(speedup_of(mcfg, recipes), 4),
        "keep_counts": keep,
        "keep_ratios": [round(k / n, 4) for k in keep],
        "pruned_blocks": [l for l in range(depth) if keep[l] < n],
        "sensitivity": sens,
        "held_out_error": err,
        "random_choice_error": random_err,  # same schedule and keep counts, random token ranking
        "keep_ratio": cfg.keep_ratio,
        "min_keep": cfg.min_keep,
        "max_stale": cfg.max_stale,
        "max_variants": cfg.max_variants,
        "predictor": {"mu": mu, "mean_weight": round(w.mean().item(), 4), "epochs": cfg.epochs,
                      "final_train_loss": pred.history[-1] if pred.history else None,
                      "first_train_loss": pred.history[0] if pred.history else None, "lr": cfg.lr,
                      "train_window": cfg.train_window, "shared_by": "both branches of a block"},
        "calibration": {"images": cfg.calib_images, "held_out": cfg.num_held_out, "seed": cfg.seed,
                        "batch_images": cfg.batch_images},
        "search": table,
    }
    return Plan(f"tokencache:{target}x", settings, recipes, n, params=params)


def to_dynamic(plan: Plan) -> Plan:
    """The same plan with each `partial(indices)` made `dynamic(k)`: the same schedule and token
    counts, but the tokens chosen per sample in the graph (ToCa-style), for comparison at the
    same compute (plus the score, 2·N·D per branch)."""
    from tcgraph.plan.plan import dynamic

    def swap(a: Action) -> Action:
        return dynamic(a.k) if a.kind == "partial" else a

    recipes = tuple(Recipe(tuple(tuple(swap(a) for a in pair) for pair in r.actions)) for r in plan.recipes)
    params = {**plan.params, "token_choice": "dynamic: per-sample TopK of the branch-input change"}
    return Plan(plan.planner.replace("tokencache", "dynamic", 1), plan.settings, recipes, plan.num_tokens, params)
