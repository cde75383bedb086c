"""FLOP accounting: per branch, per variant, per sampling run (multiply-add = 2 FLOPs).

Counts the matrix products and attention (the work caching removes); element-wise work
(norms, modulation, gates) is left out, which is why realized speedups fall short of
predicted ones — the benchmark reports both.

A `dynamic(k)` branch counts as `partial` with k tokens plus its token score,
||u - u_cached||² summed over D for all N tokens: one multiply-add per element, 2·N·D
per branch per sample (the subtraction, TopK, gathers and scatters are not counted).

A `cross` branch (cross-attention to L text tokens, PixArt) counts q and the output
projection for its k query rows, keys and values of the L text tokens, and k × L scores; L
is the plan's `text_length`. Keys and values of the text are run constants (tcgraph.plan.plan):
where the plan carries them, only its first step projects them (and the caption), and a
later step's cross branch counts q, the output projection and the scores alone.

A `forecast(n)` branch runs no matrix product: it counts 0, like `reuse`. Its weighted sum
of n history tensors (n multiply-adds per element) is element-wise work like the gates and
norms left out above, so it shows in the realized/predicted ratio, which the benchmarks
report for forecast plans.

Rows by layout (tcgraph.models.layout; docs/design.md, "Block kinds, streams and per-block
layouts"). A branch's rows are those of the streams it writes: N image rows for a DiT's or
PixArt's branches, L text rows for `mlp_text`, L + N for a joint attention or a FLUX single
block's MLP. An `attn` of a model with a text stream is joint attention: its keys and values are
the L + N rows of both streams, also where it writes the image rows alone (SD3's last block,
whose text gives keys and values only); `attn_image` (SD3.5) attends over the image rows. A
token action keeps k image rows and recomputes every other row of the branch; the score of a
dynamic branch is over its N image rows. The fixed work of a FLUX or SD3 step (its embeddings,
each block's modulations, the final layer) is counted by that family's own formula (a config's
`step_fixed_flops` where the family defines one: FLUX, SD3).
"""
from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

from tcgraph.models.families import ModelConfig
from tcgraph.names import IMAGE, TEXT_STREAM
from tcgraph.plan.plan import Action, Plan, Recipe

ATTENTIONS = ("attn", "attn_image")  # branches that are attention (q, k, v, scores, mix, output projection)


def branch_flops(cfg: ModelConfig, branch: str, action: Action, text_length: int = 0, constants_read: bool = False,
                 streams: tuple[str, ...] = (IMAGE,), joint: bool = False) -> int:
    """FLOPs of one branch for one sample (`text_length`: the plan's L, the text tokens a cross branch
    attends to; `constants_read`: its keys and values of the text are read, not projected; `streams`:
    the streams the branch writes, as the layout says (`branch_rows`); `joint`: an attention whose keys
    and values are the rows of both streams, L + N)."""
    n, d, m = cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden
    if action.kind in ("reuse", "forecast"):
        return 0
    image = n if IMAGE in streams else 0
    other = text_length if TEXT_STREAM in streams else 0
    rows = other + (image if action.kind == "compute" else action.k)  # token actions keep k image rows
    score = 2 * n * d if action.kind == "dynamic" else 0
    if branch == "cross":
        # q and the output projection for the k query rows; k and v for the text; k x L scores and mix.
        kv = 0 if constants_read else 2 * text_length * d * 2 * d
        return 2 * rows * d * d * 2 + kv + 2 * 2 * rows * text_length * d + score
    if branch in ATTENTIONS:
        # q and the output projection for the query rows; k and v for every row queries attend to.
        keys = text_length + n if joint else image + other
        return 2 * rows * d * d * 2 + 2 * keys * d * 2 * d + 2 * 2 * rows * keys * d + score
    return 2 * 2 * rows * d * m + score


@lru_cache(maxsize=64)
def _layout(cfg: ModelConfig):
    """The model's layout, None for the default one (every branch of image rows)."""
    layout = cfg.block_layout()
    return None if layout.is_default else layout


def branch_rows(cfg: ModelConfig, block: int, branch: str) -> dict:
    """`branch_flops`'s `streams` and `joint` of a block's branch, from the model's layout."""
    layout = _layout(cfg)
    if layout is None:
        return {}
    two_stream = any(TEXT_STREAM in streams for b in layout.blocks for _, streams in b)
    return {"streams": layout.streams(block, branch), "joint": two_stream and branch == "attn"}


def fixed_flops(cfg: ModelConfig, text_length: int = 0, constants_read: bool = False) -> int:
    """FLOPs every step spends whatever the recipe: embeddings, adaLN, final layer (and a text
    model's caption projection of its `text_length` tokens, unless the step reads the run constants)."""
    n, d, p = cfg.num_tokens, cfg.hidden_size, cfg.patch_size
    patch = 2 * n * p * p * cfg.in_channels * d
    t_embed = 2 * 256 * d + 2 * d * d
    own = getattr(cfg, "step_fixed_flops", None)  # a family whose fixed work differs says it (FLUX, SD3)
    if own is not None:
        return own(text_length)
    if cfg.family.shared_modulation:  # one adaLN-single linear shared by the blocks; a table-only final modulation
        adaln = 2 * d * 6 * d
        caption = 0 if constants_read else 2 * text_length * (cfg.caption_channels * d + d * d)
    else:
        adaln = cfg.depth * 2 * d * 6 * d + 2 * d * 2 * d
        caption = 0
    final = 2 * n * d * p * p * cfg.out_channels
    return patch + t_embed + adaln + caption + final


def recipe_flops(cfg: ModelConfig, recipe: Recipe, batch: int, text_length: int = 0) -> int:
    """FLOPs of one step of `recipe` for a model batch of `batch` rows (each branch's rows from the
    model's layout: `branch_rows`)."""
    read = recipe.constants == "read"
    per_sample = fixed_flops(cfg, text_length, read) + sum(
        branch_flops(cfg, br, a, text_length, read, **branch_rows(cfg, b, br)) for b, br, a in recipe.items())
    return per_sample * batch


def plan_flops(cfg: ModelConfig, plan: Plan) -> dict:
    """Per-variant and whole-run FLOPs, and the predicted speedup over computing everything.

    `full_total` is the `full` plan's run with the same run constants (carried or not), the baseline
    the benchmarks time against; `recomputed_total` computes every step whole, text keys and values
    included (what the model's own forward does), and `constants_speedup` is their ratio."""
    batch, length = plan.settings.model_batch, plan.settings.text_length
    return run_flops(plan, lambda recipe: recipe_flops(cfg, recipe, batch, length))


def run_flops(plan: Plan, step_flops) -> dict:
    """`plan_flops`'s summary from any per-step cost `step_flops(recipe) -> FLOPs` (the formulas
    here, or a measured cost table: `tcgraph.plan.costs.predict_flops`)."""
    full_recipe = Recipe.uniform(plan.depth, Action("compute"), plan.branches)
    full = step_flops(full_recipe)
    per_variant = {f"v{i}": step_flops(r) for i, r in enumerate(plan.variants())}
    total = sum(per_variant[v] for v in plan.schedule())
    full_total = sum(step_flops(replace(full_recipe, constants=r.constants)) for r in plan.recipes)
    recomputed_total = full * plan.settings.num_steps
    return {
        "full_step": full,
        "per_variant": per_variant,
        "fraction": {v: f / full for v, f in per_variant.items()},
        "total": total,
        "full_total": full_total,
        "recomputed_total": recomputed_total,
        "constants_speedup": recomputed_total / full_total,
        "predicted_speedup": full_total / total,
    }
