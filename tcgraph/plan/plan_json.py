"""Plan JSON: what `Plan.to_dict` writes and `Plan.from_dict` reads.

Fields that later versions added are written only where they differ from what older plans
meant (`branches` for a model other than DiT's two, `layout` for one whose blocks differ or
read several streams, `carry_constants` when false, `forecast_weights` when any, `gate_thresholds` for gated steps), so that
plans written before them read unchanged and hash the same.
"""
from __future__ import annotations

from tcgraph.errors import TcgraphError
from tcgraph.names import BRANCH_ORDER, BRANCHES, CacheKey, cache_name
from tcgraph.models.layout import Layout
from tcgraph.plan.recipe import Recipe
from tcgraph.sampling.settings import SamplerSettings

PLAN_SCHEMA_VERSION = 1


def plan_to_dict(plan) -> dict:
    """A `tcgraph.plan.plan.Plan` as JSON data (docs/design.md, "Artifact folder")."""
    variants = plan.variants()
    return {
        "schema_version": PLAN_SCHEMA_VERSION,
        "planner": plan.planner,
        "params": plan.params,
        "settings": plan.settings.to_dict(),
        "depth": plan.depth,
        **({"branches": list(plan.branches)} if plan.branches != BRANCHES and plan.layout is None else {}),
        **({"layout": plan.layout.to_json()} if plan.layout is not None else {}),
        **({"carry_constants": False} if not plan.carry_constants else {}),
        "num_tokens": plan.num_tokens,
        "variants": {f"v{i}": r.to_json() for i, r in enumerate(variants)},
        "schedule": plan.schedule(),
        **({"forecast_weights": {str(s): {_key_name(k): list(w) for k, w in ws.items()}
                                 for s, ws in sorted(plan.weights.items()) if ws}} if plan.weights else {}),
        **({"gate_thresholds": list(plan.gate_thresholds)} if plan.gate_thresholds is not None else {}),
    }


def plan_from_dict(cls: type, d: dict):
    """The plan (of class `cls`) `plan_to_dict` wrote (plans of older versions read unchanged); refuses a malformed one."""
    version = d.get("schema_version")
    if not isinstance(version, int):
        raise TcgraphError("not a tcgraph plan: no integer schema_version")
    if version > PLAN_SCHEMA_VERSION:
        raise TcgraphError(
            f"plan schema version {version} is newer than this tcgraph supports ({PLAN_SCHEMA_VERSION}); "
            "upgrade tcgraph"
        )
    try:
        layout = Layout.from_json(d["layout"]) if "layout" in d else None
        branches = layout.branches() if layout is not None else tuple(d.get("branches", BRANCHES))
        recipes = {vid: Recipe.from_json(r, branches) for vid, r in d["variants"].items()}
        missing = sorted(set(d["schedule"]) - set(recipes))
        if missing:
            raise TcgraphError(f"plan schedule names variants {missing} that the plan does not define")
        return cls(
            planner=d["planner"],
            settings=SamplerSettings(**d["settings"]),
            recipes=tuple(recipes[v] for v in d["schedule"]),
            num_tokens=int(d["num_tokens"]),
            params=dict(d.get("params", {})),
            weights=_read_weights(d.get("forecast_weights", {})),
            carry_constants=_read_flag(d.get("carry_constants", True), "carry_constants"),
            layout=layout,
            gate_thresholds=_read_thresholds(d.get("gate_thresholds")),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise TcgraphError(f"malformed plan: {type(e).__name__}: {e}") from None


def _read_thresholds(obj):
    if obj is None:
        return None
    if not isinstance(obj, list):
        raise TcgraphError(f"malformed plan: gate_thresholds must be a list of numbers, got {type(obj).__name__}")
    return tuple(obj)


def _read_flag(value, what: str) -> bool:
    if not isinstance(value, bool):
        raise TcgraphError(f"malformed plan: {what} must be true or false, got {value!r}")
    return value


def _key_name(key: CacheKey) -> str:
    return cache_name(*key)


def _read_weights(obj) -> dict:
    """`forecast_weights` of plan JSON ({"12": {"cache.3.attn": [2.0, -1.0]}}) as `Plan.weights`."""
    if not isinstance(obj, dict):
        raise TcgraphError(f"malformed plan: forecast_weights must be an object, got {type(obj).__name__}")
    weights: dict = {}
    for step, per in obj.items():
        entry = weights.setdefault(int(step), {})
        for name, w in per.items():
            parts = name.split(".")
            if len(parts) != 3 or parts[0] != "cache" or parts[2] not in BRANCH_ORDER or not parts[1].isdigit():
                raise TcgraphError(f"malformed plan: forecast weights name {name!r}; expected cache.<block>.<branch>")
            entry[(int(parts[1]), parts[2])] = tuple(float(v) for v in w)
    return weights
