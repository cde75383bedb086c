"""Plans: actions per (step, block, branch), variants and schedule, FLOP accounting, planners."""
from tcgraph.plan.flops import branch_flops, plan_flops, recipe_flops
from tcgraph.plan.plan import COMPUTE, PLAN_SCHEMA_VERSION, REUSE, Action, Plan, Recipe, dynamic, forecast, partial
from tcgraph.plan.registry import (
    PLAN_HELP,
    PLAN_OPTIONS,
    PLANNERS,
    Planner,
    add_plan_arguments,
    make_plan,
    plan_options,
    register,
)

__all__ = [
    "COMPUTE", "PLAN_SCHEMA_VERSION", "REUSE", "Action", "Plan", "Recipe", "dynamic", "forecast", "partial", "branch_flops",
    "plan_flops", "recipe_flops", "PLAN_HELP", "PLAN_OPTIONS", "PLANNERS", "Planner", "add_plan_arguments",
    "make_plan", "plan_options", "register",
]
