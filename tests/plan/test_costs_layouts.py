"""The FLOP formulas (tcgraph.plan.flops) of models whose branches read several streams — FLUX
(double blocks: joint attn, mlp, mlp_text; single blocks: attn, mlp over L + N rows) and SD3 (joint
attn, attn_image, mlp, mlp_text; the last block's attn queries image rows, keys and values of L + N)
— against their measured cost tables (tcgraph.plan.costs), with ==: both count the same products.

The measured table is the oracle: per branch and action, the fixed work of a step, and whole plans
that act on some branches only (a recipe that reuses only `mlp_text`, or only the single blocks),
where a formula counting every branch as N image rows would be off."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from tcgraph.models.diffusers.sd3 import DiffusersSD3  # noqa: E402
from tcgraph.names import IMAGE  # noqa: E402
from tcgraph.plan import COMPUTE, REUSE, Plan, Recipe, dynamic, partial  # noqa: E402
from tcgraph.plan.costs import measure_costs, predict_flops  # noqa: E402
from tcgraph.plan.flops import branch_flops, branch_rows, fixed_flops, plan_flops  # noqa: E402
from tcgraph.sampling import SamplerSettings  # noqa: E402
from tests.models.flux_tiny import tiny_flux  # noqa: E402
from tests.models.test_diffusers_sd3 import PLAIN, SD35, tiny_sd3  # noqa: E402

L = 5  # text tokens
BATCH = 2  # model batch: FLUX's guidance is an input (no doubling); SD3 doubles one image


def models():
    yield "flux-dev", tiny_flux(guidance_embeds=True)
    yield "flux-schnell", tiny_flux(guidance_embeds=False)
    yield "sd3", DiffusersSD3(tiny_sd3(**PLAIN))
    yield "sd3.5", DiffusersSD3(tiny_sd3(**SD35))


@pytest.fixture(scope="module")
def tables():
    return {name: (model, measure_costs(model, BATCH, L)) for name, model in models()}


def settings_of(cfg, steps: int) -> SamplerSettings:
    if cfg.family.name == "flux":
        return SamplerSettings(num_steps=steps, batch=BATCH, cfg_scale=3.5 if cfg.guidance_embeds else 1.0,
                               resolution=cfg.input_size, text_length=L, pooled=True, guidance=cfg.guidance)
    return SamplerSettings(num_steps=steps, batch=1, cfg_scale=2.0, resolution=cfg.input_size, text_length=L,
                           pooled=True)


@pytest.mark.parametrize("name", ["flux-dev", "flux-schnell", "sd3", "sd3.5"])
def test_branches_and_fixed_work_equal_the_table(tables, name):
    model, table = tables[name]
    cfg, layout = model.config, model.config.block_layout()
    n, d, m = cfg.num_tokens, cfg.hidden_size, cfg.mlp_hidden
    assert table.step + table.run_constants == fixed_flops(cfg, L) * BATCH
    for block in range(cfg.depth):
        for br in layout.branches()[block]:
            tokens = IMAGE in layout.streams(block, br)
            for action in (COMPUTE, REUSE) + ((partial(range(1)), partial(range(3, n, 2)), dynamic(n // 3),
                                               dynamic(n)) if tokens else ()):
                want = branch_flops(cfg, br, action, L, **branch_rows(cfg, block, br)) * BATCH
                assert table.cost(block, br).flops(action) == want, (block, br, action.short())
    # by hand: a joint attention over S = L + N rows, a text MLP over L rows
    s = L + n
    assert table.cost(0, "attn").full == BATCH * (8 * s * d * d + 4 * s * s * d)
    assert table.cost(0, "mlp_text").full == BATCH * 4 * L * d * m
    if name.startswith("flux"):  # a single block's MLP over every row
        assert table.cost(cfg.depth - 1, "mlp").full == BATCH * 4 * s * d * m
    else:  # the last attention: queries and output of the N image rows, keys and values of all S rows
        assert table.cost(cfg.depth - 1, "attn").full == BATCH * (4 * n * d * d + 4 * s * d * d + 4 * n * s * d)


def partial_plans(cfg, steps: int = 4) -> list[Plan]:
    """Plans that act on some branches only: reuse only mlp_text; reuse only the last blocks (FLUX's
    single blocks); partial image rows of the joint attentions."""
    layout = cfg.block_layout()
    names, depth, n = layout.branches(), layout.depth, cfg.num_tokens
    full = Recipe.uniform(depth, COMPUTE, names)
    last = cfg.single_depth if cfg.family.name == "flux" else 1

    def recipe(act):
        return Recipe(tuple(tuple(act(l, br) for br in names[l]) for l in range(depth)), names)

    text = recipe(lambda l, br: REUSE if br == "mlp_text" else COMPUTE)
    tail = recipe(lambda l, br: REUSE if l >= depth - last else COMPUTE)
    rows = recipe(lambda l, br: partial(range(0, n, 3)) if br == "attn" else COMPUTE)
    s = settings_of(cfg, steps)
    return [Plan(p, s, (full,) + (r,) * (steps - 1), n, layout=layout)
            for p, r in (("text", text), ("tail", tail), ("rows", rows))]


@pytest.mark.parametrize("name", ["flux-dev", "sd3.5"])
def test_plans_acting_on_some_branches_predict_as_the_table(tables, name):
    model, table = tables[name]
    for plan in partial_plans(model.config):
        got, want = predict_flops(table, plan), plan_flops(model.config, plan)
        assert got == want, plan.planner
        assert 1.0 < want["predicted_speedup"] < 2.0
