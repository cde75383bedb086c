"""The gate of a gated step (docs/design.md, "Gated steps"): which blocks always compute, what the
others do when the step skips, and the indicator that decides, inside the graph.

A gated recipe's actions are those of its computing path (every branch computes); its `Gate` says
that the first `first` blocks always compute and that, when the indicator allows it, every branch
of the later blocks takes the cheap action instead: `reuse` (order 0) or a forecast from its last
`order + 1` computed outputs, extrapolated in step index (Lagrange weights computed in the graph from
the steps that branch's history holds, its row of `gate.times`, since which steps computed is decided on
the device). A branch's history holds only values it computed: the steps that always compute before a
step that may skip must compute every later branch `order + 1` times (`check_history`).

Indicators (a scalar per batch, formed from the output h of the first blocks):
- `step`: the relative L1 change of h since the previous step, summed over the steps since the last
  computing step (TeaCache's accumulated change, on the first blocks' output as FirstBlockCache);
- `anchor`: the relative L1 change of h against its value at the last computing step (no sum).
The step skips when the indicator is under the step's threshold and fewer than `max_skips` steps
were skipped in a row; a threshold below 0 makes the step compute (warm-up and final steps).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tcgraph.errors import TcgraphError
from tcgraph.names import GATE_ACC, GATE_COUNT, GATE_PARAMS, GATE_REF, GATE_SKIPS, GATE_TIMES
from tcgraph.plan.actions import MAX_HISTORY, REUSE, Action, forecast

INDICATORS = ("step", "anchor")
FORCE_COMPUTE = -1.0  # a threshold no indicator (>= 0) is under: the step computes


@dataclass(frozen=True)
class Gate:
    first: int  # blocks that always compute (F >= 1)
    max_skips: int = 4  # most steps skipped in a row (M >= 1)
    indicator: str = "step"
    order: int = 1  # 0: reuse; n >= 1: forecast from n + 1 history points

    def __post_init__(self) -> None:
        for name in ("first", "max_skips", "order"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TcgraphError(f"gate {name} must be an int, got {value!r}")
        if self.first < 1:
            raise TcgraphError(f"a gate's first blocks (F) must be >= 1, got {self.first}: the indicator is "
                               "formed from their output")
        if self.max_skips < 1:
            raise TcgraphError(f"a gate's max_skips (M) must be >= 1, got {self.max_skips}")
        if self.indicator not in INDICATORS:
            raise TcgraphError(f"unknown gate indicator {self.indicator!r}; expected one of {list(INDICATORS)}")
        if not 0 <= self.order < MAX_HISTORY:
            raise TcgraphError(f"gate order {self.order} out of range 0..{MAX_HISTORY - 1} (0: reuse, n: forecast "
                               f"from n + 1 history points)")

    @property
    def points(self) -> int:
        """History entries the cheap path reads per branch (1 for reuse)."""
        return self.order + 1

    @property
    def cheap(self) -> Action:
        return REUSE if self.order == 0 else forecast(self.points)

    def short(self) -> str:
        return f"G{self.first}{'R' if self.order == 0 else f'F{self.points}'}/{self.indicator}/M{self.max_skips}"

    def to_json(self) -> dict:
        return {"first": self.first, "max_skips": self.max_skips, "indicator": self.indicator, "order": self.order}

    @classmethod
    def from_json(cls, obj) -> "Gate":
        if not isinstance(obj, dict) or not set(obj) <= {"first", "max_skips", "indicator", "order"} \
                or "first" not in obj:
            raise TcgraphError(f"cannot read gate {obj!r}; expected {{'first': F, 'max_skips': M, "
                               "'indicator': 'step'|'anchor', 'order': n}")
        return cls(**obj)


def lagrange_weights(times, step: float) -> list[float]:
    """Weights w_j of the history entries at steps `times` (newest first) that extrapolate to `step`:
    w_j = prod_{m != j} (step - t_m) / (t_j - t_m) (one entry: [1.0], which is reuse)."""
    times = [float(t) for t in times]
    return [_prod((step - tm) / (tj - tm) for m, tm in enumerate(times) if m != j) for j, tj in enumerate(times)]


def _prod(values) -> float:
    result = 1.0
    for v in values:
        result *= v
    return result


def validate_gated(plan) -> None:
    """Gated plans: every step gated by the same gate, one finite threshold per step, one image stream,
    no run constants carried."""
    gates = {r.gate for r in plan.recipes}
    if gates == {None}:
        if plan.gate_thresholds is not None:
            raise TcgraphError("gate thresholds are given but no step of the plan is gated")
        return
    if len(gates) != 1:
        raise TcgraphError("a plan with gated steps gates every step with the same gate (warm-up and final "
                           "steps compute through a threshold below 0)")
    thresholds = plan.gate_thresholds
    if thresholds is None or len(thresholds) != len(plan.recipes) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in thresholds):
        raise TcgraphError(f"a gated plan needs one finite threshold per step ({len(plan.recipes)}), got "
                           f"{None if thresholds is None else list(thresholds)}")
    object.__setattr__(plan, "gate_thresholds", tuple(float(v) for v in thresholds))
    check_history(plan.gate, plan.recipes, plan.gate_thresholds)
    if plan.constant_keys():
        raise TcgraphError("gated steps need a plan that carries no run constants (make the plan with "
                           "carry_constants=False)")


def forced_counts(gate: Gate, recipes, thresholds) -> list[dict]:
    """Per step, per later branch (`Recipe.gated_keys`): how many steps before it always compute (threshold
    below 0) and compute that branch on their path: the entries its history is sure to hold then."""
    keys = recipes[0].gated_keys() if recipes[0].gate is not None else \
        [(b, br) for b, br, _ in recipes[0].items() if b >= gate.first]
    counts, seen = [], dict.fromkeys(keys, 0)
    for recipe, threshold in zip(recipes, thresholds):
        counts.append(dict(seen))
        if threshold < 0:
            for key in keys:
                seen[key] += recipe.action(*key).computes
    return counts


def warmup_for(gate: Gate, recipes) -> int | None:
    """The fewest first steps that, all computing, compute every later branch `gate.points` times on their
    paths (so a step after them may skip), or None when no number of them does."""
    need = {(b, br): gate.points for b, br, _ in recipes[0].items() if b >= gate.first}
    for s, recipe in enumerate(recipes):
        if not need:
            return s
        for key in list(need):
            need[key] -= recipe.action(*key).computes
            if need[key] <= 0:
                del need[key]
    return len(recipes) if not need else None


def check_history(gate: Gate, recipes, thresholds) -> None:
    """Every read of a later branch's history reads values that branch computed, at distinct steps (so no
    Lagrange weight divides by equal times): a step that may skip reads `gate.points` of every later branch,
    a computing path's reuse one and its forecast from n points n; the steps that always compute before it
    must have computed that many on their paths."""
    for step, (recipe, have) in enumerate(zip(recipes, forced_counts(gate, recipes, thresholds))):
        for key, count in have.items():
            action = recipe.action(*key)
            where = f"step {step} block {key[0]} {key[1]}"
            if action.kind == "forecast" and not 1 <= action.points <= min(gate.points, count):
                raise TcgraphError(
                    f"{where}: a gated step's computing path forecasts from the branch's own history, at most "
                    f"{gate.points} points and no more than the {count} steps before it that always compute it; "
                    f"got {action.points}")
            if action.kind == "reuse" and count < 1:
                raise TcgraphError(f"{where}: a gated step's computing path reuses the branch, but no step before it "
                                   "that always computes computes it")
            if thresholds[step] >= 0 and count < gate.points:
                warmup = warmup_for(gate, recipes)
                fix = (f"with --warmup {warmup} every later branch computes {gate.points} times before the first "
                       "step that may skip" if warmup is not None else
                       f"no warm-up does: the plan computes it fewer than {gate.points} times in all")
                raise TcgraphError(
                    f"{where}: the step may skip, and its skipping path reads {gate.points} values the branch "
                    f"computed, but the steps before it that always compute computed it {count} times; {fix}")


def uniform_work(gate: Gate, depth: int, steps: int) -> list[tuple[float, float]]:
    """Each step's (computing, skipping) share of block work when every block costs the same and a computing
    step computes every branch: 1 and first / depth (a planner's own shares: `params["step_work"]`)."""
    return [(1.0, gate.first / depth)] * steps


def work_range(work, thresholds, max_skips: int) -> tuple[float, float]:
    """(least, most) compute fraction of a run: the most computes every step; the least skips where that
    saves most, at the steps whose threshold is not below 0, no more than `max_skips` in a row (the
    forced steps compute and end a run of skips)."""
    steps = len(work)
    best = [0.0] + [float("inf")] * max_skips  # best[k]: least work so far with k skips in a row at the end
    for (computes, skips), threshold in zip(work, thresholds):
        after = [min(best) + computes] + [float("inf")] * max_skips
        if threshold >= 0:
            for k in range(max_skips):
                after[k + 1] = best[k] + skips
        best = after
    return min(best) / steps, sum(c for c, _ in work) / steps


def gate_shape(plan, name: str, hidden_size: int) -> tuple[int, ...]:
    """Shape of a gated step's state tensor or its `gate.params` input."""
    if name == GATE_REF:
        return plan.settings.model_batch, plan.num_tokens, hidden_size
    if name == GATE_TIMES:  # one row per later branch: the steps its history holds, newest first
        return len(plan.recipes[0].gated_keys()), plan.gate.points
    if name in (GATE_ACC, GATE_SKIPS):
        return (1,)
    if name == GATE_COUNT:  # computed steps, block work done
        return (2,)
    if name == GATE_PARAMS:  # step, threshold, most skips in a row, share of block work computing, skipping
        return (5,)
    raise TcgraphError(f"{name!r} is not a gated step's input or output")
