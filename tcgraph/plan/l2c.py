"""Learning-to-Cache (Ma et al. 2024, arXiv 2406.01733), learned data-free on one machine.

The plan has a skeleton: every `interval`-th step (0, K, 2K, …) is a full step, the
others are *cache steps*. A router holds one logit `g[s, l, b]` per cache step, block and
branch. Training follows DESIGN.md's L2C section, on calibration trajectories of the model
itself (random noise and labels, no data set):

- a round is one full step followed by its K − 1 cache steps; the full step fills every
  cache with its pre-gate branch outputs (no grad);
- each cache step blends `sigmoid(g)·fresh + (1 − sigmoid(g))·cached` per branch
  (`calibrate.mixed_step`); the blended value is also what the next cache step of the
  round finds in the cache, so chains of cache steps are relaxed the same way;
- loss = MSE(guided eps vs the full model's, at that step) + λ·Σ sigmoid(g); only g moves.

The sampler state at every step is the full model's (teacher forcing): each step's error
is measured where the full trajectory is, as in the paper's training pairs.

A static plan comes from the probabilities: with a threshold (`sigmoid(g) > τ` computes),
or for a FLOP-predicted speedup target by reusing the least important branches first until
the target is met. `--target-speedup` searches intervals and λ and keeps the candidate
with the lowest held-out error of its hard plan. `max_variants` merges cache steps with
similar probabilities (Ward linkage) into one shared recipe, so the number of distinct
graphs stays bounded while the FLOP target is still met.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from tcgraph.errors import TcgraphError
from tcgraph.models.dit import DiT, DiTConfig
from tcgraph.plan.evaluate import plan_error, speedup_of  # noqa: F401 (re-exported)
from tcgraph.plan.flops import branch_flops, fixed_flops
from tcgraph.plan.plan import COMPUTE, REUSE, Plan, Recipe
from tcgraph.names import BRANCHES, cache_name
from tcgraph.sampling import SamplerSettings

# Variant cap used when the user gives none (full step + 5 cache recipes); chosen from the
# sweep in benchmarks/bench_l2c.py (see README, Learning-to-Cache).
DEFAULT_MAX_VARIANTS = 6
LAMBDA_GRID = (0.1, 1.0)  # multiples of the data's own λ unit (see `lambda_unit`)


def check_learning_options(calib_images: int, held_out: int | None, max_variants: int | None) -> None:
    """The checks every learned planner's config shares (L2C, TokenCache)."""
    if max_variants is not None and max_variants < 2:
        raise TcgraphError(f"max_variants must be >= 2 (the full step and one cache recipe), got {max_variants}")
    if calib_images < 3:
        raise TcgraphError(f"need at least 3 calibration images (some held out), got {calib_images}")
    if held_out is not None and not 1 <= held_out < calib_images:
        raise TcgraphError(f"need more calibration images ({calib_images}) than held out ({held_out})")


def held_out_count(calib_images: int, held_out: int | None) -> int:
    """Calibration images held out for model selection: as given, else a third."""
    return held_out if held_out is not None else max(1, calib_images // 3)


def calibration_split(model: DiT, settings: SamplerSettings, cfg, traj, tick):
    """(train, held-out) trajectories of a learned planner's config `cfg` (its `calib_images`,
    `seed`, `num_held_out`): calibrated here, or the given `traj` checked to match."""
    from tcgraph.calibrate import calibrate

    if traj is None:
        step_tick = tick("calibrate", settings.num_steps * math.ceil(cfg.calib_images / 32))
        traj = calibrate(model, settings, cfg.calib_images, seed=cfg.seed, progress=lambda _s: step_tick())
    elif traj.settings != settings or traj.num_images != cfg.calib_images:
        raise TcgraphError("the given calibration trajectories were made for other settings or image counts")
    return traj.split(cfg.num_held_out)


@dataclass(frozen=True)
class L2CConfig:
    target_speedup: float | None = None  # FLOP-predicted; searched over interval and λ
    lam: float | None = None  # absolute λ; with a threshold instead of a target
    threshold: float | None = None  # sigmoid(g) > threshold computes (λ mode; default 0.5)
    max_variants: int | None = DEFAULT_MAX_VARIANTS
    interval: int | None = None  # full step every K steps; searched when None
    calib_images: int = 48
    held_out: int | None = None  # default: a third of the calibration images
    epochs: int = 12
    batch_images: int = 8
    lr: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target_speedup is not None and self.lam is not None:
            raise TcgraphError("give either a target speedup or a λ, not both")
        if self.target_speedup is not None and not self.target_speedup > 1.0:
            raise TcgraphError(f"target speedup must be > 1, got {self.target_speedup}")
        if self.lam is not None and self.lam < 0:
            raise TcgraphError(f"λ must be >= 0, got {self.lam}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise TcgraphError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.threshold is not None and self.target_speedup is not None:
            raise TcgraphError("a threshold applies with --lambda (or --router); a target speedup sets its own")
        if self.interval is not None and self.interval < 2:
            raise TcgraphError(f"interval must be >= 2 (a full step then cache steps), got {self.interval}")
        check_learning_options(self.calib_images, self.held_out, self.max_variants)

    @property
    def num_held_out(self) -> int:
        return held_out_count(self.calib_images, self.held_out)


#################################################################################
#                               Plan skeleton                                   #
#################################################################################


def rounds(num_steps: int, interval: int) -> list[tuple[int, list[int]]]:
    """(full step, its cache steps) for a full step every `interval` steps."""
    return [(s0, list(range(s0 + 1, min(s0 + interval, num_steps)))) for s0 in range(0, num_steps, interval)]


def cache_steps(num_steps: int, interval: int) -> list[int]:
    return [s for _, cs in rounds(num_steps, interval) for s in cs]


def max_speedup(cfg: DiTConfig, num_steps: int, interval: int) -> float:
    """The speedup of reusing every branch at every cache step (FORA with this interval)."""
    full, reuse = Recipe.uniform(cfg.depth, COMPUTE), Recipe.uniform(cfg.depth, REUSE)
    cs = set(cache_steps(num_steps, interval))
    return speedup_of(cfg, [reuse if s in cs else full for s in range(num_steps)])


def candidate_intervals(cfg: DiTConfig, num_steps: int, target: float, margin: float = 1.03) -> list[int]:
    """The smallest interval that reaches `target` with some slack, and the next one."""
    for k in range(2, num_steps + 1):
        if max_speedup(cfg, num_steps, k) >= target * margin:
            return [k, k + 1] if k + 1 <= num_steps else [k]
    best = max_speedup(cfg, num_steps, num_steps)
    raise TcgraphError(f"a predicted speedup of {target}x is out of reach for {num_steps} steps of this model "
                       f"(at most {best:.2f}x with one full step); ask for less")


#################################################################################
#                                 Training                                      #
#################################################################################


@dataclass
class RouterResult:
    interval: int
    lam: float
    logits: torch.Tensor  # (S, depth, 2); rows of full steps are unused
    history: list[float] = field(default_factory=list)  # mean training loss per epoch

    def probs(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)


def init_logits(num_steps: int, depth: int, seed: int = 0) -> torch.Tensor:
    """Untrained router: sigmoid ≈ 0.5 with a tiny seeded jitter (a random ranking)."""
    g = torch.Generator().manual_seed(seed)
    return 0.01 * torch.randn(num_steps, depth, 2, generator=g)


def _weights(p: torch.Tensor) -> dict[str, torch.Tensor]:
    return {cache_name(l, br): p[l, j] for l in range(p.shape[0]) for j, br in enumerate(BRANCHES)}


def _full_caches(model: DiT, traj, step: int, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    from tcgraph.calibrate import mixed_step

    with torch.no_grad():
        _, used = mixed_step(model, *traj.model_inputs(step, rows), {}, {})
    return used


def round_loss(model: DiT, traj, full_step: int, steps: list[int], weights_at, rows: torch.Tensor,
               ) -> tuple[torch.Tensor, int]:
    """Summed eps MSE over the cache steps of one round; `weights_at(s)` gives the branch weights."""
    from tcgraph.calibrate import mixed_step

    caches = _full_caches(model, traj, full_step, rows)
    total = torch.zeros(())
    for s in steps:
        out, caches = mixed_step(model, *traj.model_inputs(s, rows), weights_at(s), caches)
        total = total + torch.mean((traj.eps_of(out) - traj.eps[s, rows]) ** 2)
    return total, len(steps)


def fit_logits(model: DiT, traj, logits: torch.Tensor, work: list[tuple[int, list[int]]],
               weights_of: Callable[[torch.Tensor, int], dict], penalty: Callable[[torch.Tensor, list[int]], torch.Tensor],
               *, epochs: int, batch_images: int, lr: float, seed: int,
               progress: Callable[[], None] | None = None) -> tuple[torch.Tensor, list[float]]:
    """Adam on input-invariant logits over calibration rounds; the model stays frozen.

    Per round `(full step, cache steps)` of `work`, on a random batch of images:
    loss = (Σ eps MSE + penalty(sigmoid(logits), cache steps)) / #cache steps, with the
    blend weights of step s from `weights_of(sigmoid(logits), s)`. Shared by the L2C
    router and TokenCache's predictor. Returns (trained logits, mean loss per epoch).
    """
    model = model.eval().requires_grad_(False)
    logits = logits.clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    history = []
    for _ in range(epochs):
        epoch_loss = 0.0
        for r in torch.randperm(len(work), generator=g).tolist():
            s0, cs = work[r]
            rows = torch.randperm(traj.num_images, generator=g)[:batch_images]
            w = torch.sigmoid(logits)
            mse, n = round_loss(model, traj, s0, cs, lambda s: weights_of(w, s), rows)
            loss = (mse + penalty(w, cs)) / n
            opt.zero_grad()
            loss.backward()
            opt.step()
            epoch_loss += loss.item() / len(work)
            if progress:
                progress()
        history.append(epoch_loss)
    return logits.detach().clone(), history


def train_router(model: DiT, traj, interval: int, lam: float, *, epochs: int = 12, batch_images: int = 8,
                 lr: float = 0.1, seed: int = 0, init: torch.Tensor | None = None,
                 progress: Callable[[], None] | None = None) -> RouterResult:
    """Learn router logits on `traj` (L2C objective: eps MSE + λ·Σ sigmoid(g))."""
    init = init if init is not None else init_logits(traj.num_steps, model.config.depth, seed)
    work = [(s0, cs) for s0, cs in rounds(traj.num_steps, interval) if cs]
    logits, history = fit_logits(model, traj, init, work, lambda w, s: _weights(w[s]),
                                 lambda w, cs: lam * w[cs].sum(), epochs=epochs, batch_images=batch_images,
                                 lr=lr, seed=seed, progress=progress)
    return RouterResult(interval, lam, logits, history)


@torch.no_grad()
def soft_loss(model: DiT, traj, interval: int, logits: torch.Tensor, lam: float) -> float:
    """The training objective on `traj` (all images), per cache step."""
    probs = torch.sigmoid(logits)
    rows = torch.arange(traj.num_images)
    total, count = 0.0, 0
    for s0, cs in rounds(traj.num_steps, interval):
        if cs:
            mse, n = round_loss(model, traj, s0, cs, lambda s: _weights(probs[s]), rows)
            total += mse.item() + lam * probs[cs].sum().item()
            count += n
    return total / count


def lambda_unit(model: DiT, traj, interval: int, rows: int = 8) -> float:
    """The data's scale for λ: the eps MSE of reusing everything at a cache step, per branch."""
    depth = model.config.depth
    sub = torch.arange(min(rows, traj.num_images))
    reuse_all = {cache_name(l, br): 0.0 for l in range(depth) for br in BRANCHES}
    total, count = 0.0, 0
    with torch.no_grad():
        for s0, cs in rounds(traj.num_steps, interval):
            if cs:
                mse, n = round_loss(model, traj, s0, cs[:1], lambda s: reuse_all, sub)
                total, count = total + mse.item(), count + n
    return total / max(count, 1) / (2 * depth)


#################################################################################
#                         From probabilities to a plan                          #
#################################################################################


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
                         computes: dict[int, set[tuple[int, int]]]) -> tuple[Recipe, ...]:
    full = Recipe.uniform(depth, COMPUTE)
    recipes = [full] * num_steps
    for gi, gr in enumerate(groups):
        rec = Recipe(tuple(tuple(COMPUTE if (l, j) in computes[gi] else REUSE for j in range(2)) for l in range(depth)))
        for s in gr:
            recipes[s] = rec
    return tuple(recipes)


def recipes_for_threshold(probs: torch.Tensor, interval: int, threshold: float,
                          max_variants: int | None = None) -> tuple[Recipe, ...]:
    """Compute a branch where the (group-mean) probability exceeds `threshold`."""
    S, depth = probs.shape[0], probs.shape[1]
    groups = group_steps(probs, cache_steps(S, interval), None if max_variants is None else max_variants - 1)
    computes = {}
    for gi, gr in enumerate(groups):
        m = probs[gr].mean(0)
        computes[gi] = {(l, j) for l in range(depth) for j in range(2) if m[l, j].item() > threshold}
    return _recipes_from_groups(depth, S, groups, computes)


def recipes_for_target(cfg: DiTConfig, probs: torch.Tensor, interval: int, target: float,
                       max_variants: int | None = None) -> tuple[Recipe, ...]:
    """Reuse the least important (group, block, branch) first until the predicted speedup reaches `target`."""
    S, depth = probs.shape[0], probs.shape[1]
    groups = group_steps(probs, cache_steps(S, interval), None if max_variants is None else max_variants - 1)
    per_branch = [branch_flops(cfg, br, COMPUTE) for br in BRANCHES]
    full_step = fixed_flops(cfg) + depth * sum(per_branch)
    budget = full_step * S / target  # total FLOPs allowed
    total = full_step * S
    items = []
    for gi, gr in enumerate(groups):
        m = probs[gr].mean(0)
        items += [(m[l, j].item(), gi, l, j) for l in range(depth) for j in range(2)]
    computes = {gi: {(l, j) for l in range(depth) for j in range(2)} for gi in range(len(groups))}
    for _, gi, l, j in sorted(items):
        if total <= budget * (1 + 1e-12):
            break
        computes[gi].discard((l, j))
        total -= per_branch[j] * len(groups[gi])
    if total > budget * (1 + 1e-12):
        raise TcgraphError(f"interval {interval} cannot reach a predicted {target}x even reusing every branch "
                           f"(at most {max_speedup(cfg, S, interval):.2f}x); use a longer interval")
    return _recipes_from_groups(depth, S, groups, computes)


#################################################################################
#                                   Planner                                     #
#################################################################################


def _probs_record(probs: torch.Tensor, interval: int) -> dict:
    return {str(s): [[round(v, 4) for v in row] for row in probs[s].tolist()]
            for s in cache_steps(probs.shape[0], interval)}


def make_l2c(cfg: L2CConfig, model: DiT, settings: SamplerSettings,
             progress: Callable[[str, int], Callable[[], None]] | None = None, traj=None) -> Plan:
    """Calibrate, train the router(s) and turn the best into a plan (see the module docstring).

    `traj` reuses calibration trajectories made for the same settings (benchmarks compare
    several targets on one calibration); by default they are made here.
    """

    mcfg = model.config
    S = settings.num_steps
    if S < 2:
        raise TcgraphError("Learning-to-Cache needs at least 2 steps")
    tick = progress or (lambda desc, total: (lambda: None))
    if cfg.target_speedup is not None:  # an unreachable target fails before minutes of calibration
        intervals = [cfg.interval] if cfg.interval else candidate_intervals(mcfg, S, cfg.target_speedup)
        for k in intervals:
            if max_speedup(mcfg, S, k) < cfg.target_speedup:
                raise TcgraphError(f"interval {k} reaches at most {max_speedup(mcfg, S, k):.2f}x, below the target "
                                   f"{cfg.target_speedup}x; use a longer interval")
    train, held = calibration_split(model, settings, cfg, traj, tick)

    if cfg.target_speedup is not None:
        lams = None
    else:
        intervals = [cfg.interval or 2]
        lams = [cfg.lam if cfg.lam is not None else 0.0]
    n_train = len(intervals) * (len(lams) if lams else len(LAMBDA_GRID))
    train_tick = tick("train router", n_train * cfg.epochs * sum(1 for _, cs in rounds(S, max(intervals)) if cs))
    candidates = []
    for k in intervals:
        unit = lambda_unit(model, train, k) if lams is None else None
        for lam in (lams or [m * unit for m in LAMBDA_GRID]):
            res = train_router(model, train, k, lam, epochs=cfg.epochs, batch_images=cfg.batch_images, lr=cfg.lr,
                               seed=cfg.seed, progress=train_tick)
            probs = res.probs()
            if cfg.target_speedup is not None:
                recipes = recipes_for_target(mcfg, probs, k, cfg.target_speedup, cfg.max_variants)
            else:
                recipes = recipes_for_threshold(probs, k, cfg.threshold or 0.5, cfg.max_variants)
            err = plan_error(model, held, recipes)
            candidates.append((err, k, lam, res, recipes))
    err, k, lam, res, recipes = min(candidates, key=lambda c: c[0])
    params = {
        "method": "learning-to-cache",
        "interval": k,
        "lambda": lam,
        "target_speedup": cfg.target_speedup,
        "threshold": None if cfg.target_speedup is not None else (cfg.threshold or 0.5),
        "max_variants": cfg.max_variants,
        "predicted_speedup": round(speedup_of(mcfg, recipes), 4),
        "held_out_error": err,
        "calibration": {"images": cfg.calib_images, "held_out": cfg.num_held_out, "seed": cfg.seed,
                        "epochs": cfg.epochs, "batch_images": cfg.batch_images, "lr": cfg.lr},
        "search": [{"interval": c[1], "lambda": c[2], "held_out_error": c[0],
                    "final_train_loss": c[3].history[-1] if c[3].history else None} for c in candidates],
        "router_probs": _probs_record(res.probs(), k),
    }
    name = f"l2c:{cfg.target_speedup}x" if cfg.target_speedup is not None else "l2c"
    return Plan(name, settings, recipes, mcfg.num_tokens, params=params)
