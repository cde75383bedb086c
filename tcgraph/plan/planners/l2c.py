"""Learning-to-Cache (Ma et al. 2024, arXiv 2406.01733), learned data-free on one machine.

The plan has a skeleton: every `interval`-th step (0, K, 2K, …) is a full step, the
others are *cache steps*. A router holds one logit `g[s, l, b]` per cache step, block and
branch, for the model's own branches (`ModelConfig.branches`: DiT's attn, mlp; PixArt's attn,
cross, mlp; the router is `[S, depth, len(branches)]`, branch b in that order). Where the blocks'
branches differ (FLUX's double blocks attn, mlp, mlp_text, its single blocks attn, mlp; SD3's), the
router has a column per branch of any block (`common.router_branches`) and a block's columns for
branches it lacks are neither blended, penalised nor planned; each branch's FLOPs count its own
rows (joint attention over text and image rows, the text MLP over the text rows). Training
follows docs/design.md's L2C section, on calibration trajectories of the model itself (random
noise and labels, no data set; a text-conditioned model on the prompts `calibration_text`):

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

`router=FILE` imports a router published with the L2C code instead (`l2c_import`); no
calibration, no weights needed. Published routers are DiT's (attn, mlp per block): a model
with other branches is refused there. The round skeleton, the calibration split and the logit
trainer are shared with TokenCache (`tcgraph.plan.learning.common`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from tcgraph.calibrate import Trajectories
from tcgraph.errors import TcgraphError, UsageError
from tcgraph.models.official.dit import DiT
from tcgraph.models.families import ModelConfig
from tcgraph.names import BRANCHES, cache_name
from tcgraph.plan.learning.evaluate import plan_errors, speedup_of
from tcgraph.plan.planners.l2c_import import DEFAULT_THRESHOLD as ROUTER_THRESHOLD
from tcgraph.plan.planners.l2c_import import load_published_router_plan
from tcgraph.plan.planners.l2c_recipes import (  # noqa: F401  (re-exported)
    _branches_of, group_steps, recipes_for_target, recipes_for_threshold)
from tcgraph.plan.learning.common import (
    calibration_cost,
    calibration_split,
    branch_mask,
    block_branches,
    cache_steps,
    candidate_intervals,
    check_learning_options,
    fit_logits,
    held_out_count,
    lambda_unit,
    max_speedup,
    require_weights,
    round_loss,
    rounds,
    router_branches,
    rows_per_image,
    scoring_cost,
    seconds_per_row,
    selection_cost,
    training_cost,
)
from tcgraph.plan.options import (calib_images_option, compete_option, forecast_option, held_out_option,
                                  max_cache_mb_option, max_variants_option, min_psnr_option, option, tuning)
from tcgraph.plan.plan import Plan
from tcgraph.plan.learning.select import finish_learned
from tcgraph.progress import QUIET, SILENT, Phase, Progress
from tcgraph.sampling import SamplerSettings
from tcgraph.sampling.conditioning import Text

# Variant cap used when the user gives none (full step + 5 cache recipes); chosen from the
# sweep in benchmarks/bench_l2c.py (see README, Learning-to-Cache).
DEFAULT_MAX_VARIANTS = 6
DEFAULT_TARGET = 2.0  # FLOP-predicted speedup learned for when neither a target nor a λ is given
LAMBDA_THRESHOLD = 0.5  # sigmoid(g) above which a branch computes in λ mode
LAMBDA_GRID = (0.1, 1.0)  # multiples of the data's own λ unit (see `lambda_unit`)
# Training: the hard plan a router gives settles after a few Adam steps per round, whatever the
# batch (benchmarks/planning_time.py: 2 images per round and 5 epochs plan as well as 8 and 12,
# at 1/10 of the work).
DEFAULT_EPOCHS = 5
DEFAULT_BATCH_IMAGES = 2
# Fields that only apply to learning a router, not to importing one (`router`).
_LEARNING_FIELDS = ("target_speedup", "lam", "max_variants", "interval", "calib_images", "epochs", "max_cache_mb",
                    "min_psnr")


@dataclass(frozen=True)
class L2CConfig:
    """Learning-to-Cache (Ma et al. 2024, arXiv 2406.01733): a router learned here, or imported.

    Three modes: a FLOP-predicted `target_speedup` (the default, 2x), searched over intervals
    and λ; a fixed `lam` with a `threshold`; or a published `router` file with a `threshold`.
    """

    target_speedup: float | None = option(
        None, "FLOP-predicted speedup to learn a plan for; searched over interval and λ", type=float,
        default_help=f"{DEFAULT_TARGET} unless --lambda or --router is given")
    lam: float | None = option(None, "λ of the router loss, instead of a target (absolute)", type=float,
                               flag="--lambda")
    threshold: float | None = option(
        None, "sigmoid(logit) above which a branch is computed", type=float,
        default_help=f"{LAMBDA_THRESHOLD} with --lambda, {ROUTER_THRESHOLD} with --router")
    max_variants: int | None = max_variants_option(DEFAULT_MAX_VARIANTS)
    interval: int | None = option(None, "a full step every N steps", type=int, default_help="searched")
    router: str | None = option(None, "import a router file published with the L2C code instead of learning one",
                                type=str, parse=str, metavar="FILE")
    calib_images: int = calib_images_option()
    held_out: int | None = held_out_option()
    epochs: int = option(DEFAULT_EPOCHS, "training epochs over the calibration rounds", type=int)
    batch_images: int = tuning(DEFAULT_BATCH_IMAGES, "images per training round")
    lr: float = tuning(0.1, "Adam learning rate of the logits")
    seed: int = option(0, "seed of the calibration noise, labels and training order", type=int)
    forecast: bool = forecast_option()
    compete: bool = compete_option()
    max_cache_mb: float | None = max_cache_mb_option()
    min_psnr: float | None = min_psnr_option()
    # whether the target was asked for (False: the default target, which --min-psnr alone leaves open)
    speedup_given: bool = field(default=True, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.router is not None:
            learned = [f.name for f in fields(self) if f.name in _LEARNING_FIELDS and getattr(self, f.name) != f.default]
            if learned:
                raise UsageError(f"--router imports a trained router; {', '.join(learned)} apply to learning one: "
                                 "drop them or the router")
        elif self.target_speedup is None and self.lam is None:
            object.__setattr__(self, "target_speedup", DEFAULT_TARGET)
            object.__setattr__(self, "speedup_given", False)
        if self.target_speedup is not None and self.lam is not None:
            raise UsageError("give either a target speedup or a λ, not both")
        if self.target_speedup is not None and not self.target_speedup > 1.0:
            raise TcgraphError(f"target speedup must be > 1, got {self.target_speedup}")
        if self.lam is not None and self.lam < 0:
            raise TcgraphError(f"λ must be >= 0, got {self.lam}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise TcgraphError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.threshold is not None and self.target_speedup is not None:
            raise UsageError("a threshold applies with --lambda (or --router); a target speedup sets its own")
        if self.interval is not None and self.interval < 2:
            raise TcgraphError(f"interval must be >= 2 (a full step then cache steps), got {self.interval}")
        check_learning_options(self.calib_images, self.held_out, self.max_variants, self.epochs, self.batch_images,
                               self.min_psnr)

    @property
    def num_held_out(self) -> int:
        return held_out_count(self.calib_images, self.held_out)


#################################################################################
#                                 Training                                      #
#################################################################################


@dataclass
class RouterResult:
    interval: int
    lam: float
    logits: torch.Tensor  # (S, depth, branches); rows of full steps are unused
    history: list[float] = field(default_factory=list)  # mean training loss per epoch

    def probs(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)


def init_logits(num_steps: int, depth: int, seed: int = 0, num_branches: int = len(BRANCHES)) -> torch.Tensor:
    """Untrained router `[S, depth, num_branches]`: sigmoid ≈ 0.5 with a tiny seeded jitter (a random ranking)."""
    g = torch.Generator().manual_seed(seed)
    return 0.01 * torch.randn(num_steps, depth, num_branches, generator=g)


def _weights(p: torch.Tensor, branches: tuple) -> dict[str, torch.Tensor]:
    """`mixed_step` weights of one step's router probabilities `p` [depth, len(router_branches)], for
    the branches each block has (`branches`: the model's, one tuple or one per block)."""
    names = _branches_of(p[None], branches)
    return {cache_name(l, br): p[l, names.index(br)]
            for l, block in enumerate(block_branches(branches, p.shape[0])) for br in block}


def _penalty_sum(w: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Σ of the probabilities `w` [..., depth, columns] over the (block, branch) pairs that exist."""
    return w.sum() if mask is None else (w * mask).sum()


def train_router(model: DiT, traj: Trajectories, interval: int, lam: float, *, epochs: int = 12, batch_images: int = 8,
                 lr: float = 0.1, seed: int = 0, init: torch.Tensor | None = None,
                 phase: Phase = SILENT) -> RouterResult:
    """Learn router logits on `traj` (L2C objective: eps MSE + λ·Σ sigmoid(g))."""
    branches, depth = model.config.branches, model.config.depth
    mask = branch_mask(branches, depth)
    init = init if init is not None else init_logits(traj.num_steps, depth, seed, len(router_branches(branches)))
    _branches_of(init, branches)
    work = [(s0, cs) for s0, cs in rounds(traj.num_steps, interval) if cs]
    logits, history = fit_logits(model, traj, init, work, lambda w, s: _weights(w[s], branches),
                                 lambda w, cs: lam * _penalty_sum(w[cs], mask), epochs=epochs,
                                 batch_images=batch_images, lr=lr, seed=seed, phase=phase)
    return RouterResult(interval, lam, logits, history)



@torch.no_grad()
def soft_loss(model: DiT, traj: Trajectories, interval: int, logits: torch.Tensor, lam: float) -> float:
    """The training objective on `traj` (all images), per cache step."""
    probs, branches = torch.sigmoid(logits), model.config.branches
    _branches_of(probs, branches)
    mask = branch_mask(branches, model.config.depth)
    rows = torch.arange(traj.num_images)
    total, count = 0.0, 0
    for s0, cs in rounds(traj.num_steps, interval):
        if cs:
            mse, n = round_loss(model, traj, s0, cs, lambda s: _weights(probs[s], branches), rows)
            total += mse.item() + lam * _penalty_sum(probs[cs], mask).item()
            count += n
    return total / count


#################################################################################
#                         From probabilities to a plan                          #
#################################################################################


def _probs_record(probs: torch.Tensor, interval: int) -> dict:
    return {str(s): [[round(v, 4) for v in row] for row in probs[s].tolist()]
            for s in cache_steps(probs.shape[0], interval)}


def make_l2c(cfg: L2CConfig, model_config: ModelConfig, settings: SamplerSettings, *, weights: DiT | None = None,
             progress: Progress = QUIET, traj: Trajectories | None = None, finish: bool = True,
             calibration_text: Text | None = None, routers: dict | None = None) -> Plan:
    """The l2c planner: import `cfg.router`, or calibrate, train the router(s) and turn the
    best into a plan (see the module docstring), then `select.finish_learned`: forecasting
    where it helps (`cfg.forecast`), and the final choice by whole sampling runs against the
    fixed-interval plans.

    `traj` reuses calibration trajectories made for the same settings (benchmarks compare
    several targets on one calibration); by default they are made here, a text-conditioned
    model's on the prompts `calibration_text`. `finish=False` returns the router's own plan
    (what the combined planner builds on).

    `routers` (with `traj`): a dict that keeps every router trained here and the λ unit of each
    interval, keyed by what they depend on, for later calls on the same `traj`: targets whose
    searched intervals overlap (`l2c:2` and `l2c:3` both train interval 4) train each
    (interval, λ) once. The plan is the same as without it.
    """
    if cfg.router is not None:
        return load_published_router_plan(cfg.router, model_config, settings,
                                          ROUTER_THRESHOLD if cfg.threshold is None else cfg.threshold)
    model = require_weights(weights, model_config, "a Learning-to-Cache router")
    mcfg = model.config
    S, length = settings.num_steps, settings.text_length
    if S < 2:
        raise TcgraphError(f"Learning-to-Cache needs at least 2 steps, got {S}; sample with more steps")
    if cfg.target_speedup is not None:  # an unreachable target fails before minutes of calibration
        intervals = ([cfg.interval] if cfg.interval
                     else candidate_intervals(mcfg, S, cfg.target_speedup, text_length=length))
        for k in intervals:
            if max_speedup(mcfg, S, k, length) < cfg.target_speedup:
                raise TcgraphError(f"interval {k} reaches at most {max_speedup(mcfg, S, k, length):.2f}x, below the "
                                   f"target {cfg.target_speedup}x; use a longer interval")
    if cfg.target_speedup is None:
        intervals = [cfg.interval or 2]
    lams = None if cfg.target_speedup is not None else [cfg.lam]
    trained = [(k, j) for k in intervals for j in range(len(lams or LAMBDA_GRID))]
    if finish:
        progress = progress.outline(plan_outline(settings, cfg, trained, traj is None), f"plan {_name(cfg)}",
                                    seconds_per_row(model, settings))
    train, held = calibration_split(model, settings, cfg, traj, progress, calibration_text)
    memo = _router_memo(routers, traj, cfg)

    results = []
    ticks = sum(cfg.epochs * sum(1 for _, cs in rounds(S, k) if cs) for k, _ in trained)  # one per round trained
    with progress.phase("train router", ticks) as phase:
        for k in intervals:
            unit = memo(("lambda_unit", k), lambda: lambda_unit(model, train, k)) if lams is None else None
            for lam in (lams or [m * unit for m in LAMBDA_GRID]):
                made: list[bool] = []  # a router trained before (`routers`) is reused: its rounds tick at once
                res = memo(("router", k, lam), lambda: made.append(True) or train_router(
                    model, train, k, lam, epochs=cfg.epochs, batch_images=cfg.batch_images, lr=cfg.lr,
                    seed=cfg.seed, phase=phase))
                if not made:
                    for _ in range(cfg.epochs * sum(1 for _, cs in rounds(S, k) if cs)):
                        phase.tick("reused")
                if cfg.target_speedup is not None:
                    recipes = recipes_for_target(mcfg, res.probs(), k, cfg.target_speedup, cfg.max_variants,
                                                 text_length=length)
                else:
                    recipes = recipes_for_threshold(res.probs(), k, _threshold(cfg), cfg.max_variants, mcfg.branches)
                results.append((k, lam, res, recipes))
    with progress.phase("score candidates", S) as phase:
        errors = plan_errors(model, held, [r[3] for r in results], phase=phase)
    candidates = [(err, *r) for err, r in zip(errors, results)]
    err, k, lam, res, recipes = min(candidates, key=lambda c: c[0])
    params = {
        "method": "learning-to-cache",
        "interval": k,
        "lambda": lam,
        "target_speedup": cfg.target_speedup,
        "threshold": None if cfg.target_speedup is not None else _threshold(cfg),
        "max_variants": cfg.max_variants,
        "predicted_speedup": round(speedup_of(mcfg, recipes, length), 4),
        "held_out_error": err,
        "calibration": {"images": cfg.calib_images, "held_out": cfg.num_held_out, "seed": cfg.seed,
                        "epochs": cfg.epochs, "batch_images": cfg.batch_images, "lr": cfg.lr},
        "search": [{"interval": c[1], "lambda": c[2], "held_out_error": c[0],
                    "final_train_loss": c[3].history[-1] if c[3].history else None} for c in candidates],
        "router_probs": _probs_record(res.probs(), k),
    }
    name = _name(cfg)
    if not finish:
        return Plan(name, settings, recipes, mcfg.num_tokens, params=params, layout=mcfg.block_layout())
    return finish_learned(model, train, held, name, recipes, params, forecast=cfg.forecast,
                          max_cache_mb=cfg.max_cache_mb, max_variants=cfg.max_variants,
                          compete=cfg.compete, min_psnr=cfg.min_psnr, speedup_given=cfg.speedup_given,
                          progress=progress)


def _name(cfg: L2CConfig) -> str:
    return f"l2c:{cfg.target_speedup}x" if cfg.target_speedup is not None else "l2c"


def plan_outline(settings: SamplerSettings, cfg: L2CConfig, trained: list, calibrate: bool) -> list[tuple[str, float]]:
    """The phases of an l2c plan with their estimated work in model rows (`common.training_cost`, …):
    `trained` the (interval, λ) routers it trains."""
    S, rows = settings.num_steps, rows_per_image(settings)
    batch = min(cfg.batch_images, cfg.calib_images - cfg.num_held_out)
    steps = [("calibrate", calibration_cost(settings, cfg.calib_images))] if calibrate else []
    steps.append(("train router", sum(cfg.epochs * training_cost(rounds(S, k), batch * rows) for k, _ in trained)))
    steps.append(("score candidates", scoring_cost(S, cfg.num_held_out * rows, len(trained))))
    steps.append(("choose by sampling runs", selection_cost(settings)))
    return steps


def _router_memo(routers: dict | None, traj: Trajectories | None, cfg: L2CConfig):
    """`memo(key, make)`: `make()` once per key and training setup in `routers` (see `make_l2c`),
    or always `make()` when there is no `routers` dict."""
    if routers is None:
        return lambda key, make: make()
    if traj is None:
        raise UsageError("routers= keeps what was learned on given calibration trajectories: pass traj= too")
    setup = (id(traj), cfg.num_held_out, cfg.epochs, cfg.batch_images, cfg.lr, cfg.seed)
    if routers.setdefault("_trajectories", traj) is not traj:
        raise UsageError("routers= was filled on other calibration trajectories: use one dict per traj")

    def memo(key, make):
        full = (*key, setup)
        if full not in routers:
            routers[full] = make()
        return routers[full]

    return memo


def _threshold(cfg: L2CConfig) -> float:
    return cfg.threshold or LAMBDA_THRESHOLD
