"""inspect on forecast plans: a real taylor:3 artifact (counts, memory from shapes, a step's
weights against plan.weights, the forecast.w note of a variant, the weighted sums in the
node table and diff) and a hand-made mixed plan (compute, reuse, partial, dynamic, F1-F3)
checked at plan level: memory split, history per branch, weights and history steps,
heatmap and legend pixels, DOT labels."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tcgraph import api
from tcgraph.inspection import (
    action_color,
    format_report,
    heatmap_layout,
    inspect_artifact,
    inspect_plan,
    legend_entries,
    variant_dot,
    write_plan_pictures,
)
from tcgraph.inspection.pictures import (
    COMPUTE_RGB,
    FORECAST_DARK_RGB,
    FORECAST_LIGHT_RGB,
    PARTIAL_DARK_RGB,
    PARTIAL_LIGHT_RGB,
    REUSE_RGB,
)
from tcgraph.models.official.dit import DiT, make_config, randomize_weights
from tcgraph.names import BRANCHES
from tcgraph.plan import make_plan
from tcgraph.plan.plan import COMPUTE, REUSE, Plan, Recipe, dynamic, forecast, partial
from tcgraph.sampling import SamplerSettings
from tests.inspection.artifacts import graph_of

TINY = make_config("DiT-S/2", input_size=8, depth=3, hidden_size=32, num_heads=2, in_channels=2,
                   num_classes=5, learn_sigma=True)  # the shape of tests/conftest.py's tiny_model
N, D = TINY.num_tokens, TINY.hidden_size  # 16 tokens, hidden 32
STEPS = 6  # taylor:3 (order 1): C R R C F2 F2


def _bytes(tensors: int, model_batch: int) -> int:
    return tensors * model_batch * N * D * 4  # float32 [B, N, D] each


@pytest.fixture(scope="module")
def taylor(tmp_path_factory):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = randomize_weights(DiT(TINY), std=0.05)
    s = SamplerSettings(num_steps=STEPS, cfg_scale=2.0, batch=1, resolution=TINY.input_size)
    plan = make_plan("taylor:3", TINY, s)
    out = tmp_path_factory.mktemp("insp") / "taylor3"
    # check=False: the numerical checks of export are tested elsewhere; inspect reads the folder.
    return api.transform(model, plan, out, progress=False, check=False)


@pytest.fixture(scope="module")
def taylor_plan(taylor):
    return Plan.from_dict(json.loads((taylor / "plan.json").read_text()))


def _mixed() -> Plan:
    """Every action kind; branches keep 3, 2, 1 (cache only) history entries; 2.mlp is dynamic."""
    s = SamplerSettings(num_steps=6, cfg_scale=2.0, batch=2, resolution=TINY.input_size)  # model batch 4
    full = Recipe.uniform(TINY.depth, COMPUTE, BRANCHES)
    a = Recipe(((forecast(2), REUSE), (COMPUTE, forecast(1)), (partial([0, 1, 5]), dynamic(4))), BRANCHES)
    b = Recipe(((forecast(3), forecast(2)), (REUSE, forecast(2)), (forecast(2), dynamic(4))), BRANCHES)
    weights = {
        2: {(0, "attn"): (1.5, -0.5), (1, "mlp"): (0.9,)},
        4: {(0, "attn"): (3.0, -3.0, 1.0), (0, "mlp"): (2.0, -1.0), (1, "mlp"): (1.25, -0.25),
            (2, "attn"): (0.7, 0.3)},
        5: {(0, "attn"): (6.0, -8.0, 3.0), (0, "mlp"): (3.0, -2.0), (1, "mlp"): (1.5, -0.5),
            (2, "attn"): (0.6, 0.4)},
    }
    return Plan("hand-forecast", s, (full, full, a, full, b, b), N, weights=weights)


# ---- taylor:3 artifact --------------------------------------------------------------


def test_taylor_counts_memory_and_variant_table(taylor, taylor_plan):
    info = inspect_artifact(taylor)
    raw = json.loads((taylor / "plan.json").read_text())
    counts: dict[str, int] = {}
    for vid in raw["schedule"]:  # straight from the JSON
        for pair in raw["variants"][vid]:
            for a in pair:
                kind = a if isinstance(a, str) else next(iter(a))
                counts[kind] = counts.get(kind, 0) + 1
    # steps 0, 3 compute; 1, 2 reuse (one history point so far); 4, 5 forecast from 2 points
    assert counts == {"compute": 12, "reuse": 12, "forecast": 12}
    assert info["action_counts"] == {**counts, "partial": 0}
    assert info["forecast_counts"] == {"F2": 12}
    assert info["schedule"] == ["v0", "v1", "v1", "v0", "v2", "v2"]
    v0, v1, v2 = info["variants"]
    assert [(v["compute"], v["reuse"], v["forecast"]) for v in (v0, v1, v2)] == [(6, 0, 0), (0, 6, 0), (0, 0, 6)]
    keys = [(b, br) for b in range(3) for br in BRANCHES]
    assert v2["reads"] == [n for b, br in keys for n in (f"cache.{b}.{br}", f"cache.{b}.{br}.h1")]
    assert v2["plan_inputs"] == ["forecast.w"] and v1["plan_inputs"] == [] and len(v1["reads"]) == 6

    m = info["memory"]
    model_batch = info["settings"]["model_batch"]
    assert model_batch == 2 and m["tensor_shape"] == [2, N, D] and m["tensors"] == 12
    assert m["bytes"] == _bytes(12, 2) == taylor_plan.cache_bytes(D) == 49152
    assert m["caches"] == {"count": 6, "bytes": _bytes(6, 2)}
    assert m["history"] == {"count": 6, "bytes": _bytes(6, 2)}
    assert m["input_caches"] == {"count": 0, "bytes": 0}
    assert m["mb"] == pytest.approx(49152 / 2**20)
    assert m["history_per_branch"] == {f"cache.{b}.{br}": 2 for b, br in keys}
    json.dumps(info, allow_nan=False)

    text = format_report(info)
    assert "actions    compute 12, reuse 12, partial 0, forecast 12 (F2 12) (steps x blocks x branches = 36)" in text
    assert "cache mem  0.05 MB (49152 bytes) for model batch 2, 12 tensors of [2, 16, 32] float32" in text
    assert "caches 6 (0.02 MB), history entries 6 (0.02 MB), input caches 0 (0.00 MB)" in text
    assert "history    entries per forecast branch (its cache included): 2 on 6 branches" in text
    header = next(ln for ln in text.splitlines() if ln.startswith("variant "))
    row = next(ln for ln in text.splitlines() if ln.startswith("v2 "))
    assert header.split()[:8] == ["variant", "steps", "compute", "reuse", "partial", "forecast", "reads", "writes"]
    assert row.split()[:8] == ["v2", "2", "0", "0", "0", "6", "12", "0"]
    # Right-aligned columns: each number ends where its header does.
    for name, value in (("forecast", "6"), ("reads", "12"), ("partial", "0")):
        end = header.index(name) + len(name)
        assert row[end - len(value):end] == value


def test_taylor_step_weights_equal_plan_weights(taylor, taylor_plan):
    info = inspect_artifact(taylor, step=5)
    fc = info["focus"]["forecast"]
    assert fc["step"] == 5 and fc["steps"] == [4, 5] and fc["size"] == 12 and fc["input"] == "forecast.w"
    assert fc["distinct_weight_sets"] == 2
    assert len(fc["weights"]) == 6
    for row in fc["weights"]:
        key = (row["block"], row["branch"])
        assert tuple(row["weights"]) == taylor_plan.weights[5][key]
        assert row["history_steps"] == taylor_plan.history_steps(5, key)[:2] == [3, 0]
    # Lagrange through steps 3 and 0, evaluated at 5: (5-0)/(3-0), (5-3)/(0-3)
    assert fc["weights"][0]["weights"] == pytest.approx([5 / 3, -2 / 3])
    assert fc["feed"] == pytest.approx(list(taylor_plan.step_weights(5)))
    assert [r["attn"] for r in info["focus"]["blocks"]] == ["forecast(2)"] * 3
    text = format_report(info)
    assert "  block 0 attn  F2  w = [+1.667, -0.667] on steps [3, 0]" in text
    assert "  block 2 mlp   F2  w = [+1.667, -0.667] on steps [3, 0]" in text
    assert "variant v2: 2 steps, 0 compute, 0 reuse, 0 partial, 6 forecast; reads 12 caches (+ forecast.w)" in text
    assert "weights at step 5:" in text
    # A step without forecasts shows none.
    assert "forecast" not in inspect_artifact(taylor, step=1)["focus"]


def test_taylor_variant_focus_and_node_table(taylor):
    info = inspect_artifact(taylor, variant="v2")
    fc = info["focus"]["forecast"]
    assert "weights" not in fc and fc["steps"] == [4, 5]
    assert [(b["cache"], b["points"], b["offset"]) for b in fc["branches"]][:2] == [("cache.0.attn", 2, 0),
                                                                                     ("cache.0.mlp", 2, 2)]
    assert fc["branches"][0]["history"] == ["cache.0.attn", "cache.0.attn.h1"]
    text = format_report(info)
    assert "each step feeds its own through forecast.w (12 floats: block order, newest history entry first)" in text
    assert "steps running v2: 4, 5 (2 distinct weight sets)" in text
    # The weighted sums belong to their branch: Gather (2 weights), Mul (2 weights times the gate,
    # 2 terms), Add (1) per branch; the gate's own multiply is gone (the weights are folded into it).
    d = info["focus"]["diff"]
    units = {f"blocks.{b}.{br}" for b in range(3) for br in BRANCHES}
    assert set(d["added_by_unit"]) == units and d["nodes_added"] == 42
    for u in d["added_by_unit"].values():
        assert u["ops"] == {"Gather": 2, "Mul": 4, "Add": 1} and u["flops"] == 0
    assert {n["scope"] for n in d["added"]} == {"forecast"}
    assert f"+ {'blocks 0-2 .attn':<22}{7:>4} nodes each" in text
    g = graph_of(taylor, "v2")
    assert sum(n.scope == "forecast" for n in g.nodes) == 42
    assert sum(n.scope == "forecast" for n in graph_of(taylor, "v1").nodes) == 0
    assert inspect_artifact(taylor, variant="v1")["focus"]["diff"]["nodes_added"] == 0  # reuse: unchanged


# ---- hand-made mixed plan (plan level) ------------------------------------------------


def test_mixed_plan_counts_memory_and_history():
    plan = _mixed()
    info = inspect_plan(plan, TINY.to_dict())
    # 3 full steps (18) + step 2 (C, R, F2, F1, P3, D4) + steps 4, 5 (R, F3, F2 x3, D4 each)
    assert info["action_counts"] == {"compute": 19, "reuse": 3, "partial": 1, "dynamic": 3, "forecast": 10}
    assert info["forecast_counts"] == {"F1": 1, "F2": 7, "F3": 2}
    assert [v["forecast"] for v in info["variants"]] == [0, 2, 4]
    m = info["memory"]
    # caches: 6 (every branch is read); history: 0.attn h1,h2; 0.mlp, 1.mlp, 2.attn h1; input cache: 2.mlp.in
    assert (m["caches"]["count"], m["history"]["count"], m["input_caches"]["count"]) == (6, 5, 1)
    assert m["tensor_shape"] == [4, N, D] and info["settings"]["model_batch"] == 4
    assert m["bytes"] == _bytes(12, 4) == plan.cache_bytes(D) == 98304
    assert (m["caches"]["bytes"], m["history"]["bytes"], m["input_caches"]["bytes"]) == \
        (_bytes(6, 4), _bytes(5, 4), _bytes(1, 4))
    assert m["history_per_branch"] == {"cache.0.attn": 3, "cache.0.mlp": 2, "cache.1.mlp": 2, "cache.2.attn": 2}
    text = format_report(info)
    assert "forecast 10 (F1 1, F2 7, F3 2)" in text and "dynamic 3" in text
    assert "caches 6 (0.05 MB), history entries 5 (0.04 MB), input caches 1 (0.01 MB)" in text
    assert "cache mem  0.09 MB (98304 bytes) for model batch 4, 12 tensors of [4, 16, 32] float32" in text
    assert ("entries per forecast branch (its cache included): 3 on 1 branch (cache.0.attn); "
            "2 on 3 branches (cache.0.mlp, cache.1.mlp, cache.2.attn)") in text
    no_model = inspect_plan(plan)["memory"]  # no hidden size: counts, no bytes
    assert no_model["bytes"] is None and no_model["tensors"] == 12 and no_model["history"]["count"] == 5


def test_mixed_plan_step_weights_and_history_steps():
    plan = _mixed()
    fc = inspect_plan(plan, TINY.to_dict(), step=4)["focus"]["forecast"]
    got = {(r["block"], r["branch"]): (tuple(r["weights"]), r["history_steps"]) for r in fc["weights"]}
    assert got == {
        (0, "attn"): ((3.0, -3.0, 1.0), [3, 1, 0]),
        (0, "mlp"): ((2.0, -1.0), [3, 1]),
        (1, "mlp"): ((1.25, -0.25), [3, 1]),  # step 2 forecast it: not a history entry
        (2, "attn"): ((0.7, 0.3), [3, 2]),  # step 2 was partial: a computed history entry
    }
    assert {k: w for k, (w, _) in got.items()} == plan.weights[4]
    assert fc["feed"] == pytest.approx([3.0, -3.0, 1.0, 2.0, -1.0, 1.25, -0.25, 0.7, 0.3])
    assert [b["offset"] for b in fc["branches"]] == [0, 3, 5, 7] and fc["size"] == 9
    assert fc["steps"] == [4, 5] and fc["distinct_weight_sets"] == 2
    f2 = inspect_plan(plan, TINY.to_dict(), step=2)["focus"]["forecast"]
    assert [(r["points"], r["weights"], r["history_steps"]) for r in f2["weights"]] == \
        [(2, [1.5, -0.5], [1, 0]), (1, [0.9], [1])]
    text = format_report(inspect_plan(plan, TINY.to_dict(), step=4))
    assert "  block 0 attn  F3  w = [+3.000, -3.000, +1.000] on steps [3, 1, 0]" in text
    assert "  block 2 attn  F2  w = [+0.700, +0.300] on steps [3, 2]" in text
    assert "forecast   4 branches (F2 x3, F3 x1) read 9 history tensors" in text
    assert "    0  forecast(3)   forecast(2)" in text
    assert "forecast" not in inspect_plan(plan, TINY.to_dict(), step=0)["focus"]


def test_many_forecast_branches_share_lines():
    cfg = make_config("DiT-S/2", input_size=8, depth=8, hidden_size=32, num_heads=2, in_channels=2,
                      num_classes=5, learn_sigma=True)
    plan = make_plan("taylor:3:2", cfg, SamplerSettings(num_steps=8, batch=1, resolution=8))
    info = inspect_plan(plan, cfg.to_dict(), step=7)  # F3 from steps 6, 3, 0
    assert len(info["focus"]["forecast"]["weights"]) == 16
    w = plan.weights[7][(0, "attn")]
    line = f"  {'blocks 0-7 attn+mlp':<22}F3  w = [{', '.join(f'{x:+.3f}' for x in w)}] on steps [6, 3, 0]"
    text = format_report(info)
    assert line in text and "  block 0 attn" not in text


def test_nothing_forecast_related_for_plans_without_forecasts():
    plan = make_plan("fora:3", TINY, SamplerSettings(num_steps=7, batch=1, resolution=8))
    info = inspect_plan(plan, TINY.to_dict(), step=1)
    text = format_report(info)
    assert info["action_counts"] == {"compute": 18, "reuse": 24, "partial": 0}
    assert info["forecast_counts"] == {} and "forecast" not in info["focus"]
    assert "forecast" not in text and "cache mem" not in text and "history" not in text
    assert info["memory"]["history"]["count"] == 0 and info["memory"]["bytes"] == plan.cache_bytes(D)
    assert [e[1] for e in legend_entries(plan)] == ["compute", "reuse", "partial (shade: k/N)"]
    dot = variant_dot(plan, plan.variants()[1], "v1")
    assert "forecast" not in dot and dot.count('"in:') == 2 * 6


# ---- pictures -------------------------------------------------------------------------


def test_heatmap_forecast_cells_and_legend(tmp_path):
    plan = _mixed()
    files = write_plan_pictures(plan, tmp_path)
    img = Image.open(files[0]).convert("RGB")
    lay = heatmap_layout(plan)
    seen = {}
    for step, recipe in enumerate(plan.recipes):
        for block, branch, action in recipe.items():
            px = img.getpixel(lay.cell_center(step, block, branch))
            assert px == action_color(action, N)
            if action.kind == "forecast":
                seen[action.points] = px
    # F1 light ... F4 dark on one purple ramp; F2 and F3 by their thirds
    assert seen[1] == FORECAST_LIGHT_RGB
    assert seen[2] == tuple(round(lo + (hi - lo) / 3) for lo, hi in zip(FORECAST_LIGHT_RGB, FORECAST_DARK_RGB))
    assert seen[3] == tuple(round(lo + (hi - lo) * 2 / 3) for lo, hi in zip(FORECAST_LIGHT_RGB, FORECAST_DARK_RGB))
    assert action_color(forecast(4), N) == FORECAST_DARK_RGB
    assert img.getpixel(lay.cell_center(4, 0, "attn")) == seen[3] != img.getpixel(lay.cell_center(4, 0, "mlp"))
    others = {COMPUTE_RGB, REUSE_RGB} | {action_color(partial(range(k)), N) for k in range(1, N + 1)}
    assert not others & {action_color(forecast(p), N) for p in range(1, 5)}
    others |= {action_color(dynamic(k), N) for k in range(1, N + 1)} | {PARTIAL_LIGHT_RGB, PARTIAL_DARK_RGB}
    assert not others & {action_color(forecast(p), N) for p in range(1, 5)}
    # Legend: what the plan uses, forecast entries last, each swatch drawn in its colour with text beside it.
    entries = legend_entries(plan)
    assert [t for _, t in entries] == ["compute", "reuse", "partial k=3/16", "dynamic k=4/16",
                                       "forecast F1 (1 point)", "forecast F2 (2 points)", "forecast F3 (3 points)"]
    assert [c for c, t in entries if t.startswith("forecast")] == [seen[1], seen[2], seen[3]]
    for i, (color, _) in enumerate(entries):
        assert img.getpixel(lay.legend_swatch_center(i)) == color
        x0, y0, x1, y1 = lay.legend_swatch_box(i)
        text_px = [img.getpixel((x, y)) for x in range(x1 + 4, x1 + 60) for y in range(y0, y1)]
        assert any(p != (255, 255, 255) for p in text_px)  # the label is drawn
    assert img.size[1] >= lay.legend_swatch_box(len(entries) - 1)[3]
    taylor = make_plan("taylor:3", TINY, SamplerSettings(num_steps=6, batch=1, resolution=8))
    assert [t for _, t in legend_entries(taylor)] == ["compute", "reuse", "forecast F2 (2 points)"]


def test_dot_labels_forecast_branches():
    plan = _mixed()
    dot = variant_dot(plan, plan.variants()[2], "v2")  # F3 F2 | R F2 | F2 D4
    assert 'label="attn\\nforecast F3"' in dot and 'label="mlp\\nforecast F2"' in dot
    for name in ("cache.0.attn", "cache.0.attn.h1", "cache.0.attn.h2", "cache.2.attn.h1"):
        assert f'"in:{name}" -> b{name.split(".")[1]}_{name.split(".")[2]} [style=dashed]' in dot
    assert '"in:cache.0.attn.h3"' not in dot
    assert dot.count('"in:forecast.w" -> ') == 4 and 'label="forecast.w (9 floats, per step)"' in dot
    f3 = "#" + "".join(f"{c:02x}" for c in action_color(forecast(3), N))
    assert f'b0_attn [shape=box, style=filled, fillcolor="{f3}"' in dot
