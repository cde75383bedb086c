"""The last word of every learned planner: forecasting added, then the plan chosen by whole sampling runs.

`finish_learned` takes the recipes a learned planner chose (compute, reuse, partial) and
1. with forecasting on, makes the forecasting version (`learned_forecast`: least-squares
   weights per step, block and branch; only where held-out error drops), within the cache
   memory cap and with no more variants;
2. adds the fixed-interval plans (`fora:N`, and with forecasting on `taylor:N` of orders 1
   and 2) whose predicted speedup is at least the learned plan's (so the plan returned still
   meets its target) and at most `FASTEST_FIXED` times it, and that fit the memory and
   variant caps (`compete=False` leaves them out);
3. samples each candidate eagerly from the noise and conditioning (class ids, or a
   text-conditioned model's calibration prompts) of (up to `SELECTION_IMAGES`) held-out
   calibration images
   along the whole schedule (`evaluate.free_running_samples`), compares with the full
   model's samples from the same noise (PSNR over images in [-1, 1]; the full model's are
   calibration's own, `reference_samples`), and keeps the best.

So a learned plan never loses to a fixed-interval plan of at least its predicted speedup on
its held-out calibration images; the plan's params record every candidate and its score.
Speedups are FLOP-predicted at the plan's `text_length` (a cross branch's FLOPs depend on it).
"""
from __future__ import annotations

import math

import torch

from tcgraph.calibrate import Trajectories
from tcgraph.errors import TcgraphError
from tcgraph.models.official.dit import DiT
from tcgraph.plan.learning.evaluate import free_running_samples, speedup_of
from tcgraph.plan.planners.fixed import ForaConfig, TaylorConfig, make_fora, make_taylor
from tcgraph.plan.learning.forecast import apply_choices, cap_history, choose_forecasts, output_grams
from tcgraph.plan.plan import COMPUTE, Plan, Recipe
from tcgraph.progress import QUIET, Progress
from tcgraph.sampling.conditioning import take

FASTEST_FIXED = 1.3  # fixed plans up to this multiple of the learned plan's predicted speedup compete
FORECAST_POINTS = 3  # history points a learned forecast may use (r <= 4)
SELECTION_IMAGES = 8  # held-out images each candidate samples in the final choice (eager, whole runs)


def psnr(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean PSNR (dB) over images in [-1, 1] (clamped), peak 2."""
    a, b = samples.clamp(-1, 1), reference.clamp(-1, 1)
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return float((10 * torch.log10(4.0 / mse)).mean())


def reference_samples(held: Trajectories, n: int) -> torch.Tensor | None:
    """The full model's samples of the first `n` held-out images, as calibration made them (its run is
    the full model's free-running run from their noise), or None where they must be sampled again:
    not kept, or a stochastic sampler (eta > 0), whose noise a second run would not repeat."""
    if held.samples is None or held.settings.eta != 0:
        return None
    return held.samples[:n]


def cache_mb(plan: Plan, hidden_size: int) -> float:
    return plan.cache_bytes(hidden_size) / 2**20


def finish_learned(model: DiT, train: Trajectories, held: Trajectories, name: str, recipes, params: dict, *,
                   forecast: bool, max_cache_mb: float | None, max_variants: int | None = None,
                   compete: bool = True, grams: tuple | None = None, progress: Progress = QUIET) -> Plan:
    """The plan a learned planner returns (see the module docstring); `params` are its own record.
    `grams`: (train, held) output Grams of `learned_forecast.output_grams` on the same trajectories,
    to share between several calls (benchmarks)."""
    settings, cfg = train.settings, model.config
    base = Plan(name, settings, tuple(recipes), cfg.num_tokens, params=dict(params))
    hidden = cfg.hidden_size
    if max_cache_mb is not None and cache_mb(base, hidden) > max_cache_mb:
        raise TcgraphError(f"the learned plan's caches take {cache_mb(base, hidden):.1f} MB for batch "
                           f"{settings.batch}, over --max-cache-mb {max_cache_mb}; raise the cap, lower the batch "
                           "or ask for a plan that caches less")
    candidates: list[tuple[str, Plan]] = [("learned", base)]
    record: dict = {}
    if forecast:
        if grams is None:
            grams = train.output_grams(), held.output_grams()  # kept by calibration where it could
        if grams[0] is None or grams[1] is None:
            with progress.phase("forecast weights", (train.num_images + 3) // 4 * settings.num_steps
                                + (held.num_images + 3) // 4 * settings.num_steps) as phase:
                grams = output_grams(model, train, phase=phase), output_grams(model, held, phase=phase)
        g_train, g_held = grams
        choices = choose_forecasts(list(base.recipes), g_train, g_held, points=FORECAST_POINTS)
        slot = settings.model_batch * cfg.num_tokens * hidden * 4
        budget = None if max_cache_mb is None else int(max_cache_mb * 2**20) - base.cache_bytes(hidden)
        kept = cap_history(choices, slot, budget)
        if kept:
            new_recipes, weights = apply_choices(list(base.recipes), kept)
            candidates.append(("learned+forecast", Plan(name, settings, new_recipes, cfg.num_tokens,
                                                        params=dict(params), weights=weights)))
        record = {"forecast_branch_steps": len(kept), "forecast_candidates": len(choices),
                  "forecast_dropped_by_memory_cap": len(choices) - len(kept)}
    length = settings.text_length
    target = speedup_of(cfg, base.recipes, length)
    for interval in range(2, settings.num_steps + 1 if compete else 2):
        fixed = [make_fora(ForaConfig(interval), cfg, settings)]
        if forecast:
            fixed += [make_taylor(TaylorConfig(interval, order), cfg, settings) for order in (1, 2)]
        for plan in fixed:
            fits = ((max_cache_mb is None or cache_mb(plan, hidden) <= max_cache_mb)
                    and (max_variants is None or len(plan.variants()) <= max_variants))
            if fits and target <= speedup_of(cfg, plan.recipes, length) <= FASTEST_FIXED * target:
                candidates.append((plan.planner, plan))
        if speedup_of(cfg, fixed[0].recipes, length) > FASTEST_FIXED * target:
            break
    # the held-out images' own conditioning: class ids, or a text model's prompts (a `Text`)
    noise, labels = held.x[0, :SELECTION_IMAGES], take(held.y, slice(0, SELECTION_IMAGES))
    scored = []
    kept = reference_samples(held, SELECTION_IMAGES)
    with progress.phase("choose by sampling runs", len(candidates) + (kept is None)) as phase:
        if kept is None:
            full = Plan("full", settings, tuple(Recipe.uniform(cfg.depth, COMPUTE, cfg.branches)
                                                for _ in range(settings.num_steps)), cfg.num_tokens)
            reference = free_running_samples(model, full, noise, labels)
            phase.tick("full")
        else:
            reference = kept
        for label, plan in candidates:
            scored.append((psnr(free_running_samples(model, plan, noise, labels), reference), label, plan))
            phase.tick(label)
    best_psnr, best_label, best = max(scored, key=lambda c: (c[0], c[1] == "learned+forecast", c[1] == "learned"))
    record.update({
        "selected": best_label,
        "selection": [{"candidate": label, "predicted_speedup": round(speedup_of(cfg, plan.recipes, length), 4),
                       "held_out_psnr": round(p, 3) if math.isfinite(p) else None,
                       "cache_mb": round(cache_mb(plan, hidden), 3)} for p, label, plan in scored],
        "selection_images": len(labels),
    })
    out = dict(params)
    out.update(record)
    out["predicted_speedup"] = round(speedup_of(cfg, best.recipes, length), 4)
    if best_label not in ("learned", "learned+forecast"):
        out["method"] = f"{params.get('method', name)}, replaced by the fixed plan {best_label}"
    return Plan(name, settings, best.recipes, cfg.num_tokens, params=out, weights=best.weights)
