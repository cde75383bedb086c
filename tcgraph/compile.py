"""Plan -> one checked static graph per variant.

For each distinct recipe of a plan: capture the model (its blocks as fx leaves, as its
model adapter names them), expand the blocks, then run the rewrite passes of `PIPELINE`
in order, each given the variant's `RewriteSpec` (the recipe, and the caches and input
caches it writes, from the plan):

    cache_io       graph inputs/outputs: `cache.<l>.<branch>` (and `….in` for dynamic branches, run constants)
    run_constants  a later step's cross branch reads the text's keys and values (`cache.<l>.cross.k`/`.v`)
    reuse          a reused branch reads its cache input
    forecast       a forecast branch is a weighted sum of its history inputs (weights: input `forecast.w`)
    token_prune    a partial branch recomputes its constant kept tokens
    token_dynamic  a dynamic branch recomputes the k tokens per sample whose input changed most

Then the rewritten graph and the eager reference (`reference_step`) run on the same
sample inputs; a disagreement stops before anything is exported. A new action is one more
pass in `PIPELINE`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
import torch.nn as nn

from tcgraph.errors import TcgraphError
from tcgraph.models.adapter import adapter_for
from tcgraph.names import (FORECAST_WEIGHTS, GATE_ACC, GATE_COUNT, GATE_PARAMS, GATE_REF, GATE_SKIPS, GATE_TIMES,
                           GUIDANCE, IMAGE, OUT, POOLED, TEXT, TEXT_MASK, cache_name, history_name, is_cache, is_model_input)
from tcgraph.passes import (
    RewriteSpec,
    cache_io,
    capture,
    expand_blocks,
    forecast,
    io_names,
    reference_step,
    reuse,
    run_constants,
    token_dynamic,
    token_prune,
)
from tcgraph.models.layout import Layout
from tcgraph.passes.gated import GatedStep, gated_step
from tcgraph.plan.gate import FORCE_COMPUTE, lagrange_weights
from tcgraph.plan.plan import Plan, Recipe
from tcgraph.progress import QUIET, Progress

CHECK_ATOL = 1e-4

Pass = Callable[[fx.GraphModule, RewriteSpec], fx.GraphModule]

# The rewrite passes, in the order they run. cache_io comes first: the others connect the
# cache inputs it adds.
PIPELINE: tuple[Pass, ...] = (cache_io, run_constants, reuse, forecast, token_prune, token_dynamic)


@dataclass
class VariantGraph:
    """One variant: a static fx graph and the names of its graph inputs and outputs.

    `gm` takes its placeholders in the order of `input_names` and returns one tensor or
    a tuple in the order of `output_names`. Names follow docs/design.md ("Graph interface of
    a variant"): `x`, `t`, `y`, then `cache.<block>.<branch>` inputs; `out`, then cache
    outputs. `example_inputs` fixes the (static) shapes and is used to verify the export.
    Defined here, where variants are made; export reads it as a structural type
    (`tcgraph.export.onnx.ExportableVariant`) and checks it before exporting.
    """

    id: str
    gm: fx.GraphModule
    input_names: list[str]
    output_names: list[str]
    example_inputs: dict[str, torch.Tensor] = field(repr=False)


def example_inputs(model: nn.Module, plan: Plan, names: list[str], seed: int = 0,
                   recipe: Recipe | None = None) -> dict[str, torch.Tensor]:
    """Sample inputs with the plan's static shapes: noise, a mid timestep, labels incl. the null class
    (a text-conditioned model: random text embeddings, a mask with padding in every other row), and,
    for a `recipe` that forecasts, random weights `forecast.w` around the Taylor ones' size."""
    cfg, s = model.config, plan.settings
    g = torch.Generator().manual_seed(seed)
    feeds = {i.name: _example(i, cfg, g) for i in cfg.family.graph_inputs(cfg, s)}  # as the family declares them
    for name in names:
        if is_cache(name):  # a branch cache [B, N, D], or a run constant (the text's keys, values) [B, L, D]
            feeds[name] = torch.randn(plan.cache_shape(name, cfg.hidden_size), generator=g)
    if FORECAST_WEIGHTS in names:
        if recipe is None:
            raise TcgraphError("example inputs of a forecasting variant need its recipe (the layout of forecast.w)")
        size = sum(points for _, points in recipe.forecasts())
        feeds[FORECAST_WEIGHTS] = torch.randn(size, generator=g)
    if GATE_PARAMS in names:  # a gated step: a reference, a running sum, history at distinct earlier steps
        points, keys = plan.gate.points, plan.gate_shape(GATE_TIMES, cfg.hidden_size)[0]
        # each branch's own steps (three spacings by row): a path reading another branch's row disagrees
        times = [[float(3 + 2 * points - 2 * j - (k % 3) * (j + 1)) for j in range(points)] for k in range(keys)]
        feeds.update({GATE_REF: torch.randn(plan.gate_shape(GATE_REF, cfg.hidden_size), generator=g),
                      GATE_ACC: torch.tensor([0.01]), GATE_SKIPS: torch.tensor([0.0]), GATE_COUNT: torch.tensor([3.0, 2.5]),
                      GATE_TIMES: torch.tensor(times),
                      GATE_PARAMS: torch.tensor([float(4 + 2 * points), FORCE_COMPUTE, 2.0, 0.75, 0.25])})
    return {n: feeds[n] for n in names}


def _example(spec, cfg, g: torch.Generator) -> torch.Tensor:
    """Sample values of one declared model input, of the kind it is."""
    if spec.kind == "timestep":
        return torch.randint(0, 1000, spec.shape, generator=g).to(getattr(torch, spec.dtype))
    if spec.kind == "class":  # labels incl. the null class
        return torch.randint(0, cfg.num_classes + (cfg.class_dropout_prob > 0), spec.shape, generator=g)
    if spec.kind == "mask":
        mask = torch.ones(spec.shape)
        mask[1::2, (spec.shape[1] + 1) // 2:] = 0  # padded prompts: the mask must matter
        return mask
    if spec.kind == "guidance":  # scales >= 1, differing by row
        return 1.0 + 4.0 * torch.rand(spec.shape, generator=g)
    if spec.kind in ("latent", "text", "pooled"):
        return torch.randn(spec.shape, generator=g)
    raise TcgraphError(f"no example values for a model input of kind {spec.kind!r} ({spec.name})")


def conditioning_of(feeds: dict[str, torch.Tensor]):
    """The model's conditioning in a variant's feeds: class ids `y`, or (text embeddings, mask); with a
    guidance input, a tuple of those and the scale last (what `run_blocks` and the model read after x, t)."""
    cond = (feeds[TEXT], feeds[POOLED] if POOLED in feeds else feeds[TEXT_MASK]) if TEXT in feeds else feeds["y"]
    if GUIDANCE in feeds:
        return (*(cond if isinstance(cond, tuple) else (cond,)), feeds[GUIDANCE])
    return cond


def rewrite(model: nn.Module, spec: RewriteSpec, pipeline: tuple[Pass, ...] = PIPELINE) -> fx.GraphModule:
    """capture -> expand_blocks -> each pass of `pipeline`, for one variant."""
    gm = expand_blocks(capture(model).gm)
    for rewrite_pass in pipeline:
        gm = rewrite_pass(gm, spec)
    return gm


def rewrite_variant(model: nn.Module, plan: Plan, recipe: Recipe) -> fx.GraphModule:
    """The rewritten graph of `recipe` as a step of `plan` (it writes what later steps read)."""
    return rewrite(model, RewriteSpec.of(plan, recipe))


def rewrite_gated(model: nn.Module, recipe: Recipe) -> tuple[GatedStep, list[str], list[str]]:
    """The gated step of a gated `recipe` (`tcgraph.passes.gated`), with its input and output names."""
    return gated_step(lambda r, writes: rewrite(model, RewriteSpec(r, writes)), recipe)


@torch.no_grad()
def check_gated(model: nn.Module, step: nn.Module, recipe: Recipe, names: tuple[list[str], list[str]],
                feeds: dict[str, torch.Tensor], atol: float = CHECK_ATOL) -> float:
    """Max abs difference between a gated step and the eager reference, on every output, on both paths:
    forced to compute (threshold below 0), then forced to skip (a threshold no change reaches)."""
    inputs, outputs = names
    gate, keys = recipe.gate, recipe.gated_keys()
    x, t, cond = feeds["x"], feeds["t"], conditioning_of(feeds)
    h_first = _block_output(model, x, t, cond, gate.first - 1)
    change = ((h_first - feeds[GATE_REF]).abs().mean() / feeds[GATE_REF].abs().mean().clamp_min(1e-12)).reshape(1)
    indicator = change if gate.indicator == "anchor" else feeds[GATE_ACC] + change
    step_index, r = float(feeds[GATE_PARAMS][0]), gate.points
    worst = 0.0
    for skip in (False, True):
        share = feeds[GATE_PARAMS][3:5]  # the step's work when it computes, when it skips
        params = torch.cat([torch.tensor([step_index, 1e30 if skip else FORCE_COMPUTE, 1e9]), share])
        run = {**feeds, GATE_PARAMS: params}
        got = dict(zip(outputs, step(*[run[n] for n in inputs])))
        want = {GATE_COUNT: feeds[GATE_COUNT] + torch.stack([torch.tensor(0.0 if skip else 1.0), share[int(skip)]])}
        times = {k: feeds[GATE_TIMES][i] for i, k in enumerate(keys)}  # each later branch's own row
        if skip:
            w = [wj for k in keys for wj in lagrange_weights(times[k].tolist(), step_index)]
            caches = {n: v for n, v in feeds.items() if is_cache(n)}
            caches[FORECAST_WEIGHTS] = torch.tensor(w, dtype=torch.float32)
            want[OUT], _ = reference_step(model, x, t, cond, recipe.cheap(), caches)
            want.update({n: feeds[n] for n in outputs if is_cache(n)})
            want.update({GATE_REF: feeds[GATE_REF] if gate.indicator == "anchor" else h_first, GATE_ACC: indicator,
                         GATE_SKIPS: feeds[GATE_SKIPS] + 1, GATE_TIMES: feeds[GATE_TIMES]})
        else:  # a later branch the path computes shifts in its output and the step; one it reuses or forecasts
            path, weights = recipe.computing(), []  # reads its own history and rows, and hands them on
            for (b, br), n in path.forecasts():
                weights += lagrange_weights(times[(b, br)][:n].tolist(), step_index)
            caches = {n: v for n, v in feeds.items() if is_cache(n)}
            caches[FORECAST_WEIGHTS] = torch.tensor(weights, dtype=torch.float32)
            want[OUT], fresh = reference_step(model, x, t, cond, path, caches)
            rows = []
            for b, br in keys:
                entries = [feeds[history_name(b, br, j)] for j in range(r)]
                row = times[(b, br)]
                if path.action(b, br).computes:
                    entries, row = [fresh[cache_name(b, br)]] + entries[:r - 1], torch.cat([params[:1], row[:r - 1]])
                want.update({history_name(b, br, j): e for j, e in enumerate(entries)})
                rows.append(row)
            want.update({GATE_REF: h_first, GATE_ACC: torch.zeros(1), GATE_SKIPS: torch.zeros(1),
                         GATE_TIMES: torch.stack(rows)})
        for name in outputs:
            diff = (got[name] - want[name]).abs().max().item()
            if not diff <= atol:
                raise TcgraphError(f"gated step disagrees with the eager reference on output {name} "
                                   f"({'skipping' if skip else 'computing'}): max abs diff {diff:.3g} > {atol} for "
                                   f"{recipe.short()}; this is a bug in the gated pass, please report it")
            worst = max(worst, diff)
    return worst


def _block_output(model: nn.Module, x, t, cond, block: int) -> torch.Tensor:
    """The image hidden state out of block `block` of the model's own forward (the adapter's block loop,
    every branch computed), what a gated step forms its indicator from."""
    seen = {}
    adapter_for(model).run_blocks(model, x, t, cond, lambda l, name, u, fn: fn(u()),
                                  after_block=lambda l, hs: seen.setdefault(l, hs[IMAGE]))
    return seen[block]


@torch.no_grad()
def check_variant(model: nn.Module, gm: fx.GraphModule, recipe: Recipe, feeds: dict[str, torch.Tensor],
                  atol: float = CHECK_ATOL) -> float:
    """Max abs difference between the rewritten graph and the eager reference, on every output."""
    inputs, outputs = io_names(gm)
    got = gm(*[feeds[n] for n in inputs])
    got = got if isinstance(got, tuple) else (got,)
    caches = {n: v for n, v in feeds.items() if not is_model_input(n)}
    ref_out, fresh = reference_step(model, feeds["x"], feeds["t"], conditioning_of(feeds), recipe, caches,
                                    keep_inputs=True)
    worst = 0.0
    for name, value in zip(outputs, got):
        ref = ref_out if name == OUT else fresh[name]
        if not bool(torch.isfinite(ref).all()):  # NaN != NaN: not a pass's fault, and no rewrite can match it
            bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
            cause = (f"the model's weights are not finite ({len(bad)} tensors hold NaN or inf, e.g. {', '.join(bad[:3])}):"
                     " use another checkpoint" if bad else
                     "the model overflows on these sample inputs although its weights are finite: check the checkpoint")
            raise TcgraphError(f"the eager model's output {name} holds NaN or inf for recipe {recipe.short()}; {cause}")
        diff = (value - ref).abs().max().item()
        if not diff <= atol:
            raise TcgraphError(
                f"rewritten graph disagrees with the eager reference on output {name}: max abs diff {diff:.3g} > {atol}"
                f" for recipe {recipe.short()}; this is a bug in a pass, please report it"
            )
        worst = max(worst, diff)
    return worst


def build_variants(model: nn.Module, plan: Plan, *, check: bool = True,
                   progress: Progress = QUIET) -> list[VariantGraph]:
    """One `VariantGraph` per distinct recipe of `plan`, each checked against the eager reference.

    Reports one phase, `rewrite`, with one tick per variant."""
    model = model.eval()
    adapter = adapter_for(model)
    dims = adapter.dims(model)
    have, want = plan.block_layout(), Layout(adapter.layout(model))
    if have != want:
        uniform = plan.layout is None and not plan.recipes[0].per_block and adapter.uniform
        what = ((f"blocks with branches {list(plan.branches)}", f"{list(adapter.branch_names)}") if uniform
                else (f"the layout {have.to_json()}", f"{want.to_json()}"))
        raise TcgraphError(f"plan is for {what[0]} but {adapter.name} blocks have {what[1]}; make the plan for this model")
    if plan.depth != dims.depth or plan.num_tokens != dims.num_tokens:
        raise TcgraphError(
            f"plan is for {plan.depth} blocks x {plan.num_tokens} tokens but the model has "
            f"{dims.depth} blocks x {dims.num_tokens} tokens; make the plan for this model"
        )
    missing = sorted({br for _, br in plan.constant_keys()
                      if any(kind.branch(br).prepare is None for kind in adapter.kinds)})
    if missing:
        raise TcgraphError(
            f"plan carries run constants of the {', '.join(missing)} branch but {adapter.name}'s does not make "
            "them apart from its forward; make the plan with carry_constants=False"
        )
    kinds = [kind for _, kind in adapter.block_table(model)]
    keys_only = sorted({(l, br) for r in plan.recipes for l, br, a in r.items()
                        if a.kind == "dynamic" and kinds[l].branch(br).reads_only})
    if keys_only:
        raise TcgraphError(
            f"plan has dynamic actions on {', '.join(f'block {l} {br}' for l, br in keys_only)}, which reads a stream "
            "for keys and values only (SD3's last joint attention: its input has rows its output lacks, so the "
            "change of its input cannot choose output rows); compute, reuse, forecast or prune it (partial) instead"
        )
    if plan.settings.cfg_scale > 1.0 and model.config.class_dropout_prob <= 0 and not model.config.text_conditioned:
        raise TcgraphError(
            f"guidance {plan.settings.cfg_scale} needs the model's null class, but this model was built with "
            "class_dropout_prob=0 (no null class); use guidance 1 (--guidance 1)"
        )
    variants = []
    recipes = plan.variants()
    with progress.phase("rewrite", len(recipes)) as phase:
        for i, recipe in enumerate(recipes):
            vid = f"v{i}"
            if recipe.gate is not None:
                step, inputs, outputs = rewrite_gated(model, recipe)
                if (inputs, outputs) != plan.variant_io(recipe):
                    raise TcgraphError(f"gated variant {vid} has I/O {inputs}->{outputs}, the plan expects "
                                       f"{plan.variant_io(recipe)}")
                feeds = example_inputs(model, plan, inputs, seed=i, recipe=recipe)
                if check:
                    check_gated(model, step, recipe, (inputs, outputs), feeds)
                variants.append(VariantGraph(id=vid, gm=step, input_names=inputs, output_names=outputs,
                                             example_inputs=feeds))
                phase.tick(vid)
                continue
            gm = rewrite_variant(model, plan, recipe)
            inputs, outputs = io_names(gm)
            expected = plan.variant_io(recipe)
            if (inputs, outputs) != expected:
                raise TcgraphError(
                    f"variant {vid} has I/O {inputs}->{outputs}, the plan expects {expected[0]}->{expected[1]}")
            feeds = example_inputs(model, plan, inputs, seed=i, recipe=recipe)
            if check:
                check_variant(model, gm, recipe, feeds)
            variants.append(VariantGraph(id=vid, gm=gm, input_names=inputs, output_names=outputs,
                                         example_inputs=feeds))
            phase.tick(vid)
    return variants
