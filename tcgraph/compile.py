"""Plan -> one checked static graph per variant.

For each distinct recipe: capture the model, expand its blocks, rewrite with
token_prune (branch_cache for compute/reuse and the cache I/O, then the partial and dynamic
branches, dynamic ones with their input caches `cache.<l>.<branch>.in`),
then run the rewritten graph and the eager reference (`reference_step`) on
the same sample inputs; a disagreement stops the pipeline before anything is exported.
"""
from __future__ import annotations

from typing import Callable

import torch

from tcgraph.errors import TcgraphError
from tcgraph.models.dit import DiT
from tcgraph.passes import capture, expand_blocks, io_names, reference_step, token_prune
from tcgraph.plan.plan import Plan, Recipe

CHECK_ATOL = 1e-4


def example_inputs(model: DiT, plan: Plan, names: list[str], seed: int = 0) -> dict[str, torch.Tensor]:
    """Sample inputs with the plan's static shapes: noise, a mid timestep, labels incl. the null class."""
    cfg, s = model.config, plan.settings
    b = s.model_batch
    g = torch.Generator().manual_seed(seed)
    feeds = {
        "x": torch.randn(b, cfg.in_channels, s.resolution, s.resolution, generator=g),
        "t": torch.randint(0, 1000, (b,), generator=g),
        "y": torch.randint(0, cfg.num_classes + (cfg.class_dropout_prob > 0), (b,), generator=g),
    }
    for name in names:
        if name.startswith("cache."):
            feeds[name] = torch.randn(b, cfg.num_tokens, cfg.hidden_size, generator=g)
    return {n: feeds[n] for n in names}


def rewrite_variant(model: DiT, plan: Plan, recipe: Recipe) -> torch.fx.GraphModule:
    """The pass pipeline for one recipe: capture -> expand_blocks -> token_prune (which runs
    branch_cache for compute/reuse, then rewrites partial and dynamic branches; without them
    it is branch_cache)."""
    gm = capture(model).gm
    gm = expand_blocks(gm)
    return token_prune(gm, recipe, plan.writes(recipe), plan.input_writes(recipe))


@torch.no_grad()
def check_variant(model: DiT, gm: torch.fx.GraphModule, recipe: Recipe, feeds: dict[str, torch.Tensor],
                  atol: float = CHECK_ATOL) -> float:
    """Max abs difference between the rewritten graph and the eager reference, on every output."""
    inputs, outputs = io_names(gm)
    got = gm(*[feeds[n] for n in inputs])
    got = got if isinstance(got, tuple) else (got,)
    caches = {n: v for n, v in feeds.items() if n.startswith("cache.")}
    ref_out, fresh = reference_step(model, feeds["x"], feeds["t"], feeds["y"], recipe, caches, keep_inputs=True)
    worst = 0.0
    for name, value in zip(outputs, got):
        ref = ref_out if name == "out" else fresh[name]
        diff = (value - ref).abs().max().item()
        if not diff <= atol:
            raise TcgraphError(
                f"rewritten graph disagrees with the eager reference on output {name}: max abs diff {diff:.3g} > {atol}"
                f" for recipe {recipe.short()}; this is a bug in a pass, please report it"
            )
        worst = max(worst, diff)
    return worst


def build_variants(model: DiT, plan: Plan, *, check: bool = True,
                   progress: Callable[[str], None] | None = None) -> list:
    """One `VariantGraph` per distinct recipe of `plan`, each checked against the eager reference."""
    from tcgraph.export.onnx import VariantGraph

    model = model.eval()
    if plan.depth != model.config.depth or plan.num_tokens != model.config.num_tokens:
        raise TcgraphError(
            f"plan is for {plan.depth} blocks x {plan.num_tokens} tokens but the model has "
            f"{model.config.depth} blocks x {model.config.num_tokens} tokens; make the plan for this model"
        )
    if plan.settings.cfg_scale > 1.0 and model.config.class_dropout_prob <= 0:
        raise TcgraphError(
            f"guidance {plan.settings.cfg_scale} needs the model's null class, but this model was built with "
            "class_dropout_prob=0 (no null class); use guidance 1 (--guidance 1)"
        )
    variants = []
    for i, recipe in enumerate(plan.variants()):
        vid = f"v{i}"
        if progress:
            progress(f"rewrite {vid}")
        gm = rewrite_variant(model, plan, recipe)
        inputs, outputs = io_names(gm)
        expected = plan.variant_io(recipe)
        if (inputs, outputs) != expected:
            raise TcgraphError(f"variant {vid} has I/O {inputs}->{outputs}, the plan expects {expected[0]}->{expected[1]}")
        feeds = example_inputs(model, plan, inputs, seed=i)
        if check:
            check_variant(model, gm, recipe, feeds)
        variants.append(VariantGraph(id=vid, gm=gm, input_names=inputs, output_names=outputs, example_inputs=feeds))
    return variants
