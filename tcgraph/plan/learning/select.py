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
   calibration's own, `reference_samples`), and keeps the best; with a quality floor
   (`--min-psnr DB`), the fastest candidate (FLOP-predicted) whose PSNR reaches it, and where
   no target speedup was asked for, the fixed-interval plans of every speed compete too
   (`choose`). The chosen plan's PSNR is its params' `held_out_psnr`: the estimate.

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
from tcgraph.names import cache_name
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


def choose(scored: list[tuple[float, str, Plan]], min_psnr: float | None, cfg, text_length: int = 0
           ) -> tuple[float, str, Plan]:
    """The final choice among (held-out PSNR, label, plan): the best PSNR (ties: the learned plan
    with forecasts, then the learned plan); with `min_psnr`, the fastest plan (FLOP-predicted) whose
    PSNR is at least it (ties: the better PSNR), or an error that says the best reached."""
    if min_psnr is None:
        return max(scored, key=lambda c: (c[0], c[1] == "learned+forecast", c[1] == "learned"))
    meeting = [c for c in scored if c[0] >= min_psnr]
    if not meeting:
        value, label, plan = max(scored, key=lambda c: c[0])
        speed = speedup_of(cfg, plan.recipes, text_length)
        raise TcgraphError(f"no candidate reaches --min-psnr {min_psnr} dB on the held-out calibration images: the "
                           f"best is {label} at {value:.2f} dB (predicted {speed:.2f}x); ask for a lower --min-psnr "
                           "or a lower --target-speedup")
    return max(meeting, key=lambda c: (round(speedup_of(cfg, c[2].recipes, text_length), 6), c[0],
                                       c[1] == "learned+forecast", c[1] == "learned"))


def cache_mb(plan: Plan, hidden_size: int) -> float:
    return plan.cache_bytes(hidden_size) / 2**20


def finish_learned(model: DiT, train: Trajectories, held: Trajectories, name: str, recipes, params: dict, *,
                   forecast: bool, max_cache_mb: float | None, max_variants: int | None = None,
                   compete: bool = True, grams: tuple | None = None, min_psnr: float | None = None,
                   speedup_given: bool = True, progress: Progress = QUIET) -> Plan:
    """The plan a learned planner returns (see the module docstring); `params` are its own record.
    `grams`: (train, held) output Grams of `learned_forecast.output_grams` on the same trajectories,
    to share between several calls (benchmarks). `min_psnr`: the quality floor (`choose`); with
    `speedup_given` False (no target was asked for), fixed plans of any speed compete too."""
    settings, cfg = train.settings, model.config
    if min_psnr is not None and not speedup_given:  # the default target trained the router; the floor chose
        name = f"{name.split(':')[0]} (min PSNR {min_psnr:g} dB)"
    layout = cfg.block_layout()
    base = Plan(name, settings, tuple(recipes), cfg.num_tokens, params=dict(params), layout=layout)
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
        choices = choose_forecasts(list(base.recipes), g_train, g_held, points=FORECAST_POINTS,
                                   image_rows=lambda key: layout.image_slice(*key, base.stream_rows))
        slot = (lambda key: settings.model_batch * base.cache_rows(cache_name(*key)) * hidden * 4)
        budget = None if max_cache_mb is None else int(max_cache_mb * 2**20) - base.cache_bytes(hidden)
        kept = cap_history(choices, slot, budget)
        if kept:
            new_recipes, weights = apply_choices(list(base.recipes), kept)
            candidates.append(("learned+forecast", Plan(name, settings, new_recipes, cfg.num_tokens,
                                                        params=dict(params), weights=weights, layout=layout)))
        record = {"forecast_branch_steps": len(kept), "forecast_candidates": len(choices),
                  "forecast_dropped_by_memory_cap": len(choices) - len(kept)}
    length = settings.text_length
    target = speedup_of(cfg, base.recipes, length)
    open_speed = min_psnr is not None and not speedup_given  # a quality floor alone: fixed plans of any speed

    def fixed_plans(interval: int) -> list[Plan]:
        fixed = [make_fora(ForaConfig(interval), cfg, settings)]
        if forecast:
            fixed += [make_taylor(TaylorConfig(interval, order), cfg, settings) for order in (1, 2)]
        return [plan for plan in fixed if (max_cache_mb is None or cache_mb(plan, hidden) <= max_cache_mb)
                and (max_variants is None or len(plan.variants()) <= max_variants)]

    for interval in range(2, settings.num_steps + 1 if compete and not open_speed else 2):
        for plan in fixed_plans(interval):
            if target <= speedup_of(cfg, plan.recipes, length) <= FASTEST_FIXED * target:
                candidates.append((plan.planner, plan))
        if speedup_of(cfg, make_fora(ForaConfig(interval), cfg, settings).recipes, length) > FASTEST_FIXED * target:
            break
    # the held-out images' own conditioning: class ids, or a text model's prompts (a `Text`)
    noise, labels = held.x[0, :SELECTION_IMAGES], take(held.y, slice(0, SELECTION_IMAGES))
    scored = []
    stored = reference_samples(held, SELECTION_IMAGES)
    scan = (range(2, settings.num_steps + 1) if open_speed and compete else range(0))
    # the open scan stops at the first interval none of whose plans meets the floor: a bound on its runs
    bound = len(scan) * (3 if forecast else 1)
    with progress.phase("choose by sampling runs" + (" (at most; stops early)" if bound else ""),
                        len(candidates) + (stored is None) + bound) as phase:
        if stored is None:
            full = Plan("full", settings, tuple(Recipe.uniform(cfg.depth, COMPUTE, cfg.branches)
                                                for _ in range(settings.num_steps)), cfg.num_tokens, layout=layout)
            reference = free_running_samples(model, full, noise, labels)
            phase.tick("full")
        else:
            reference = stored

        def score(label: str, plan: Plan) -> float:
            value = round(psnr(free_running_samples(model, plan, noise, labels), reference), 3)
            scored.append((value, label, plan))
            phase.tick(label)
            return value

        for label, plan in candidates:
            score(label, plan)
        for interval in scan:  # fixed plans from the slowest up, until one interval has none that meets it
            values = [score(plan.planner, plan) for plan in fixed_plans(interval)]
            if values and all(v < min_psnr for v in values):
                break
    best_psnr, best_label, best = choose(scored, min_psnr, cfg, length)
    record.update({
        "selected": best_label,
        "held_out_psnr": best_psnr if math.isfinite(best_psnr) else None,
        "min_psnr": min_psnr,
        "selection": [{"candidate": label, "predicted_speedup": round(speedup_of(cfg, plan.recipes, length), 4),
                       "held_out_psnr": p if math.isfinite(p) else None,
                       "cache_mb": round(cache_mb(plan, hidden), 3)} for p, label, plan in scored],
        "selection_images": len(labels),
    })
    out = dict(params)
    out.update(record)
    out["predicted_speedup"] = round(speedup_of(cfg, best.recipes, length), 4)
    if best_label not in ("learned", "learned+forecast"):
        out["method"] = f"{params.get('method', name)}, replaced by the fixed plan {best_label}"
    return Plan(name, settings, best.recipes, cfg.num_tokens, params=out, weights=best.weights, layout=layout)
