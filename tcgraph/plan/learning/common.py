"""What the learned planners share: option checks, the calibration split, the round skeleton,
and one trainer of input-invariant logits.

Learning-to-Cache (`l2c`), TokenCache (`tokencache`, `dynamic`) and the combined planner
learn on calibration trajectories of the model itself (random noise and labels, no data
set, `tcgraph.calibrate`), teacher-forced: every step starts from the full model's state.
A text-conditioned model (PixArt) is calibrated on prompts the user gives instead of random
labels (`calibration_text`, a `tcgraph.sampling.conditioning.Text`): `calibration_split`
refuses to learn without them.

Everything here follows the model's own branches (`ModelConfig.branches`: DiT's attn, mlp;
PixArt's attn, cross, mlp; per block where blocks differ, as FLUX's and SD3's layouts) and counts
FLOPs at the plan's `text_length`, each branch's rows from the layout (`tcgraph.plan.flops`).
A per-(block, branch) parameter tensor (the L2C router) is `[..., depth, len(router_branches)]`:
one column per branch of any block, in `BRANCH_ORDER`; a block's columns for branches it lacks
(`branch_mask`) are never read, trained or counted.
A *round* is one full step, which fills every cache with its pre-gate branch outputs (no
grad), followed by cache steps that blend `w·fresh + (1 − w)·cached` per branch
(`calibrate.mixed_step`); `fit_logits` moves only the logits behind `w`, the model stays
frozen.
"""
from __future__ import annotations

from typing import Callable

import torch

from tcgraph.calibrate import Trajectories, calibrate, calibration_chunks, mixed_step
from tcgraph.errors import TcgraphError
from tcgraph.models.official.dit import DiT
from tcgraph.models.families import ModelConfig
from tcgraph.names import BRANCH_ORDER, cache_name
from tcgraph.plan.learning.evaluate import speedup_of
from tcgraph.plan.plan import COMPUTE, REUSE, Recipe
from tcgraph.progress import SILENT, Phase, Progress
from tcgraph.sampling import SamplerSettings, sampler_for
from tcgraph.sampling.conditioning import Text

CALIBRATION_CHUNK = 32  # images per calibration pass at most (calibrate's default chunk)


#################################################################################
#                          Options every learner shares                         #
#################################################################################


def check_learning_options(calib_images: int, held_out: int | None, max_variants: int | None, epochs: int = 1,
                           batch_images: int = 1, min_psnr: float | None = None) -> None:
    """The checks every learned planner's config shares (L2C, TokenCache)."""
    if epochs < 1 or batch_images < 1:
        raise TcgraphError(f"epochs and batch_images must be >= 1, got {epochs} and {batch_images}")
    if min_psnr is not None and not 0 < min_psnr < 200:
        raise TcgraphError(f"min_psnr is a PSNR in dB, in (0, 200), got {min_psnr}")
    if max_variants is not None and max_variants < 2:
        raise TcgraphError(f"max_variants must be >= 2 (the full step and one cache recipe), got {max_variants}")
    if calib_images < 3:
        raise TcgraphError(f"need at least 3 calibration images (some held out), got {calib_images}")
    if held_out is not None and not 1 <= held_out < calib_images:
        raise TcgraphError(f"need more calibration images ({calib_images}) than held out ({held_out})")


def held_out_count(calib_images: int, held_out: int | None) -> int:
    """Calibration images held out for model selection: as given, else a third."""
    return held_out if held_out is not None else max(1, calib_images // 3)


def check_calibration_text(model_config: ModelConfig, text: Text | None, what: str) -> None:
    """Learning on a text-conditioned model needs calibration prompts; a class-conditional one takes none."""
    if model_config.text_conditioned and text is None:
        raise TcgraphError(
            f"learning {what} for a text-conditioned model needs calibration prompts: pass "
            "calibration_text=<a tcgraph.sampling.conditioning.Text of prompt embeddings> to make_plan "
            "(`tcgraph transform --calibration-embeddings FILE`); the prompts decide which branches change")
    if not model_config.text_conditioned and text is not None:
        raise TcgraphError(f"calibration_text is for text-conditioned models; this model is conditioned on class "
                           f"ids, and {what} calibrates it on random labels: drop calibration_text")


def calibration_split(model: DiT, settings: SamplerSettings, cfg, traj: Trajectories | None,
                      progress: Progress, text: Text | None = None, grams: bool | None = None
                      ) -> tuple[Trajectories, Trajectories]:
    """(train, held-out) trajectories of a learned planner's config `cfg` (its `calib_images`,
    `seed`, `num_held_out`, `forecast`): calibrated here (a text-conditioned model on the prompts
    `text`), or the given `traj` checked to match."""
    return calibration_of(model, settings, cfg, traj, progress, text, grams).split(cfg.num_held_out)


def calibration_of(model: DiT, settings: SamplerSettings, cfg, traj: Trajectories | None,
                   progress: Progress, text: Text | None = None, grams: bool | None = None) -> Trajectories:
    """The calibration trajectories of `calibration_split`, not split; with `grams` (by default: with
    forecasting on, `cfg.forecast`), the output Grams of the training and the held-out images come
    with them, computed in the same pass."""
    if traj is None:
        check_calibration_text(model.config, text, "a plan")
        grams = getattr(cfg, "forecast", False) if grams is None else grams
        grams_at = cfg.calib_images - cfg.num_held_out if grams else None
        total = settings.num_steps * len(calibration_chunks(model.config, settings, cfg.calib_images,
                                                            chunk=CALIBRATION_CHUNK, grams_at=grams_at))
        with progress.phase("calibrate", total) as phase:
            traj = calibrate(model, settings, cfg.calib_images, seed=cfg.seed, phase=phase, text=text,
                             chunk=CALIBRATION_CHUNK, grams_at=grams_at)
    elif traj.settings != settings or traj.num_images != cfg.calib_images:
        raise TcgraphError(
            f"the given calibration trajectories were made for {traj.num_images} images and {traj.settings}; "
            f"this plan asks for {cfg.calib_images} images and {settings}: calibrate again or pass matching options")
    return traj


def require_weights(weights: DiT | None, model_config: ModelConfig, what: str) -> DiT:
    """The model itself, which learning needs; a clear error where only its config was given."""
    if weights is None:
        raise TcgraphError(f"learning {what} needs the model's weights, not only its config; "
                           "pass weights=<the DiT> (the CLI loads them from --model)")
    if weights.config != model_config:
        raise TcgraphError(f"the weights are of a model {weights.config}, the plan is asked for {model_config}; "
                           "pass the config of the given weights")
    return weights


#################################################################################
#                   The work of a plan, up front (progress estimates)           #
#################################################################################

# Costs in model rows: one row through the whole model without gradients is 1. A training step
# at a cache step (blended forward, then backward to the logits) costs about GRAD_STEP rows.
GRAD_STEP = 2.2
SELECTION_RUNS = 3  # sampling runs the final choice makes, about (learned, with forecasts, a fixed plan)


def rows_per_image(settings: SamplerSettings) -> int:
    return settings.model_batch // settings.batch


def calibration_cost(settings: SamplerSettings, images: int) -> float:
    return settings.num_steps * images * rows_per_image(settings)


def training_cost(work: list[tuple[int, list[int]]], rows: int) -> float:
    """One epoch of `fit_logits` over the rounds `work` with `rows` model rows per round."""
    return sum(rows * (1 + GRAD_STEP * len(cs)) for _, cs in work if cs)


def scoring_cost(num_steps: int, rows: int, candidates: int) -> float:
    """`plan_errors` of several candidates: full steps shared, cache steps (about half) per candidate."""
    return num_steps * rows * (1 + candidates) / 2


def selection_cost(settings: SamplerSettings, images: int = 8, runs: int = SELECTION_RUNS) -> float:
    return runs * settings.num_steps * images * rows_per_image(settings)


@torch.no_grad()
def seconds_per_row(model: DiT, settings: SamplerSettings, images: int = 4) -> float:
    """What one model row takes here, measured on a small batch (for the first time estimate)."""
    import time

    sampler = sampler_for(settings, model.config)
    cfg = model.config
    x = torch.zeros(images, cfg.in_channels, settings.resolution, settings.resolution)
    y = torch.zeros(images, dtype=torch.long) if not cfg.text_conditioned else None
    if y is None:  # a text model's rows need prompts; no estimate up front
        return 0.0
    inputs = sampler.model_inputs(x, sampler.schedule.generation_order()[0], y)
    mixed_step(model, *inputs, {}, {})  # the first call pays one-off costs
    best = float("inf")
    for _ in range(3):  # the least of a few: what the work costs, less what else the machine did
        start = time.perf_counter()
        mixed_step(model, *inputs, {}, {})
        best = min(best, time.perf_counter() - start)
    return best / inputs[0].shape[0]


#################################################################################
#                          Round skeleton: a full step every K                  #
#################################################################################


def rounds(num_steps: int, interval: int) -> list[tuple[int, list[int]]]:
    """(full step, its cache steps) for a full step every `interval` steps."""
    return [(s0, list(range(s0 + 1, min(s0 + interval, num_steps)))) for s0 in range(0, num_steps, interval)]


def cache_steps(num_steps: int, interval: int) -> list[int]:
    return [s for _, cs in rounds(num_steps, interval) for s in cs]


def max_speedup(cfg: ModelConfig, num_steps: int, interval: int, text_length: int = 0) -> float:
    """The speedup of reusing every branch at every cache step (FORA with this interval)."""
    full, reuse = Recipe.uniform(cfg.depth, COMPUTE, cfg.branches), Recipe.uniform(cfg.depth, REUSE, cfg.branches)
    cs = set(cache_steps(num_steps, interval))
    return speedup_of(cfg, [reuse if s in cs else full for s in range(num_steps)], text_length)


def candidate_intervals(cfg: ModelConfig, num_steps: int, target: float, margin: float = 1.03, *,
                        text_length: int = 0) -> list[int]:
    """The smallest interval that reaches `target` with some slack, and the next one."""
    for k in range(2, num_steps + 1):
        if max_speedup(cfg, num_steps, k, text_length) >= target * margin:
            return [k, k + 1] if k + 1 <= num_steps else [k]
    best = max_speedup(cfg, num_steps, num_steps, text_length)
    raise TcgraphError(f"a predicted speedup of {target}x is out of reach for {num_steps} steps of this model "
                       f"(at most {best:.2f}x with one full step); ask for less")


#################################################################################
#                            Training input-invariant logits                    #
#################################################################################


def full_caches(model: DiT, traj: Trajectories, step: int, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every branch output of the full model at `step`: what a full step leaves in the caches."""
    with torch.no_grad():
        _, used = mixed_step(model, *traj.model_inputs(step, rows), {}, {})
    return used


def round_loss(model: DiT, traj: Trajectories, full_step: int, steps: list[int], weights_at,
               rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed eps MSE over the cache steps of one round; `weights_at(s)` gives the branch weights."""
    caches = full_caches(model, traj, full_step, rows)
    total = torch.zeros(())
    for s in steps:
        out, caches = mixed_step(model, *traj.model_inputs(s, rows), weights_at(s), caches)
        total = total + torch.mean((traj.eps_of(out) - traj.eps[s, rows]) ** 2)
    return total, len(steps)


def fit_logits(model: DiT, traj: Trajectories, logits: torch.Tensor, work: list[tuple[int, list[int]]],
               weights_of: Callable[[torch.Tensor, int], dict], penalty: Callable[[torch.Tensor, list[int]], torch.Tensor],
               *, epochs: int, batch_images: int, lr: float, seed: int,
               phase: Phase = SILENT) -> tuple[torch.Tensor, list[float]]:
    """Adam on input-invariant logits over calibration rounds; the model stays frozen.

    Per round `(full step, cache steps)` of `work`, on a random batch of images:
    loss = (Σ eps MSE + penalty(sigmoid(logits), cache steps)) / #cache steps, with the
    blend weights of step s from `weights_of(sigmoid(logits), s)`. Shared by the L2C
    router and TokenCache's predictor. Returns (trained logits, mean loss per epoch);
    `phase` ticks once per round trained.
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
            phase.tick()
        history.append(epoch_loss)
    return logits.detach().clone(), history


def block_branches(branches, depth: int) -> tuple[tuple[str, ...], ...]:
    """Each block's branches, from `ModelConfig.branches` (one tuple for every block, or one per block)."""
    return tuple(tuple(b) for b in branches) if isinstance(branches[0], (tuple, list)) else (tuple(branches),) * depth


def router_branches(branches) -> tuple[str, ...]:
    """The branch axis of a per-(block, branch) parameter tensor: every branch of any block, in
    `BRANCH_ORDER` (DiT's and PixArt's own tuple; FLUX's attn, mlp, mlp_text)."""
    if not isinstance(branches[0], (tuple, list)):
        return tuple(branches)
    return tuple(b for b in BRANCH_ORDER if any(b in block for block in branches))


def branch_mask(branches, depth: int) -> torch.Tensor | None:
    """[depth, len(router_branches)] bool: which columns a block has; None where every block has all."""
    names, per_block = router_branches(branches), block_branches(branches, depth)
    mask = torch.tensor([[br in block for br in names] for block in per_block])
    return None if bool(mask.all()) else mask


def lambda_unit(model: DiT, traj: Trajectories, interval: int, rows: int = 8) -> float:
    """The data's scale for λ: the eps MSE of reusing everything at a cache step, per branch."""
    depth = model.config.depth
    per_block = block_branches(model.config.branches, depth)
    sub = torch.arange(min(rows, traj.num_images))
    reuse_all = {cache_name(l, br): 0.0 for l in range(depth) for br in per_block[l]}
    total, count = 0.0, 0
    with torch.no_grad():
        for s0, cs in rounds(traj.num_steps, interval):
            if cs:
                mse, n = round_loss(model, traj, s0, cs[:1], lambda s: reuse_all, sub)
                total, count = total + mse.item(), count + n
    return total / max(count, 1) / len(reuse_all)
