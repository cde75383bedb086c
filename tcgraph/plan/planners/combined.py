"""Combined plans (`tokencache+l2c`): Learning-to-Cache branch reuse and TokenCache partial
recomputation in one plan, driven by one FLOP budget.

Definition (the project's; the papers do not combine them):

1. One calibration serves both learners.
2. Learning-to-Cache first takes a share of the budget: on the skeleton the whole target
   needs (a full step every K steps, the smallest K at which pruning every branch of every
   cache step to the floor would reach the target), a router is learned for the predicted speedup `target ** l2c_share`
   (`l2c.make_l2c`: its λ search and variant cap). Its plan fixes which branches are
   reused at each cache step.
3. The Cache Predictor is trained and block sensitivities measured (`tokencache`).
4. The branches the L2C plan still *computes* at its cache steps become `partial` in the
   blocks that TokenCache's greedy block selection picks (least sensitive first, keep
   counts down to `min_keep · N`), until the whole plan reaches `target`. The kept tokens of
   a block are the top-k of the predictor's scores averaged over the steps that share an
   L2C recipe, so the token pass adds no variants beyond the L2C plan's.

Full steps stay full: they refresh every cache. `l2c_share` is searched over
`SHARES` unless given, keeping the plan with the lowest held-out error.

Branches are the model's (`ModelConfig.block_layout()`): the router has one logit per branch each
block has (`l2c`), and step 4 prunes a block by the rule of `tcgraph.plan.learning.pruning`: each
branch L2C still computes that writes image rows becomes partial on the block's kept image tokens
(PixArt's cross-attention like its MLP, row-wise in the image tokens; FLUX's and SD3's joint
attention and FLUX's single-block MLP with their text rows recomputed), a computed branch of text
rows only (`mlp_text`) keeps computing, and a block kept at 0 tokens reuses every branch. FLOPs count
each branch's own rows (a cross branch's at the plan's `text_length`); a text-conditioned model
calibrates on the prompts `calibration_text`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Collection, Sequence

import torch

from tcgraph.calibrate import Trajectories
from tcgraph.errors import TcgraphError
from tcgraph.models.official.dit import DiT
from tcgraph.models.families import ModelConfig
from tcgraph.models.layout import Layout
from tcgraph.plan.learning.evaluate import plan_errors, speedup_of
from tcgraph.plan.planners.l2c import LAMBDA_GRID, L2CConfig, make_l2c
from tcgraph.plan.planners.l2c import plan_outline as l2c_outline
from tcgraph.plan.learning.common import (calibration_cost, cache_steps, calibration_of, candidate_intervals,
                                          require_weights, rows_per_image, scoring_cost, seconds_per_row,
                                          selection_cost)
from tcgraph.plan.options import (calib_images_option, compete_option, forecast_option, max_cache_mb_option,
                                  max_variants_option, min_psnr_option, option)
from tcgraph.plan.plan import COMPUTE, REUSE, Plan, Recipe, partial
from tcgraph.plan.learning.select import finish_learned
from tcgraph.plan.learning.predictor import PredictorResult
from tcgraph.plan.learning.pruning import block_actions, image_branches
from tcgraph.plan.planners.tokencache import TokenCacheConfig, learn_predictor, learning_outline
from tcgraph.plan.learning.tprr import select_blocks
from tcgraph.progress import QUIET, Progress
from tcgraph.sampling import SamplerSettings
from tcgraph.sampling.conditioning import Text

SHARES = (0.5, 0.75)
DEFAULT_TARGET = 2.0


@dataclass(frozen=True)
class CombinedConfig:
    """Learning-to-Cache branch reuse, then TokenCache pruning of the branches it computes."""

    target_speedup: float = option(None, "FLOP-predicted speedup of the whole plan", type=float,
                                   default_help=str(DEFAULT_TARGET))
    l2c_share: float | None = option(None, "share of log(target) taken by L2C branch reuse, in (0, 1)", type=float,
                                     default_help=f"searched over {', '.join(map(str, SHARES))}")
    keep_ratio: float = option(0.5, "share of tokens the Cache Predictor learns to keep", type=float)
    min_keep: float = option(0.25, "lowest keep ratio of a pruned block (0 allows reusing whole blocks)",
                             type=float)
    max_variants: int | None = max_variants_option(6)
    calib_images: int = calib_images_option()
    epochs: int | None = option(None, "training epochs of both learners", type=int,
                                default_help="each learner's own")
    seed: int = option(0, "seed of the calibration noise, labels and training order", type=int)
    forecast: bool = forecast_option()
    compete: bool = compete_option()
    max_cache_mb: float | None = max_cache_mb_option()
    min_psnr: float | None = min_psnr_option()
    # whether the target was asked for (False: the default target, which --min-psnr alone leaves open)
    speedup_given: bool = field(default=True, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.target_speedup is None:
            object.__setattr__(self, "target_speedup", DEFAULT_TARGET)
            object.__setattr__(self, "speedup_given", False)
        if not self.target_speedup > 1.0:
            raise TcgraphError(f"target speedup must be > 1, got {self.target_speedup}")
        if self.l2c_share is not None and not 0.0 < self.l2c_share < 1.0:
            raise TcgraphError(f"l2c_share must be in (0, 1), got {self.l2c_share}")
        if self.min_psnr is not None and not 0 < self.min_psnr < 200:
            raise TcgraphError(f"min_psnr is a PSNR in dB, in (0, 200), got {self.min_psnr}")


def token_floor(num_tokens: int, min_keep: float) -> int:
    """The lowest keep count of a pruned branch: ceil(min_keep · N), at least 1 (0 if min_keep is 0)."""
    return max(1, math.ceil(min_keep * num_tokens)) if min_keep > 0 else 0


def prune_recipes(base: tuple[Recipe, ...], scores: torch.Tensor, keep: list[int],
                  steps: Collection[int] | None = None, layout: Layout | None = None) -> tuple[Recipe, ...]:
    """`base` with the computed branches of block l at a cache step pruned to its top keep[l] tokens:
    each that writes image rows made partial, the others (text rows only) left computing; at keep 0
    every computed branch reused. `layout`: which branches write image rows (None: every branch, as a
    DiT's and PixArt's). `steps`: the skeleton's cache steps (where L2C may reuse; a cache step at
    which L2C computes every branch is pruned too); None takes the steps whose recipe is not full."""
    n = scores.shape[-1]
    image = image_branches(layout) if layout is not None else None
    groups: dict[Recipe, list[int]] = {}
    for s, r in enumerate(base):
        if (s in steps) if steps is not None else not r.is_full:
            groups.setdefault(r, []).append(s)
    out = list(base)
    for recipe, steps in groups.items():
        mean = scores[steps].mean(0)  # (depth, N)
        actions = []
        for l, acts in enumerate(recipe.actions):
            k = keep[l]
            if k >= n:
                actions.append(acts)
                continue
            order = sorted(range(n), key=lambda i: (-mean[l, i].item(), i))
            act = REUSE if k == 0 else partial(order[:k])
            names = recipe.block_branches(l)
            actions.append(tuple(act if a.computes and (image is None or br in image[l] or k == 0) else a
                                 for br, a in zip(names, acts)))
        new = Recipe(tuple(actions), recipe.branches)
        for s in steps:
            out[s] = new
    return tuple(out)


def skeleton_interval(cfg: ModelConfig, num_steps: int, target: float, floor: int, margin: float = 1.03, *,
                      text_length: int = 0) -> int:
    """The smallest K whose cache steps, every branch pruned to `floor` tokens, reach `target`
    (token pruning alone could meet the budget there, and branch reuse adds on top); where no
    K does, the longest interval Learning-to-Cache would try for `target`."""
    layout = cfg.block_layout()
    names, image = layout.branches(), image_branches(layout)
    full = Recipe.uniform(cfg.depth, COMPUTE, names)
    pruned = Recipe(tuple(block_actions(names[l], image[l], tuple(range(floor))) for l in range(cfg.depth)), names)
    for k in range(2, num_steps + 1):
        cs = set(cache_steps(num_steps, k))
        if speedup_of(cfg, [pruned if s in cs else full for s in range(num_steps)], text_length) >= target * margin:
            return k
    # Pruning alone cannot get there (keys and values of every token are still projected):
    # take the longest interval L2C would consider for the whole target, where reuse has room.
    return candidate_intervals(cfg, num_steps, target, text_length=text_length)[-1]


def prune_to_target(cfg: ModelConfig, base: tuple[Recipe, ...], scores: torch.Tensor, sensitivity: Sequence[float],
                    floor: int, target: float, *, text_length: int = 0,
                    steps: Collection[int] | None = None) -> tuple[list[int], tuple[Recipe, ...]] | None:
    """(keep counts, recipes): `base` pruned at its cache `steps` (`prune_recipes`) by greedy block
    selection until `target` is met, or None where pruning every block to `floor` cannot get there. Pure."""
    n, layout = cfg.num_tokens, cfg.block_layout()
    keep = select_blocks(sensitivity, n, floor,
                         lambda k: speedup_of(cfg, prune_recipes(base, scores, k, steps, layout), text_length), target)
    return None if keep is None else (keep, prune_recipes(base, scores, keep, steps, layout))


def make_combined(cfg: CombinedConfig, model_config: ModelConfig, settings: SamplerSettings, *,
                  weights: DiT | None = None, progress: Progress = QUIET, traj: Trajectories | None = None,
                  learned: tuple[PredictorResult, list[float]] | None = None, finish: bool = True,
                  calibration_text: Text | None = None) -> Plan:
    """The tokencache+l2c planner (see the module docstring), then `select.finish_learned`;
    `traj`/`learned`/`finish`/`calibration_text` as in `tokencache.make_tokencache`."""
    model = require_weights(weights, model_config, "a combined plan")
    mcfg = model.config
    S, n, length = settings.num_steps, mcfg.num_tokens, settings.text_length
    epochs = {"epochs": cfg.epochs} if cfg.epochs else {}
    tcfg = TokenCacheConfig(target_speedup=cfg.target_speedup, keep_ratio=cfg.keep_ratio, min_keep=cfg.min_keep,
                            calib_images=cfg.calib_images, seed=cfg.seed, forecast=cfg.forecast, **epochs)
    floor = token_floor(n, cfg.min_keep)
    interval = skeleton_interval(mcfg, S, cfg.target_speedup, floor, text_length=length)  # before the expensive part
    shares = [cfg.l2c_share] if cfg.l2c_share is not None else list(SHARES)

    def l2c_config(share: float) -> L2CConfig:
        return L2CConfig(target_speedup=cfg.target_speedup ** share, max_variants=cfg.max_variants,
                         calib_images=cfg.calib_images, interval=interval, seed=cfg.seed, **epochs)

    if finish:
        progress = progress.outline(plan_outline(settings, cfg, tcfg, mcfg.depth, l2c_config(shares[0]), interval,
                                                 len(shares), traj is None, learned is not None),
                                    f"plan tokencache+l2c:{cfg.target_speedup}x", seconds_per_row(model, settings))
    traj = calibration_of(model, settings, tcfg, traj, progress, calibration_text, grams=True)  # once, for all
    train, held = traj.split(tcfg.num_held_out)

    pred, sens = learned if learned is not None else learn_predictor(tcfg, model, train, held, progress)

    table, found = [], []
    routers: dict = {}  # the routers do not depend on the share's target: every share plans from the same ones
    for share in shares:
        base = make_l2c(l2c_config(share), model_config, settings, weights=model, progress=progress, traj=traj,
                        finish=False, calibration_text=calibration_text, routers=routers)
        pruned = prune_to_target(mcfg, base.recipes, pred.logits, sens, floor, cfg.target_speedup,
                                 text_length=length, steps=set(cache_steps(S, base.params["interval"])))
        if pruned is None:
            table.append({"l2c_share": share, "skipped": "token pruning cannot reach the target on this L2C plan"})
            continue
        keep, recipes = pruned
        table.append({"l2c_share": share, "l2c_target": round(cfg.target_speedup ** share, 4),
                      "interval": base.params["interval"], "keep_counts": keep,
                      "predicted_speedup": round(speedup_of(mcfg, recipes, length), 4), "variants": len(set(recipes))})
        found.append([None, share, base, keep, recipes])
    with progress.phase("score combined plans", S) as phase:
        for entry, err in zip(found, plan_errors(model, held, [f[4] for f in found], phase=phase)):
            entry[0] = err
            next(r for r in table if r["l2c_share"] == entry[1])["held_out_error"] = err
    if not found:
        raise TcgraphError(f"a combined plan cannot reach {cfg.target_speedup}x with keep ratios >= {cfg.min_keep}; "
                           "ask for less or lower --min-keep")
    err, share, base, keep, recipes = min(found, key=lambda c: c[0])
    params = {
        "method": "tokencache+l2c",
        "target_speedup": cfg.target_speedup,
        "l2c_share": share,
        "predicted_speedup": round(speedup_of(mcfg, recipes, length), 4),
        "held_out_error": err,
        "keep_counts": keep,
        "sensitivity": sens,
        "l2c": {k: base.params[k] for k in ("interval", "lambda", "target_speedup", "predicted_speedup",
                                            "held_out_error", "router_probs")},
        "search": table,
        "calibration": {"images": cfg.calib_images, "held_out": tcfg.num_held_out, "seed": cfg.seed},
    }
    name = f"tokencache+l2c:{cfg.target_speedup}x"
    if not finish:
        return Plan(name, settings, recipes, n, params=params, layout=mcfg.block_layout())
    return finish_learned(model, train, held, name, recipes, params,
                          forecast=cfg.forecast, max_cache_mb=cfg.max_cache_mb, max_variants=cfg.max_variants,
                          compete=cfg.compete, min_psnr=cfg.min_psnr, speedup_given=cfg.speedup_given,
                          progress=progress)


def plan_outline(settings: SamplerSettings, cfg: CombinedConfig, tcfg: TokenCacheConfig, depth: int,
                 lcfg: L2CConfig, interval: int, shares: int, calibrate: bool, learned: bool
                 ) -> list[tuple[str, float]]:
    """The phases of a combined plan with their estimated work in model rows: the routers are trained
    for the first share (every share plans from them), each share scores its L2C candidates."""
    S, rows = settings.num_steps, rows_per_image(settings)
    held_rows = tcfg.num_held_out * rows
    steps = [("calibrate", calibration_cost(settings, cfg.calib_images))] if calibrate else []
    if not learned:
        steps += learning_outline(settings, tcfg, depth)
    l2c = l2c_outline(settings, lcfg, [(interval, j) for j in range(len(LAMBDA_GRID))], False)
    for share in range(shares):
        steps += [(d, c if share == 0 or d != "train router" else 0.0)  # the routers: trained once
                  for d, c in l2c if d != "choose by sampling runs"]
    steps.append(("score combined plans", scoring_cost(S, held_rows, shares)))
    steps.append(("choose by sampling runs", selection_cost(settings)))
    return steps
