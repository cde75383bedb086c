"""Plans: actions per (step, block, branch), variants and schedule, FLOP accounting, planners."""
from tcgraph.plan.flops import branch_flops, plan_flops, recipe_flops
from tcgraph.plan.plan import COMPUTE, PLAN_SCHEMA_VERSION, REUSE, Action, Plan, Recipe, dynamic, partial
from tcgraph.plan.planners import PLAN_HELP, PLANNERS, make_plan

__all__ = [
    "COMPUTE", "PLAN_SCHEMA_VERSION", "REUSE", "Action", "Plan", "Recipe", "dynamic", "partial", "branch_flops",
    "plan_flops", "recipe_flops", "PLAN_HELP", "PLANNERS", "make_plan",
]
