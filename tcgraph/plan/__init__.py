from tcgraph.plan.flops import branch_flops, plan_flops, recipe_flops
from tcgraph.plan.plan import (
    BRANCHES,
    COMPUTE,
    PLAN_SCHEMA_VERSION,
    REUSE,
    Action,
    Plan,
    Recipe,
    SamplerSettings,
    cache_name,
    dynamic,
    input_cache_name,
    partial,
)
from tcgraph.plan.planners import PLAN_HELP, PLANNERS, make_plan

__all__ = [
    "BRANCHES", "COMPUTE", "PLAN_SCHEMA_VERSION", "REUSE", "Action", "Plan", "Recipe",
    "SamplerSettings", "cache_name", "dynamic", "input_cache_name", "partial", "branch_flops", "plan_flops", "recipe_flops",
    "PLAN_HELP", "PLANNERS", "make_plan",
]
