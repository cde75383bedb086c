"""TokenCache and its dynamic variant on models whose blocks differ and whose branches read several
streams: tiny random FLUX (double blocks: joint attn, mlp, mlp_text; single blocks: attn, mlp over
the text and image rows) and SD3.5 (attn, attn_image, mlp, mlp_text; the last block attn, mlp, its
attention reading the text for keys and values only), and the test-only two-stream toy
(tests/models/two_stream.py).

The rule (tcgraph.plan.learning.pruning), checked here on the recipes from the layout's streams: at
a cache step a block computes every branch, reuses every branch (kept at 0), or takes
`partial(kept)` on each branch that writes image rows, one set of image tokens for all of them,
while its branches of text rows only compute. The predicted speedup is the measured cost table's
(tcgraph.plan.costs) and meets the target; every variant equals the eager reference (1e-4).
`dynamic` puts dynamic(k) where tokencache put partial, but on SD3's last attention (keys and values
only), which stays partial. `tokencache+l2c` prunes the branches L2C computes by the same rule. The Cache Predictor's closed-form start scores the image rows of
image-writing branches only."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

pytest.importorskip("diffusers")

from tcgraph.calibrate import add_grams  # noqa: E402
from tcgraph.compile import build_variants, check_variant  # noqa: E402
from tcgraph.models.diffusers.sd3 import DiffusersSD3  # noqa: E402
from tcgraph.models.layout import Layout  # noqa: E402
from tcgraph.names import IMAGE, TEXT_STREAM  # noqa: E402
from tcgraph.plan import COMPUTE, REUSE, Plan, Recipe, make_plan  # noqa: E402
from tcgraph.plan.costs import plan_costs, predict_flops  # noqa: E402
from tcgraph.plan.flops import fixed_flops, plan_flops  # noqa: E402
from tcgraph.plan.learning.evaluate import speedup_of  # noqa: E402
from tcgraph.plan.learning.predictor import staleness_init  # noqa: E402
from tcgraph.plan.learning.tprr import layout_speedup, token_order, tprr_layout, tprr_recipes  # noqa: E402
from tcgraph.plan.planners.combined import prune_recipes  # noqa: E402
from tcgraph.plan.planners.tokencache import TokenCacheConfig, make_tokencache  # noqa: E402
from tests.models.flux_tiny import tiny_flux  # noqa: E402
from tests.models.test_diffusers_sd3 import SD35, tiny_sd3  # noqa: E402
from tests.plan.test_l2c_layouts import IMAGES, L, prompts, settings_of  # noqa: E402

TARGET = 1.3  # within reach of 4 steps at the default floor (a quarter of the image tokens kept)


def flux():
    return tiny_flux(guidance_embeds=True)


def sd35():
    return DiffusersSD3(tiny_sd3(**SD35))


def writes_image(layout: Layout, block: int, branch: str) -> bool:
    return IMAGE in layout.streams(block, branch)


def check_rule(plan: Plan, actions: tuple[str, ...] = ("partial",)) -> set[str]:
    """Assert the rule on every (step, block) of `plan`, token actions of the kinds `actions`; return
    what the blocks did ("compute", "reuse", "pruned")."""
    layout, n = plan.block_layout(), plan.num_tokens
    seen = set()
    for r in plan.recipes:
        for l, acts in enumerate(r.actions):
            names = r.block_branches(l)
            kinds = {a.kind for a in acts}
            if kinds in ({"compute"}, {"reuse"}):
                seen |= kinds
                continue
            seen.add("pruned")
            image = [a for br, a in zip(names, acts) if writes_image(layout, l, br)]
            text = [a for br, a in zip(names, acts) if not writes_image(layout, l, br)]
            assert {a.kind for a in image} <= set(actions) and all(a.kind == "compute" for a in text), (l, acts)
            assert len({a.k for a in image}) == 1, "one token count per pruned block"
            for a in image:
                if a.kind == "partial":
                    assert len(set(a.indices)) == len(a.indices) and set(a.indices) <= set(range(n))
            assert len({a.indices for a in image if a.kind == "partial"}) <= 1, "one token set per pruned block"
    return seen


def check_flops_and_variants(model, plan: Plan) -> float:
    """The formula's predicted speedup equals the measured table's; every variant equals the eager
    reference. Returns the predicted speedup."""
    formula, measured = plan_flops(model.config, plan), predict_flops(plan_costs(model, plan), plan)
    assert formula["predicted_speedup"] == pytest.approx(measured["predicted_speedup"], rel=1e-9)
    for v in build_variants(model, plan, check=False):
        recipe = plan.variants()[int(v.id[1:])]
        assert check_variant(model, v.gm, recipe, v.example_inputs) <= 1e-4
    return formula["predicted_speedup"]


@pytest.mark.parametrize("make", [flux, sd35])
def test_tprr_recipes_follow_the_layout(make):
    """Pure: keep counts 0 (reuse), N (compute) and in between; the kept tokens are the top-k of the
    mean scores of the steps sharing the recipe (max_stale 2, rounds of 3: no rotation); the
    layout-only speedup equals the recipes' FLOPs."""
    cfg = make().config
    layout, n, S = cfg.block_layout(), cfg.num_tokens, 7
    keep = ([0, 5, n, 3] + [4] * cfg.depth)[:cfg.depth]
    scores = torch.randn(S, cfg.depth, n, generator=torch.Generator().manual_seed(1))
    recipes = tprr_recipes(scores, keep, 0, 3, 3, max_stale=2, branches=layout)
    plan = Plan("t", replace(settings_of(cfg), num_steps=S), recipes, n, layout=layout)  # refuses text-row partials
    assert check_rule(plan) == {"compute", "reuse", "pruned"}
    for s, group in ((1, [1, 4]), (2, [2, 5]), (4, [1, 4]), (5, [2, 5])):  # cache steps of rounds 0, 3, 6
        for l, acts in enumerate(recipes[s].actions):
            names = recipes[s].block_branches(l)
            want = tuple(token_order(scores[group, l].mean(0))[:keep[l]])
            for br, a in zip(names, acts):
                expected = ("reuse" if keep[l] == 0 else "compute" if keep[l] == n or not writes_image(layout, l, br)
                            else "partial")
                assert a.kind == expected, (s, l, br)
                if a.kind == "partial":
                    assert a.indices == tuple(sorted(want))  # (an action keeps its tokens in order)
    slots = tprr_layout(S, 0, 3, 3, 2, None, cfg.branches)
    assert layout_speedup(cfg, S, slots, keep, L) == pytest.approx(speedup_of(cfg, recipes, L), rel=1e-12)


def test_staleness_init_scores_the_image_rows_of_image_writing_branches():
    """Per block, z-scored log Σ over the branches that write image rows of ||O_s,i − O_{s−1},i||² over
    image token i's row; text rows (joint branches' first L) and text-only branches count nothing."""
    S, depth, n, length, d, r = 5, 2, 6, 3, 4, 2
    layout = Layout(((("attn", (TEXT_STREAM, IMAGE)), ("mlp", (IMAGE,)), ("mlp_text", (TEXT_STREAM,))),
                     (("attn", (TEXT_STREAM, IMAGE)), ("mlp", (TEXT_STREAM, IMAGE)))))
    rows_of = {IMAGE: n, TEXT_STREAM: length}
    g = torch.Generator().manual_seed(0)
    outputs = {(l, br): 100 * torch.randn(S, r, layout.rows(l, br, rows_of), d, generator=g).cumsum(0)
               for l in range(depth) for br in layout.branches()[l]}
    for (l, br), o in outputs.items():  # image rows drift slowly, each token at its own speed
        image = layout.image_slice(l, br, rows_of)
        if image is not None:
            o[:, :, image] = torch.randn(S, r, n, d, generator=g).cumsum(0) * torch.rand(n, 1, generator=g)
    grams = add_grams({}, outputs)
    pruned = (("attn", "mlp"), ("attn", "mlp"))
    init = staleness_init(grams, S, depth, pruned, 0.25, image_rows=lambda key: layout.image_slice(*key, rows_of))
    logit = math.log(0.25 / 0.75)
    assert init.shape == (S, depth, n) and torch.allclose(init[0], torch.full((depth, n), logit))
    for s in range(1, S):
        for l in range(depth):
            change = 0
            for br in pruned[l]:
                o = outputs[(l, br)][:, :, layout.image_slice(l, br, rows_of)].double()
                change = change + ((o[s] - o[s - 1]) ** 2).sum(dim=(0, 2))
            z = torch.log(change)
            expected = (z - z.mean()) / (z.std() + 1e-6) + logit
            torch.testing.assert_close(init[s, l].double(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("make", [flux, pytest.param(sd35, marks=pytest.mark.slow)])  # ~10 s, as dynamic's
def test_tokencache_plans_by_layout(make):
    model = make()
    cfg = model.config
    plan = make_plan(f"tokencache:{TARGET}", cfg, settings_of(cfg), weights=model, calibration_text=prompts(cfg),
                     calib_images=IMAGES, epochs=1, compete=False, forecast=False)
    assert plan.block_layout() == cfg.block_layout() and plan.layout is not None
    assert plan.recipes[0].is_full and plan.params["selected"] == "learned"
    assert "pruned" in check_rule(plan)
    sp = check_flops_and_variants(model, plan)
    assert sp == pytest.approx(plan.params["predicted_speedup"], abs=1e-4) and sp >= TARGET - 1e-9


@pytest.mark.parametrize("make", [flux, sd35])
def test_dynamic_plans_by_layout(make):
    """`dynamic` is the TPRR plan with partial(kept) made dynamic(k) on the image-writing branches, but
    on a branch that reads a stream for keys and values only (SD3's last attention), which stays partial."""
    model = make()
    cfg = model.config
    settings = settings_of(cfg)
    plan = make_plan(f"dynamic:{TARGET}", cfg, settings, weights=model, calibration_text=prompts(cfg),
                     calib_images=IMAGES, epochs=1)
    tprr = make_tokencache(TokenCacheConfig(TARGET, calib_images=IMAGES, epochs=1), cfg, settings, weights=model,
                           finish=False, calibration_text=prompts(cfg))
    assert plan.block_layout() == cfg.block_layout() and "pruned" in check_rule(plan, ("partial", "dynamic"))
    last_attn = (cfg.depth - 1, "attn") if cfg.family.name == "sd3" else None  # SD3's last block, by design
    if last_attn is not None:
        assert any(a.kind == "partial" for r in tprr.recipes for l, br, a in r.items() if (l, br) == last_attn)
    for r, t in zip(plan.recipes, tprr.recipes):
        for (l, br, a), (_, _, b) in zip(r.items(), t.items()):
            if b.kind != "partial":
                assert a == b
            elif (l, br) == last_attn:
                assert a == b, "keys and values only: stays partial"
            else:
                assert (a.kind, a.k) == ("dynamic", b.k)
    assert any(a.kind == "dynamic" for r in plan.recipes for _, _, a in r.items())
    check_flops_and_variants(model, plan)


@pytest.mark.parametrize("spec", [f"tokencache:{TARGET}",
                                  pytest.param(f"dynamic:{TARGET}", marks=pytest.mark.slow)])  # dynamic: FLUX, SD3
def test_the_two_stream_toy_is_planned_by_the_same_rule(spec):
    """The test-only two-stream model (tests/models/two_stream.py: double blocks attn over both streams,
    mlp, mlp_text; parallel single blocks attn, mlp over both): the rule, the variants against the eager
    reference, and each variant's branch FLOPs equal to the measured table's. (Its fixed work, the
    toy's own embeddings, is not a family's formula in tcgraph.plan.flops: only branches compare.)"""
    from tcgraph.sampling import SamplerSettings
    from tcgraph.sampling.conditioning import Text
    from tests.models.two_stream import build, registered, toy_config

    with registered():
        model = build(toy_config(depth=4))
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():  # every gate and table away from zero
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        cfg = model.eval().config
        settings = SamplerSettings(num_steps=4, batch=1, cfg_scale=2.0, resolution=8, text_length=L)
        text = Text(torch.randn(IMAGES, L, cfg.caption_channels, generator=g), torch.ones(IMAGES, L),
                    torch.randn(1, L, cfg.caption_channels, generator=g).expand(IMAGES, -1, -1), torch.ones(IMAGES, L))
        options = dict(compete=False, forecast=False) if spec.startswith("tokencache") else {}
        plan = make_plan(spec, cfg, settings, weights=model, calibration_text=text, calib_images=IMAGES, epochs=1,
                         **options)
        assert plan.block_layout() == cfg.block_layout() and "pruned" in check_rule(plan, ("partial", "dynamic"))
        token_action = "partial" if spec.startswith("tokencache") else "dynamic"
        assert any(a.kind == token_action for r in plan.recipes for _, _, a in r.items())
        table = plan_costs(model, plan)
        fixed = (table.step + table.run_constants, fixed_flops(cfg, L) * settings.model_batch)
        formula, measured = plan_flops(cfg, plan), predict_flops(table, plan)
        for v, f in formula["per_variant"].items():
            assert f - fixed[1] == measured["per_variant"][v] - fixed[0]
        assert formula["predicted_speedup"] >= TARGET - 1e-9 or spec.startswith("dynamic")
        for v in build_variants(model, plan, check=False):
            recipe = plan.variants()[int(v.id[1:])]
            assert check_variant(model, v.gm, recipe, v.example_inputs) <= 1e-4


def test_prune_recipes_follows_the_layout():
    """tokencache+l2c's token pass on FLUX's layout: of the branches L2C computes at a cache step, the
    image-writing ones of a pruned block take partial(top k of the mean scores of the recipe's steps),
    the text-only ones keep computing; at k = 0 every computed branch is reused; L2C's reuse stays."""
    cfg = flux().config
    layout, n = cfg.block_layout(), cfg.num_tokens
    names = layout.branches()
    full = Recipe.uniform(cfg.depth, COMPUTE, names)
    a = Recipe(((REUSE, COMPUTE, COMPUTE), (COMPUTE, REUSE, COMPUTE), (COMPUTE, REUSE), (REUSE, COMPUTE)), names)
    scores = torch.randn(4, cfg.depth, n, generator=torch.Generator().manual_seed(2))
    keep = [n, 5, 0, 3]
    out = prune_recipes((full, a, a, full), scores, keep, layout=layout)
    assert out[0] == out[3] == full and out[1] == out[2]
    mean = scores[[1, 2]].mean(0)
    for l in range(cfg.depth):
        top = set(torch.argsort(mean[l], descending=True)[:keep[l]].tolist())
        for br, before, after in zip(names[l], a.actions[l], out[1].actions[l]):
            if before.kind != "compute" or keep[l] == n:
                assert after == before
            elif keep[l] == 0:
                assert after == REUSE
            elif writes_image(layout, l, br):
                assert after.kind == "partial" and set(after.indices) == top
            else:
                assert after == COMPUTE, (l, br)


def test_combined_plans_by_layout():
    model = flux()
    cfg = model.config
    target = 1.6
    plan = make_plan(f"tokencache+l2c:{target}", cfg, settings_of(cfg), weights=model, calibration_text=prompts(cfg),
                     calib_images=IMAGES, epochs=1, compete=False, forecast=False)
    layout = plan.block_layout()
    assert layout == cfg.block_layout() and plan.recipes[0].is_full
    for r in plan.recipes:
        for l, acts in enumerate(r.actions):
            token = [(br, a) for br, a in zip(r.block_branches(l), acts) if a.kind == "partial"]
            assert all(writes_image(layout, l, br) for br, _ in token) and len({a.indices for _, a in token}) <= 1
    kinds = {a.kind for r in plan.recipes for _, _, a in r.items()}
    assert {"partial", "reuse"} <= kinds, "branch reuse and token pruning"
    sp = check_flops_and_variants(model, plan)
    assert sp == pytest.approx(plan.params["predicted_speedup"], abs=1e-4) and sp >= target - 1e-9
