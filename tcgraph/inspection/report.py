"""What an artifact folder holds, read from the folder alone: settings, schedule, variants
and their cost, the cache memory (history entries of forecast branches included), and for
one variant (or step) its block view, forecast weights, node table and diff against the
full graph. Everything returned is plain JSON; `tcgraph.inspection.text.format_report` prints it.

Never writes into the artifact folder.
"""
from __future__ import annotations

import math

from pathlib import Path
from typing import TYPE_CHECKING

from tcgraph.errors import UsageError
from tcgraph.inspection.measured import read as read_measured
from tcgraph.models.families import ModelConfig, config_from_dict
from tcgraph.names import (branch_key, FORECAST_WEIGHTS, INPUT_SUFFIX, cache_name, history_index, history_name,
                           is_cache)
from tcgraph.plan.gate import uniform_work, work_range
from tcgraph.plan.plan import Plan, Recipe

if TYPE_CHECKING:
    from tcgraph.export.artifact import Artifact

SCHEDULE_RUNS = 20  # runs of the compact schedule printed before "… (n more runs)"


#################################################################################
#                              Plan-level views                                 #
#################################################################################


def action_label(action) -> str:
    if action.kind == "forecast":
        return f"forecast({action.points})"
    return f"{action.kind}({action.k})" if action.kind in ("partial", "dynamic") else action.kind


def block_view(recipe: Recipe, num_tokens: int) -> list[dict]:
    """One row per block: each branch's action, and for partial the kept token indices
    (a dynamic branch has none: its tokens are chosen per sample at run time)."""
    rows = []
    for block, pair in enumerate(recipe.actions):
        row: dict = {"block": block}
        for branch, action in zip(recipe.block_branches(block), pair):
            row[branch] = action_label(action)
            if action.kind == "partial":
                row[f"{branch}_tokens"] = list(action.indices)
        rows.append(row)
    return rows


def action_counts(plan: Plan) -> dict[str, int]:
    """Actions over the whole plan: every (step, block, branch) counted once; `dynamic` and
    `forecast` only where the plan has such actions."""
    counts = {"compute": 0, "reuse": 0, "partial": 0}
    for recipe in plan.recipes:
        for _, _, a in recipe.items():
            counts[a.kind] = counts.get(a.kind, 0) + 1
    return counts


def forecast_counts(plan: Plan) -> dict[str, int]:
    """Forecast actions of the whole plan by their number of history points: {"F2": 18, "F3": 6}."""
    counts: dict[str, int] = {}
    for recipe in plan.recipes:
        for _, _, a in recipe.items():
            if a.kind == "forecast":
                counts[a.short()] = counts.get(a.short(), 0) + 1
    return dict(sorted(counts.items()))


def cache_memory(plan: Plan, hidden_size: int | None, itemsize: int = 4) -> dict:
    """What the plan carries between steps, for its model batch: every cache tensor is one
    [model batch, N, D] float32 tensor (`Plan.cache_names`), split into output caches
    (`cache.<l>.<br>`, the newest history entry of a forecast branch), older history entries
    (`….h<j>`) and input caches of dynamic branches (`….in`). `history_per_branch`: the
    entries (the cache included) each forecast branch keeps, `Plan.history`. `constants`: the run
    constants (the text's keys and values, `Plan.constant_names`), each [model batch, L, D]; `bytes`
    counts them too. Bytes are None without the model's hidden size; `mb` counts 2**20 bytes, as
    `--max-cache-mb` does."""
    names = plan.cache_names()
    groups = {"caches": [], "history": [], "input_caches": []}
    for n in names:
        if n.endswith(INPUT_SUFFIX):
            groups["input_caches"].append(n)
        elif history_index(n)[1] > 0:
            groups["history"].append(n)
        else:
            groups["caches"].append(n)
    forecast_keys = sorted({k for r in plan.recipes for k, _ in r.forecasts()},
                           key=branch_key)
    # each cache's rows come from the plan (a joint branch: text + image rows; a text-only branch: L)
    rows = sorted({plan.cache_rows(n) for n in names}) or [plan.num_tokens]
    one_shape = len(rows) == 1  # else the shape line shows the rows as "?"

    def nbytes(group: list[str]) -> int | None:
        return None if hidden_size is None else sum(math.prod(plan.cache_shape(n, hidden_size)) * itemsize
                                                    for n in group)

    total = None if hidden_size is None else plan.cache_bytes(hidden_size, itemsize)
    return {
        "dtype": "float32" if itemsize == 4 else f"{itemsize * 8}-bit",
        "tensor_shape": [plan.settings.model_batch, rows[0] if one_shape else None, hidden_size],
        "tensor_bytes": (None if hidden_size is None or not one_shape
                         else plan.settings.model_batch * rows[0] * hidden_size * itemsize),
        "tensors": len(names),
        "bytes": total,
        "mb": None if total is None else total / 2**20,
        **{k: {"count": len(v), "bytes": nbytes(v)} for k, v in groups.items()},
        "history_per_branch": {cache_name(*k): plan.history(k) for k in forecast_keys},
        "constants": {"count": len(plan.constant_names()),
                      "tensor_shape": [plan.settings.model_batch, plan.settings.text_length, hidden_size],
                      "bytes": None if hidden_size is None else len(plan.constant_names()) * plan.settings.model_batch
                      * plan.settings.text_length * hidden_size * itemsize},
    }


def forecast_view(plan: Plan, recipe: Recipe, steps: list[int], step: int | None = None) -> dict | None:
    """How a forecasting variant gets its weights: not from the graph but per step through
    the `forecast.w` input (block order, n weights per branch, newest history entry first).
    With `step`, that step's weights per branch and the steps whose outputs they weigh
    (`Plan.history_steps`, newest first). None for a variant that forecasts nothing."""
    layout = recipe.forecasts()
    if not layout:
        return None
    branches, offset = [], 0
    for (block, branch), points in layout:
        branches.append({"block": block, "branch": branch, "cache": cache_name(block, branch), "points": points,
                         "offset": offset,
                         "history": [history_name(block, branch, j) for j in range(points)]})
        offset += points
    distinct = {tuple(tuple(plan.weights[s][k]) for k, _ in layout) for s in steps}
    view = {"input": FORECAST_WEIGHTS, "size": offset, "steps": list(steps), "distinct_weight_sets": len(distinct),
            "branches": branches}
    if step is not None:
        weights = plan.weights[step]
        view["step"] = step
        view["weights"] = [{"block": b["block"], "branch": b["branch"], "points": b["points"],
                            "weights": [float(w) for w in weights[(b["block"], b["branch"])]],
                            "history_steps": plan.history_steps(step, (b["block"], b["branch"]))[:b["points"]]}
                           for b in branches]
        view["feed"] = [float(w) for w in plan.step_weights(step)]
    return view


def full_variant(plan: Plan, flops: dict | None = None) -> tuple[str, bool]:
    """(id of the variant that computes everything, True) or, if none, (the costliest one, False)."""
    variants = plan.variants()
    for i, r in enumerate(variants):
        if r.is_full:
            return f"v{i}", True
    if flops:
        return max(flops["per_variant"], key=flops["per_variant"].get), False
    costs = [sum(1 if a.kind == "compute" else (a.k or 0) / plan.num_tokens if a.kind in ("partial", "dynamic") else 0
                 for _, _, a in r.items()) for r in variants]
    return f"v{costs.index(max(costs))}", False


def compact_schedule(schedule: list[str], max_runs: int = SCHEDULE_RUNS) -> str:
    """Run-length form: `v0 v1x2 v0 …`, at most `max_runs` runs shown."""
    runs: list[list] = []
    for v in schedule:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    parts = [v if n == 1 else f"{v}x{n}" for v, n in runs]
    return " ".join(parts[:max_runs]) + (f" … ({len(parts) - max_runs} more runs)" if len(parts) > max_runs else "")


def step_position(plan: Plan, step: int) -> dict:
    """Where `step` sits: its variant, its run of equal variants, the last full step before it."""
    schedule = plan.schedule()
    n = len(schedule)
    if not 0 <= step < n:
        raise UsageError(f"step {step} is out of range: this plan has {n} steps, valid steps are 0..{n - 1}")
    vid = schedule[step]
    start = step
    while start > 0 and schedule[start - 1] == vid:
        start -= 1
    end = step
    while end + 1 < n and schedule[end + 1] == vid:
        end += 1
    last_full = next((s for s in range(step, -1, -1) if plan.recipes[s].is_full), None)
    return {
        "step": step, "num_steps": n, "variant": vid,
        "run": [start, end], "position_in_run": step - start + 1, "run_length": end - start + 1,
        "last_full_step": last_full,
        "steps_since_full": None if last_full is None else step - last_full,
        "occurrence": sum(1 for s in range(step + 1) if schedule[s] == vid),
        "variant_steps": sum(1 for v in schedule if v == vid),
    }


def inspect_plan(plan: Plan, model_config: ModelConfig | dict | None = None, *, variant: str | None = None,
                 step: int | None = None, costs: dict | None = None) -> dict:
    """The plan-level part of `inspect_artifact` for a Plan object (no ONNX files needed);
    `model_config` (a model config or its dict) adds the FLOP counts, from the formulas of
    `tcgraph.plan.flops`, or from `costs` (a measured `CostTable`'s dict, as artifacts store it)."""
    from tcgraph.plan.flops import plan_flops

    if isinstance(model_config, dict):
        model_config = config_from_dict(model_config)
    if costs is not None:  # the cost table measured at transform time (tcgraph.plan.costs)
        from tcgraph.plan.costs import CostTable, predict_flops

        flops = predict_flops(CostTable.from_dict(costs), plan)
    else:
        flops = plan_flops(model_config, plan) if model_config is not None else None
    schedule = plan.schedule()
    variants = []
    for i, recipe in enumerate(plan.variants()):
        vid = f"v{i}"
        ins, outs = plan.variant_io(recipe)
        kinds = [a.kind for _, _, a in recipe.items()]
        variants.append({
            "id": vid,
            "steps": [s for s, v in enumerate(schedule) if v == vid],
            "recipe": recipe.short(),
            "full": recipe.is_full,
            "compute": kinds.count("compute"), "reuse": kinds.count("reuse"), "partial": kinds.count("partial"),
            "dynamic": kinds.count("dynamic"), "forecast": kinds.count("forecast"),
            "reads": [n for n in ins if is_cache(n)], "writes": outs[1:],
            "plan_inputs": [n for n in ins if n == FORECAST_WEIGHTS],
            "flops": flops["per_variant"][vid] if flops else None,
            "fraction": flops["fraction"][vid] if flops else None,
        })
    base, base_is_full = full_variant(plan, flops)
    info = {
        "planner": plan.planner,
        "params": plan.params,
        **({"gate": gate_view(plan)} if plan.gate is not None else {}),
        "settings": {"sampler": plan.settings.sampler, "num_steps": plan.settings.num_steps,
                     "cfg_scale": plan.settings.cfg_scale, "eta": plan.settings.eta,
                     "batch": plan.settings.batch, "model_batch": plan.settings.model_batch,
                     "resolution": plan.settings.resolution, "text_length": plan.settings.text_length,
                     "scheduler": (plan.settings.scheduler or {}).get("_class_name")},
        "depth": plan.depth,
        "num_tokens": plan.num_tokens,
        "schedule": schedule,
        "schedule_compact": compact_schedule(schedule),
        "action_counts": action_counts(plan),
        "forecast_counts": forecast_counts(plan),
        "memory": cache_memory(plan, model_config.hidden_size if model_config is not None else None),
        "variants": variants,
        "full_variant": base,
        "full_variant_exists": base_is_full,
        "flops_per_run": flops["total"] if flops else None,
        "full_flops_per_run": flops["full_total"] if flops else None,
        "predicted_speedup": flops["predicted_speedup"] if flops else None,
    }
    focus = _resolve_focus(plan, variant, step)
    if focus is not None:
        vid, pos = focus
        recipe = plan.variants()[int(vid[1:])]
        info["focus"] = {"variant": vid, "step": pos, "blocks": block_view(recipe, plan.num_tokens),
                         "recipe": recipe.short()}
        fc = forecast_view(plan, recipe, [s for s, v in enumerate(schedule) if v == vid],
                           None if pos is None else pos["step"])
        if fc is not None:
            info["focus"]["forecast"] = fc
    return info


def _resolve_focus(plan: Plan, variant: str | None, step: int | None):
    ids = [f"v{i}" for i in range(len(plan.variants()))]
    pos = None
    if step is not None:
        try:
            step = int(step)
        except (TypeError, ValueError):
            raise UsageError(f"step {step!r} is not an integer; valid steps are 0..{len(plan.recipes) - 1}") from None
        pos = step_position(plan, step)
        if variant is not None and variant != pos["variant"]:
            raise UsageError(f"step {step} runs variant {pos['variant']}, not {variant}; give one of variant and step, not both")
        variant = pos["variant"]
    if variant is None:
        return None
    if variant not in ids:
        raise UsageError(f"unknown variant {variant!r}; valid variants: {', '.join(ids)}")
    return variant, pos


#################################################################################
#                                 Artifact                                      #
#################################################################################


def inspect_artifact(path: str | Path, *, variant: str | None = None, step: int | None = None,
                     verify: bool = True) -> dict:
    """Everything `tcgraph inspect` shows, as a JSON-able dict.

    `variant` ("v1") or `step` (the variant that step runs, and where the step sits in
    the schedule) adds `focus`: block view, node table and diff against the full graph.
    `verify` checks every file's sha256 first (as `load_artifact` does).
    """
    from tcgraph.export.artifact import load_artifact

    art = load_artifact(Path(path), verify_hashes=verify)  # typed: the plan and the model are checked there
    plan = art.plan
    info = inspect_plan(plan, art.model_config, variant=variant, step=step, costs=art.extra.get("costs"))
    manifest_ids = art.variant_ids()
    info["path"] = str(art.root)
    info["model"] = {**art.model_config.to_dict(), "source": art.source_model, "num_tokens": plan.num_tokens}
    info["tcgraph_version"] = art.tcgraph_version
    weights = art.weights_path
    info["weights"] = {"file": str(weights.relative_to(art.root)),
                       "bytes": weights.stat().st_size if weights.is_file() else 0}
    onnx_bytes = {vid: art.variant_path(vid).stat().st_size for vid in manifest_ids}
    for v in info["variants"]:
        v["file"] = art.variant(v["id"]).file if v["id"] in manifest_ids else None
        v["onnx_bytes"] = onnx_bytes.get(v["id"])
    info["engines"] = _engines(art, verify)
    info["measured"] = read_measured(art.root)  # what `tcgraph compare` last measured, if it ran
    if "focus" in info:
        vid = info["focus"]["variant"]
        info["focus"].update(_graph_focus(art, vid, info["full_variant"]))
    return info


def _engines(art: Artifact, verified: bool) -> dict:
    """The engine files and what inspect can know of them. It cannot deserialize a TensorRT
    engine (that needs TensorRT, the GPU kind and the TensorRT version it was built for):
    it checks only that each file is one `transform --backend trt` listed, with that size and
    (with `verified`) that sha256. `status`: "listed" (hash-checked), "unverified" (hashes not
    checked), "unlisted" (files the manifest does not name: not written by transform, never used)."""
    folder = art.root / "engines"
    files = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    settings = art.tensorrt or {}  # written by `transform --backend trt`
    backend = "tensorrt" if settings else None
    if files and backend is None:
        backend = "tensorrt" if any(f.endswith((".plan", ".engine")) for f in files) else "unknown"
    info: dict = {"files": files, "backend": backend, "settings": settings}
    if not files and not settings:
        return info
    listed = settings.get("engines") if isinstance(settings.get("engines"), dict) else {}
    listed_files = {e.get("file"): e for e in listed.values() if isinstance(e, dict)}
    problems = []
    for name in files:
        rel = f"engines/{name}"
        entry = listed_files.get(rel)
        if rel not in art.files or (entry is None and not name.endswith(".cache")):
            problems.append(f"{rel} is not listed in manifest.json: not written by `transform --backend trt`, unverified")
        elif entry is not None and entry.get("bytes") not in (None, (folder / name).stat().st_size):
            problems.append(f"{rel} has {(folder / name).stat().st_size} bytes, the manifest says {entry.get('bytes')}")
    for vid, entry in listed.items():
        rel = entry.get("file") if isinstance(entry, dict) else None
        if vid not in art.variant_ids():
            problems.append(f"the manifest lists an engine for {vid!r}, which is not a variant")
        if not isinstance(rel, str) or not (art.root / rel).is_file():
            problems.append(f"the engine of {vid} ({rel}) is missing")
    missing = [v for v in art.variant_ids() if settings and v not in listed]
    if missing:
        problems.append(f"no engine listed for {', '.join(missing)}")
    info["problems"] = problems
    info["status"] = "unlisted" if problems else ("listed" if verified else "unverified")
    return info


def _graph_focus(art: Artifact, vid: str, base: str) -> dict:
    from tcgraph.inspection.graph import diff_graphs

    graph = _read_named(art, vid)
    out = {"graph": {"inputs": graph.inputs, "outputs": graph.outputs, "num_nodes": len(graph.nodes),
                     "flops": graph.flops, "nodes": [n.to_json() for n in graph.nodes]},
           "diff_base": base}
    base_graph = graph if base == vid else _read_named(art, base)
    out["diff"] = diff_graphs(base_graph, graph)
    out["base_flops"] = base_graph.flops
    return out


def _read_named(art: Artifact, vid: str):
    """Node table with output names mapped back from ONNX names (`cache.3.mlp.new`)."""
    from tcgraph.inspection.graph import read_variant_graph

    graph = read_variant_graph(art.variant_path(vid), art.blocks)
    names = {o.onnx_name: o.name for o in art.variant(vid).outputs}
    graph.outputs = {names.get(k, k): v for k, v in graph.outputs.items()}
    return graph


def gate_view(plan) -> dict:
    """A gated plan's gate (docs/design.md, "Gated steps"): what always computes, what the others do, the
    thresholds, the base plan whose recipes the computing steps run (None: every branch computes), and the
    compute fraction as a range (every skip the gate allows … every step computing; each step's share the
    planner's, else every block alike) with the fraction the planner measured on its calibration noise."""
    gate, steps, depth = plan.gate, len(plan.recipes), plan.depth
    free = [s for s, t in enumerate(plan.gate_thresholds) if t >= 0]
    work = plan.params.get("step_work") or uniform_work(gate, depth, steps)
    least, most = work_range(work, plan.gate_thresholds, gate.max_skips)
    return {"first": gate.first, "max_skips": gate.max_skips, "indicator": gate.indicator, "order": gate.order,
            "forced_steps": [s for s in range(steps) if s not in free],
            "thresholds": sorted({t for t in plan.gate_thresholds if t >= 0}),
            "fraction_range": [least, most], "calibrated_fraction": plan.params.get("calibrated_fraction"),
            "base": (plan.params.get("base") or {}).get("name")}

