"""Measured cost tables (tcgraph.plan.costs) against the FLOP formulas of tcgraph.plan.flops.

The formulas are the oracles. Tolerance: none. Both count 2 FLOPs per multiply-add of the same
matrix products, convolutions and attention scores/mix, and leave element-wise work out (the
dynamic score, 2·N·D, is counted alike), so every number is compared with ==. Where the model
runs products the formula does not name (diffusers' DiT embeds the timestep in every block and
for its final layer; the formula embeds it once), the difference is asserted to be exactly those
products.
"""
from __future__ import annotations

import json

import pytest
import torch

from tcgraph.errors import TcgraphError
from tcgraph.models.official.dit import DiT, build_model, make_config
from tcgraph.plan import COMPUTE, REUSE, Plan, Recipe, dynamic, make_plan, partial
from tcgraph.plan.costs import BranchCost, CostTable, measure_costs, plan_costs, predict_flops
from tcgraph.plan.flops import branch_flops, fixed_flops, plan_flops
from tcgraph.sampling import SamplerSettings
from tcgraph.names import BRANCHES

BATCH = 4  # model batch: 2 images, guidance doubles them
TEXT = 7  # text tokens of the PixArt cases


def t_mlp(d: int) -> int:
    """FLOPs of one timestep embedding MLP (256 features -> D -> D) for one sample."""
    return 2 * 256 * d + 2 * d * d


def check_branches(table: CostTable, cfg, text_length: int = 0) -> None:
    """Every branch, every action kind, at several kept-row counts, equals the formula × batch."""
    n, b = cfg.num_tokens, table.batch
    for block in range(cfg.depth):
        for br in cfg.branches:
            c = table.cost(block, br)
            assert c.fixed + c.per_row * n == c.full  # the partial line meets the module's own forward at N
            for read in (False, True):
                for action in (COMPUTE, REUSE, partial(range(1)), partial(range(3, n, 2)), partial(range(n)),
                               dynamic(1), dynamic(n // 3), dynamic(n)):
                    want = branch_flops(cfg, br, action, text_length, read) * b
                    assert c.flops(action, read) == want, (block, br, action.short(), read)


def dit_cases():
    yield "digits", build_model("digits")  # real CPU weights, counted on FakeTensors
    with torch.device("meta"):  # DiT-XL/2 (256x256, 256 tokens) without its memory
        yield "DiT-XL/2", DiT(make_config("DiT-XL/2")).eval()


@pytest.fixture(scope="module")
def dits():
    return {name: (model, measure_costs(model, BATCH)) for name, model in dit_cases()}


@pytest.mark.parametrize("name", ["digits", "DiT-XL/2"])
def test_dit_table_equals_formula(dits, name):
    model, table = dits[name]
    cfg = model.config
    assert (table.model, table.batch, table.tokens, table.branches) == ("DiT", BATCH, cfg.num_tokens, ("attn", "mlp"))
    assert table.blocks == (0,) * cfg.depth and len(table.kinds) == 1
    check_branches(table, cfg)
    n, d, m = cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden
    attn, mlp = table.cost(0, "attn"), table.cost(0, "mlp")
    # by hand: keys/values of all N rows are the attention's fixed part; q, scores, mix, proj per kept row
    assert (attn.fixed, attn.per_row) == (BATCH * 4 * n * d * d, BATCH * (4 * d * d + 4 * n * d))
    assert (mlp.fixed, mlp.per_row, mlp.score) == (0, BATCH * 4 * d * m, BATCH * 2 * n * d)
    assert table.step == fixed_flops(cfg) * BATCH and table.run_constants == 0
    if name == "DiT-XL/2":
        assert attn.full == 12_079_595_520 and mlp.full == 21_743_271_936  # 3.02 and 5.44 GFLOPs a sample


def test_dit_plans_equal_plan_flops(dits):
    model, table = dits["digits"]
    cfg = model.config
    settings = SamplerSettings(num_steps=10, batch=2, cfg_scale=2.0, resolution=cfg.input_size)
    n, depth = cfg.num_tokens, cfg.depth
    hand = [Recipe.uniform(depth, COMPUTE, BRANCHES)]
    for s in range(1, 10):  # partial attention, dynamic MLP, reuse in between
        acts = [(partial(range(0, n, 1 + (s + l) % 4)), dynamic(5 + s)) if (s + l) % 3 else (REUSE, REUSE)
                for l in range(depth)]
        hand.append(Recipe(tuple(acts), BRANCHES))
    plans = [make_plan("fora:3", cfg, settings), make_plan("full", cfg, settings),
             Plan("hand", settings, tuple(hand), n)]
    for plan in plans:
        got, want = predict_flops(table, plan), plan_flops(cfg, plan)
        assert got == want, plan.planner
    fora = predict_flops(table, plans[0])
    assert fora["total"] == 4 * fora["full_step"] + 6 * table.step  # compute at steps 0, 3, 6, 9
    assert plan_costs(model, plans[0]) == table


@pytest.fixture(scope="module")
def diffusers_dit():
    pytest.importorskip("diffusers")
    from diffusers import DiTTransformer2DModel

    from tcgraph.models.diffusers.dit import DiffusersDiT

    model = DiffusersDiT(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=2,
                                               out_channels=4, num_layers=3, sample_size=8, patch_size=2,
                                               num_embeds_ada_norm=5).eval())
    return model, measure_costs(model, BATCH)


def test_diffusers_dit_table_equals_formula_but_its_timestep_mlps(diffusers_dit):
    model, table = diffusers_dit
    cfg = model.config
    check_branches(table, cfg)
    # each block embeds the timestep for its modulation, and block 0's again for the final layer:
    # depth + 1 timestep MLPs; the formula counts one
    assert table.step - fixed_flops(cfg) * BATCH == cfg.depth * t_mlp(cfg.hidden_size) * BATCH > 0
    assert table.run_constants == 0
    plan = make_plan("fora:2", cfg, SamplerSettings(num_steps=6, batch=2, resolution=cfg.input_size))
    got, want = predict_flops(table, plan), plan_flops(cfg, plan)
    assert got["total"] - want["total"] == 6 * cfg.depth * t_mlp(cfg.hidden_size) * BATCH
    assert got["per_variant"]["v1"] == table.step


@pytest.fixture(scope="module")
def pixart():
    pytest.importorskip("diffusers")
    from diffusers import PixArtTransformer2DModel

    from tcgraph.models.diffusers.pixart import DiffusersPixArt

    model = DiffusersPixArt(PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=2, out_channels=4, num_layers=2, sample_size=8,
        patch_size=2, caption_channels=24, cross_attention_dim=32, use_additional_conditions=False).eval())
    return model, measure_costs(model, BATCH, TEXT)


def test_pixart_table_equals_formula(pixart):
    model, table = pixart
    cfg = model.config
    d = cfg.hidden_size
    assert table.branches == ("attn", "cross", "mlp") and table.text_length == TEXT
    check_branches(table, cfg, TEXT)
    cross = table.cost(1, "cross")
    # the text's keys and values are the cross branch's run constants: 2 projections of L rows
    assert cross.constants == BATCH * 2 * 2 * TEXT * d * d
    assert (cross.fixed, cross.per_row) == (0, BATCH * (4 * d * d + 4 * TEXT * d))
    assert table.cost(0, "attn").constants == table.cost(0, "mlp").constants == 0
    # the caption projection (caption_channels -> D -> D over L tokens) depends on the text alone
    caption = BATCH * 2 * TEXT * (cfg.caption_channels * d + d * d)
    assert table.run_constants == caption
    assert table.step == fixed_flops(cfg, TEXT, constants_read=True) * BATCH
    assert table.step + table.run_constants == fixed_flops(cfg, TEXT) * BATCH
    assert table.run_constant_total() == caption + cfg.depth * cross.constants


@pytest.mark.parametrize("spec,carry", [("fora:2", True), ("fora:2", False), ("full", True), ("hand", True)])
def test_pixart_plans_equal_plan_flops(pixart, spec, carry):
    model, table = pixart
    cfg = model.config
    settings = SamplerSettings(num_steps=6, batch=2, cfg_scale=2.0, resolution=cfg.input_size, text_length=TEXT)
    if spec == "hand":
        n = cfg.num_tokens
        first = Recipe.uniform(cfg.depth, COMPUTE, cfg.branches)
        later = Recipe(((partial(range(5)), COMPUTE, dynamic(3)), (REUSE, partial(range(0, n, 2)), COMPUTE)),
                       cfg.branches)
        plan = Plan("hand", settings, (first,) + (later, first) * 2 + (later,), n)
    else:
        plan = make_plan(spec, cfg, settings)
    plan = plan if carry else Plan(plan.planner, settings, plan.recipes, plan.num_tokens, carry_constants=False)
    got, want = predict_flops(table, plan), plan_flops(cfg, plan)
    assert got == want
    if spec == "full" and carry:  # carrying saves the caption and K/V projections of 5 of 6 steps
        assert got["recomputed_total"] - got["full_total"] == 5 * table.run_constant_total()


def test_table_round_trips_through_json(pixart, dits):
    for table in (pixart[1], dits["DiT-XL/2"][1]):
        text = json.dumps(table.to_dict(), allow_nan=False)
        assert CostTable.from_dict(json.loads(text)) == table
    d = pixart[1].to_dict()
    for broken in ({**d, "schema": 2}, {k: v for k, v in d.items() if k != "step"}, {**d, "batch": -1},
                   {**d, "blocks": [0, 5]}, {**d, "kinds": [{"attn": {}}]}, [1, 2]):
        with pytest.raises(TcgraphError, match="cost table"):
            CostTable.from_dict(broken)


def test_refusals(pixart, dits):
    model, table = dits["digits"]
    with pytest.raises(TcgraphError, match="text_length must be 0"):
        measure_costs(model, 2, text_length=5)
    with pytest.raises(TcgraphError, match="give its text_length"):
        measure_costs(pixart[0], 2)
    with pytest.raises(TcgraphError, match="kept-row counts"):
        measure_costs(model, 2, rows=(8, 8))
    with pytest.raises(TcgraphError, match="batch must be"):
        measure_costs(model, 0)
    other = make_plan("fora:2", model.config, SamplerSettings(num_steps=4, batch=3, resolution=16))
    with pytest.raises(TcgraphError, match="model batch 4 .table. vs 6 .plan."):
        predict_flops(table, other)
    with pytest.raises(TcgraphError, match="asked for block 6"):
        table.cost(6, "attn")
    assert BranchCost(1, 2, 3, 4).flops(dynamic(5)) == 1 + 2 * 5 + 4
