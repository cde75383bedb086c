"""`adaptive` over a base plan (docs/plans.md, "Adaptive steps"; docs/design.md, "Gated steps"): the
computing path of each gated step is the base plan's recipe at that step, the gate's first blocks forced
to compute; and the work a run does, per step, whichever way the gate decides.

- `base_plan` makes the base: a plan spec of the planner registry (`l2c:2`, `fora:3`, ...) made for the
  same model, sampler settings, weights and calibration prompts, or a plan JSON file (`….json`) made
  for them. A base with token actions (`partial`, `dynamic`) or gated steps of its own is refused.
- `computing_paths` turns the base's recipes into gated recipes. A later branch the base computes
  computes (and shifts its output and the step into its own history and times row); one it reuses takes
  its newest history entry (its value at the last step that computed it); one it forecasts from r points
  is extrapolated in the graph, with Lagrange weights in the step index over its own times row, from its
  newest min(r, gate points, steps always computing it before this one) entries (the base's own weights
  assume which steps computed, which the gated run decides on the device); from 1 entry that is reuse.
  A branch it reuses or forecasts keeps its history as it was.
- `base_warmup` lengthens the warm-up until every later branch has computed the gate's points on it.
- `step_work` is the share of block work each step does when it computes (its path's branches) and when
  it skips (its first blocks): FLOPs of the branches (`tcgraph.plan.flops.branch_flops`, each branch's
  rows from the model's layout) over the FLOPs of every branch of every block. For a model whose blocks
  all cost the same and no base, these are 1 and F / L.
- the least and the most a run's fraction may be: `tcgraph.plan.gate.work_range` of those shares.
"""
from __future__ import annotations

from pathlib import Path

from tcgraph.errors import TcgraphError
from tcgraph.models.families import ModelConfig
from tcgraph.plan.flops import branch_flops, branch_rows
from tcgraph.plan.gate import Gate, forced_counts, warmup_for
from tcgraph.plan.plan import COMPUTE, REUSE, Plan, Recipe, forecast
from tcgraph.sampling import SamplerSettings

TOKEN_ACTIONS = ("partial", "dynamic")


def base_plan(spec: str, model_config: ModelConfig, settings: SamplerSettings, *, weights=None, progress=None,
              calibration_text=None, make_plan=None) -> Plan:
    """The base plan of `spec`: a registry spec made for this model and these settings by `make_plan` (the
    registry's, which it hands to the planner), or a plan JSON file."""
    if not isinstance(spec, str) or not spec:
        raise TcgraphError(f"adaptive base must be a plan spec (l2c:2) or a plan JSON file, got {spec!r}")
    if spec.endswith(".json"):
        path = Path(spec)
        if not path.is_file():
            raise TcgraphError(f"adaptive base {spec}: no such plan file")
        base = Plan.from_json(path.read_text())
    else:
        if make_plan is None:
            raise TcgraphError(f"adaptive base {spec}: a plan spec is made through tcgraph.plan.make_plan; "
                               "give a plan JSON file here")
        if spec.split(":")[0] == "adaptive":
            raise TcgraphError("adaptive base must be a plan without gated steps, not another adaptive plan")
        extra = {} if progress is None else {"progress": progress}
        base = make_plan(spec, model_config, settings, weights=weights, calibration_text=calibration_text, **extra)
    check_base(base, spec, model_config, settings)
    return base


def check_base(base: Plan, spec: str, model_config: ModelConfig, settings: SamplerSettings) -> None:
    """The base is for this model and this step count, with compute, reuse and forecast actions only."""
    if base.gate is not None:
        raise TcgraphError(f"adaptive base {spec} ({base.planner}) has gated steps of its own; give a static plan")
    have = (base.settings.num_steps, base.depth, base.num_tokens, base.block_layout())
    want = (settings.num_steps, model_config.depth, model_config.num_tokens, model_config.block_layout())
    if have != want:
        raise TcgraphError(f"adaptive base {spec} ({base.planner}) is for {have[0]} steps of {have[1]} blocks x "
                           f"{have[2]} tokens (branches {[list(b) for b in have[3].branches()]}); this plan is for "
                           f"{want[0]} steps of {want[1]} blocks x {want[2]} tokens (branches "
                           f"{[list(b) for b in want[3].branches()]}): make the base for the same model and steps")
    tokens = sorted({(s, b, br, a.kind) for s, r in enumerate(base.recipes) for b, br, a in r.items()
                     if a.kind in TOKEN_ACTIONS})
    if tokens:
        s, b, br, kind = tokens[0]
        raise TcgraphError(f"adaptive base {spec} ({base.planner}) has token actions ({kind} at step {s}, block {b} "
                           f"{br}, and {len(tokens) - 1} more); a gated step's computing path takes compute, reuse "
                           "and forecast actions: use a branch-level base (l2c, fora, taylor, full)")


def computing_paths(base: Plan | None, gate: Gate, thresholds, model_config: ModelConfig) -> list[Recipe]:
    """The gated recipe of every step: the base's recipe (every branch computing without a base), its
    first blocks computing, each later branch's forecast from the points its own history is sure to hold
    (the steps before it that always compute and compute that branch)."""
    full = Recipe.uniform(model_config.depth, COMPUTE, model_config.branches)
    recipes = [full if base is None else base.recipes[s] for s in range(len(thresholds))]
    paths = []
    for recipe, have in zip(recipes, forced_counts(gate, recipes, thresholds)):
        acts = []
        for l, row in enumerate(recipe.actions):
            if l < gate.first:
                row = tuple(COMPUTE for _ in row)
            else:
                names = recipe.block_branches(l)
                row = tuple(_path_action(a, min(gate.points, have[(l, br)])) for a, br in zip(row, names))
            acts.append(row)
        paths.append(Recipe(tuple(acts), full.branches, gate=gate))
    return paths


def base_warmup(base: Plan | None, gate: Gate, warmup: int, steps: int, final: int) -> int:
    """The warm-up a gate over `base` needs: at least `warmup`, and enough first steps that every later branch
    has computed on them the `gate.points` values a skipping step reads (a base that computes a branch every
    k steps needs about k · points); refused when that leaves no step to gate."""
    if base is None:
        return warmup
    need = warmup_for(gate, base.recipes)
    if need is None or need >= steps - final:
        short = (f"it computes some later branch fewer than {gate.points} times in all" if need is None else
                 f"its first {need} steps compute each later branch {gate.points} times")
        raise TcgraphError(f"adaptive over the base {base.planner}: a skipping step reads {gate.points} values each "
                           f"later branch computed (--order {gate.order}), but {short}, which leaves no step of "
                           f"{steps} (final {final}) to gate; use a lower --order or a base that computes more often")
    return max(warmup, need)


def _path_action(action, points: int):
    if action.kind != "forecast":
        return action
    n = min(action.points, points)
    return REUSE if n <= 1 else forecast(n)


def step_work(model_config: ModelConfig, paths: list[Recipe], first: int, text_length: int = 0
              ) -> list[tuple[float, float]]:
    """Per step, (share of block work when it computes, share when it skips): module docstring."""
    def cost(block, branch, action):
        return branch_flops(model_config, branch, action, text_length, False,
                            **branch_rows(model_config, block, branch))

    items = list(paths[0].items())
    total = sum(cost(b, br, COMPUTE) for b, br, _ in items)
    head = sum(cost(b, br, COMPUTE) for b, br, _ in items if b < first) / total
    return [(sum(cost(b, br, a) for b, br, a in p.items()) / total, head) for p in paths]
