"""FLOP accounting: per branch, per variant, per sampling run (multiply-add = 2 FLOPs).

Counts the matrix products and attention (the work caching removes); element-wise work
(norms, modulation, gates) is left out, which is why realized speedups fall short of
predicted ones — the benchmark reports both.

A `dynamic(k)` branch counts as `partial` with k tokens plus its token score,
||u - u_cached||² summed over D for all N tokens: one multiply-add per element, 2·N·D
per branch per sample (the subtraction, TopK, gathers and scatters are not counted).

A `forecast(n)` branch runs no matrix product: it counts 0, like `reuse`. Its weighted sum
of n history tensors (n multiply-adds per element) is element-wise work like the gates and
norms left out above, so it shows in the realized/predicted ratio, which the benchmarks
report for forecast plans.
"""
from __future__ import annotations

from tcgraph.models.dit import DiTConfig
from tcgraph.plan.plan import Action, Plan, Recipe


def branch_flops(cfg: DiTConfig, branch: str, action: Action) -> int:
    """FLOPs of one branch for one sample."""
    n, d, m = cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden
    if action.kind in ("reuse", "forecast"):
        return 0
    k = n if action.kind == "compute" else action.k
    score = 2 * n * d if action.kind == "dynamic" else 0
    if branch == "attn":
        # q for the k kept tokens; k and v for every token (queries attend to all keys).
        qkv = 2 * k * d * d + 2 * n * d * 2 * d if k < n else 2 * n * d * 3 * d
        scores_and_mix = 2 * 2 * k * n * d
        proj = 2 * k * d * d
        return qkv + scores_and_mix + proj + score
    return 2 * 2 * k * d * m + score


def fixed_flops(cfg: DiTConfig) -> int:
    """FLOPs every step spends whatever the recipe: embeddings, adaLN, final layer."""
    n, d, p = cfg.num_tokens, cfg.hidden_size, cfg.patch_size
    patch = 2 * n * p * p * cfg.in_channels * d
    t_embed = 2 * 256 * d + 2 * d * d
    adaln = cfg.depth * 2 * d * 6 * d + 2 * d * 2 * d
    final = 2 * n * d * p * p * cfg.out_channels
    return patch + t_embed + adaln + final


def recipe_flops(cfg: DiTConfig, recipe: Recipe, batch: int) -> int:
    """FLOPs of one step of `recipe` for a model batch of `batch` rows."""
    per_sample = fixed_flops(cfg) + sum(branch_flops(cfg, br, a) for _, br, a in recipe.items())
    return per_sample * batch


def plan_flops(cfg: DiTConfig, plan: Plan) -> dict:
    """Per-variant and whole-run FLOPs, and the predicted speedup over computing everything."""
    batch = plan.settings.model_batch
    full = recipe_flops(cfg, Recipe.uniform(plan.depth, Action("compute")), batch)
    per_variant = {f"v{i}": recipe_flops(cfg, r, batch) for i, r in enumerate(plan.variants())}
    total = sum(per_variant[v] for v in plan.schedule())
    full_total = full * plan.settings.num_steps
    return {
        "full_step": full,
        "per_variant": per_variant,
        "fraction": {v: f / full for v, f in per_variant.items()},
        "total": total,
        "full_total": full_total,
        "predicted_speedup": full_total / total,
    }
