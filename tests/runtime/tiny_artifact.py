"""The tiny variants of tests/export/tiny_variants.py under plan ids, and a plan that runs them.

`write_artifact` takes a DiTConfig and a Plan whose schedule runs exactly the variants:
`v0` = full (x, t, y -> out), `v1` = fill (-> out, cache.0.attn), `v2` = reuse (reads and
rewrites cache.0.attn). The recipes only give the plan three distinct variants; the graphs
are the hand-made ones.
"""
from __future__ import annotations

import dataclasses

from tcgraph.plan.plan import COMPUTE, REUSE, Plan, Recipe
from tcgraph.sampling import SamplerSettings
from tcgraph.names import BRANCHES
from tests.export.tiny_variants import BATCH, DEPTH, dit_variants

IDS = {"full": "v0", "fill": "v1", "reuse": "v2"}
_FULL = Recipe.uniform(DEPTH, COMPUTE, BRANCHES)
_RECIPES = (_FULL, Recipe(((REUSE, COMPUTE),) + _FULL.actions[1:], BRANCHES), Recipe(((COMPUTE, REUSE),) + _FULL.actions[1:], BRANCHES))


def tiny_variants(model) -> dict:
    """v0 (full), v1 (fill), v2 (reuse), by id."""
    return {IDS[v.id]: dataclasses.replace(v, id=IDS[v.id]) for v in dit_variants(model)}


def tiny_plan(model, count: int = 3) -> Plan:
    """A plan whose schedule runs v0 … v<count-1>, one step each."""
    settings = SamplerSettings(num_steps=count, cfg_scale=1.0, batch=BATCH, resolution=model.config.input_size)
    return Plan(planner="test", settings=settings, recipes=_RECIPES[:count], num_tokens=model.config.num_tokens)


def tiny_artifact_args(model, count: int = 3) -> dict:
    """write_artifact's model_config and plan for the first `count` tiny variants."""
    return {"model_config": model.config, "plan": tiny_plan(model, count)}
