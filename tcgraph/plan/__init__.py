"""Plans: actions per (step, block, branch), variants and schedule, FLOP accounting, planners.

Plans and their FLOP accounting import no torch; the planners (`tcgraph.plan.registry`) are
imported on first use (PEP 562), so reading an artifact's plan needs no torch.
"""
from __future__ import annotations

from tcgraph.plan.flops import branch_flops, plan_flops, recipe_flops
from tcgraph.plan.plan import COMPUTE, PLAN_SCHEMA_VERSION, REUSE, Action, Plan, Recipe, dynamic, forecast, partial
from tcgraph.lazy import lazy_names

# name -> the module that defines it, imported when the name is first asked for
_LAZY = dict.fromkeys(("PLAN_HELP", "PLAN_OPTIONS", "PLANNERS", "Planner", "add_plan_arguments", "make_plan",
                       "plan_options", "register"), "tcgraph.plan.registry")


__getattr__ = lazy_names('tcgraph.plan', _LAZY, globals())


__all__ = [
    "COMPUTE", "PLAN_SCHEMA_VERSION", "REUSE", "Action", "Plan", "Recipe", "dynamic", "forecast", "partial", "branch_flops",
    "plan_flops", "recipe_flops", *_LAZY,
]
