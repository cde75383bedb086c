"""Every planner, and the plan pictures, follow the model's branches and its text length: a tiny
random PixArt (blocks of attn, cross, mlp; 7 text tokens) gets valid 3-branch plans from each
registered planner, fora's predicted speedup counts the cross-attention's FLOPs, the learned
planners calibrate on the given prompts and refuse without them, and the pictures draw three
columns per block."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from tcgraph.errors import TcgraphError
from tcgraph.inspection import action_color, heatmap_layout, mask_layout, variant_dot, write_plan_pictures
from tcgraph.inspection.pictures import KEPT_RGB, REUSED_RGB
from tcgraph.models import build_model
from tcgraph.models.official.dit import DiTConfig
from tcgraph.plan.flops import plan_flops
from tcgraph.plan.plan import COMPUTE, REUSE, Plan, Recipe, partial
from tcgraph.plan.registry import PLANNERS, make_plan
from tcgraph.sampling import SamplerSettings
from tcgraph.sampling.conditioning import Text

PIXART = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, mlp_ratio=4.0,
                   class_dropout_prob=0.0, num_classes=0, learn_sigma=False, layout="pixart", norm_eps=1e-6,
                   caption_channels=24)
BRANCHES3 = ("attn", "cross", "mlp")
L = 7  # text tokens
SETTINGS = SamplerSettings(num_steps=8, cfg_scale=2.0, batch=2, resolution=8, text_length=L)
TINY = dict(calib_images=4, epochs=1)  # the learned planners' smallest options
# spec -> plan options: one run of every registered planner (and l2c's λ mode)
FIXED = {"full": {}, "fora:2": {}, "taylor:2:1": {}}
LEARNED = {"l2c:1.5": TINY, "l2c": dict(lam=0.0, threshold=0.5, interval=3, **TINY), "tokencache:1.5": TINY,
           "dynamic:1.5": dict(tprr="2,2,3", **TINY), "tokencache+l2c:1.8": TINY,
           "adaptive:0.9": dict(first=1, max_skips=2, warmup=2, final=1, calib_images=2)}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model's ops take microseconds: a second intra-op thread only adds synchronisation,
    which made this module 5-10x slower on the busy 2-core machine. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pixart():
    torch.manual_seed(0)
    model = build_model(PIXART)
    with torch.no_grad():  # diffusers zero-inits some layers: make every branch matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def text():
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(3, L)
    mask[1, 4:] = 0.0  # one padded prompt
    return Text(torch.randn(3, L, 24, generator=g), mask, torch.randn(3, L, 24, generator=g), torch.ones(3, L))


@pytest.fixture(scope="module")
def learned_plans(pixart, text):
    return {spec: make_plan(spec, PIXART, SETTINGS, weights=pixart, calibration_text=text, **opts)
            for spec, opts in LEARNED.items()}


def test_every_registered_planner_is_covered():
    assert {spec.split(":")[0] for spec in (*FIXED, *LEARNED)} == set(PLANNERS)
    assert {spec.split(":")[0] for spec in LEARNED} == {name for name, p in PLANNERS.items() if p.learned}


def _check_three_branch_plan(plan: Plan) -> None:
    assert plan.branches == BRANCHES3 and plan.depth == PIXART.depth and len(plan.recipes) == SETTINGS.num_steps
    assert all(len(acts) == 3 for r in plan.recipes for acts in r.actions)
    assert plan.recipes[0].is_full
    plan.validate()
    d = plan.to_dict()
    assert d["branches"] == list(BRANCHES3) and d["settings"]["text_length"] == L
    back = Plan.from_json(plan.to_json())
    assert back == plan and back.branches == BRANCHES3 and back.to_dict() == d


@pytest.mark.parametrize("spec", FIXED)
def test_fixed_planners_make_three_branch_plans_and_ignore_calibration_text(spec, text):
    plan = make_plan(spec, PIXART, SETTINGS)
    _check_three_branch_plan(plan)
    assert make_plan(spec, PIXART, SETTINGS, calibration_text=text) == plan


def test_fora_speedup_counts_the_cross_attention_by_hand():
    n, d, m, p, c, t = 16, 32, 128, 2, 4, L
    attn = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d  # qkv, scores and mix, output projection
    cross = 2 * n * d * d * 2 + 2 * t * d * 2 * d + 2 * 2 * n * t * d  # q and proj of N rows, k/v of the text, scores
    mlp = 2 * 2 * n * d * m
    fixed = (2 * n * p * p * c * d  # patch embedding
             + 2 * 256 * d + 2 * d * d  # timestep embedding
             + 2 * d * 6 * d  # PixArt's one adaLN-single linear
             + 2 * t * (24 * d + d * d)  # caption projection of the text tokens
             + 2 * n * d * p * p * c)  # final layer
    full = fixed + 3 * (attn + cross + mlp)
    recomputed = 8 * full / (4 * full + 4 * fixed)  # fora:2 over 8 steps: 4 full steps, 4 that reuse every branch
    plan = make_plan("fora:2", PIXART, SETTINGS)
    flops = plan_flops(PIXART, dataclasses.replace(plan, carry_constants=False))
    assert flops["full_step"] == full * SETTINGS.model_batch
    assert flops["predicted_speedup"] == pytest.approx(recomputed, rel=1e-12)
    without_cross = fixed + 3 * (attn + mlp)
    assert abs(recomputed - 8 * without_cross / (4 * without_cross + 4 * fixed)) > 0.01  # the cross FLOPs matter
    # carried (the default): only step 0 projects the text (caption, keys and values); `full` likewise
    saved = 2 * t * (24 * d + d * d) + 3 * 2 * t * d * 2 * d
    carried = (full + 7 * (full - saved)) / (full + 3 * (full - saved) + 4 * (fixed - saved + 3 * 2 * t * d * 2 * d))
    assert plan_flops(PIXART, plan)["predicted_speedup"] == pytest.approx(carried, rel=1e-12)


@pytest.mark.parametrize("spec", LEARNED)
def test_learned_planners_make_three_branch_plans(spec, learned_plans):
    plan = learned_plans[spec]
    if spec.startswith("adaptive"):  # every step gated, calibrated on the prompts to a measured fraction
        least, most = plan.params["fraction_range"]
        assert plan.gate is not None and least <= plan.params["calibrated_fraction"] <= most
        assert plan.branches == BRANCHES3 and not plan.carry_constants and Plan.from_json(plan.to_json()) == plan
        return
    _check_three_branch_plan(plan)
    predicted = plan_flops(PIXART, plan)["predicted_speedup"]
    assert predicted > 1.0
    if spec.startswith("dynamic"):  # tokencache's own plan, per-sample tokens: every branch of a block alike
        assert all(len(set(acts)) == 1 for r in plan.recipes for acts in r.actions)
        assert any(a.kind == "dynamic" for r in plan.recipes for _, br, a in r.items() if br == "cross")
        assert plan.params["predictor"]["shared_by"] == "all 3 branches of a block (attn, cross, mlp)"
    else:  # the params' speedup is the plan's own, cross FLOPs at the plan's text length included
        assert plan.params["predicted_speedup"] == pytest.approx(predicted, abs=1e-4)
        target = float(spec.split(":")[1]) if ":" in spec else None
        if target is not None:
            assert predicted >= target * (1 - 1e-9)
    if "tokencache" in spec:
        assert any(a.kind == "partial" for r in plan.recipes for _, br, a in r.items() if br == "cross") or \
            plan.params["selected"] not in ("learned", "learned+forecast")


@pytest.mark.parametrize("spec", LEARNED)
def test_learned_planners_refuse_a_text_model_without_calibration_text(spec, pixart):
    with pytest.raises(TcgraphError, match=r"calibration prompts: pass calibration_text="):
        make_plan(spec, PIXART, SETTINGS, weights=pixart, **LEARNED[spec])


def test_learned_planners_refuse_calibration_text_for_a_class_model(tiny_model, text):
    s = SamplerSettings(num_steps=6, cfg_scale=2.0, batch=1, resolution=tiny_model.config.input_size)
    with pytest.raises(TcgraphError, match="class ids.*drop calibration_text"):
        make_plan("l2c:1.5", tiny_model.config, s, weights=tiny_model, calibration_text=text, **TINY)


def test_published_routers_are_refused_for_other_branches(tmp_path):
    path = tmp_path / "router.pt"
    torch.save({"routers": {f"{i}.prob": torch.zeros(2 * PIXART.depth) for i in range(8)}}, path)
    with pytest.raises(TcgraphError, match="attn, cross, mlp.*learn a router"):
        make_plan("l2c", PIXART, SETTINGS, router=str(path))


#################################################################################
#                          Pictures of a 3-branch plan                          #
#################################################################################


def _hand_plan() -> Plan:
    full = Recipe.uniform(PIXART.depth, COMPUTE, BRANCHES3)
    cached = Recipe(((REUSE, partial([0, 5]), COMPUTE), (partial(range(4)), COMPUTE, REUSE),
                     (REUSE, REUSE, partial([15]))), BRANCHES3)
    return Plan("hand-3", SamplerSettings(num_steps=4, cfg_scale=2.0, batch=1, resolution=8, text_length=L),
                (full, cached, full, cached), PIXART.num_tokens)


def test_heatmap_has_three_columns_per_block(tmp_path):
    plan = _hand_plan()
    files = write_plan_pictures(plan, tmp_path)
    img = Image.open(files[0]).convert("RGB")
    lay = heatmap_layout(plan)
    assert lay.branches == BRANCHES3
    assert lay.grid_width == lay.left + 3 * 3 * lay.cell_w + 2 * lay.block_gap  # 3 blocks x 3 branches
    assert img.width == lay.grid_width + 12 + 190
    xs = [lay.cell_box(0, b, br)[0] for b in range(3) for br in BRANCHES3]
    assert xs == sorted(xs) and len(set(xs)) == 9  # nine distinct columns, in (block, branch) order
    for step, recipe in enumerate(plan.recipes):
        for block, branch, action in recipe.items():
            assert img.getpixel(lay.cell_center(step, block, branch)) == action_color(action, plan.num_tokens)


def test_token_masks_have_three_columns_per_block(tmp_path):
    plan = _hand_plan()
    files = write_plan_pictures(plan, tmp_path)
    img = Image.open(next(p for p in files if p.name == "token_masks.png")).convert("RGB")
    lay = mask_layout(plan)
    assert lay.branches == BRANCHES3 and lay.steps == (1, 3)
    assert lay.width == lay.left + 3 * 3 * (lay.cell + lay.gap) + 3 * lay.gap
    checked = 0
    for step in lay.steps:
        for block, branch, action in plan.recipes[step].items():
            for token in range(plan.num_tokens):
                if action.kind == "partial":
                    want = KEPT_RGB if token in action.indices else REUSED_RGB
                else:
                    want = KEPT_RGB if action.kind == "compute" else REUSED_RGB
                assert img.getpixel(lay.token_center(step, block, branch, token)) == want
                checked += 1
    assert checked == 2 * 3 * 3 * plan.num_tokens


def test_variant_dot_chains_the_three_branches():
    plan = _hand_plan()
    dot = variant_dot(plan, plan.variants()[1], "v1")
    for block in range(3):
        assert f"b{block}_attn -> b{block}_cross;" in dot and f"b{block}_cross -> b{block}_mlp;" in dot
    assert "embed -> b0_attn;" in dot and "b0_mlp -> b1_attn;" in dot and "b2_mlp -> final;" in dot
    assert "b0_attn -> b0_mlp" not in dot
    assert 'label="x, t, encoder_hidden_states, encoder_attention_mask"' in dot
    assert '"in:cache.0.cross" -> b0_cross' in dot  # the partial cross branch reads its cache
