"""Pictures and plan-level views from Plan objects alone (token plans have no export yet):
heatmap pixels, token-mask pixels, DOT text, block view, and the no-full-variant case."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from PIL import Image

from tcgraph.errors import TcgraphError
from tcgraph.inspection import (
    action_color,
    block_view,
    format_report,
    full_variant,
    heatmap_layout,
    inspect_plan,
    mask_layout,
    variant_dot,
    write_plan_pictures,
)
from tcgraph.inspection.pictures import COMPUTE_RGB, KEPT_RGB, REUSE_RGB, REUSED_RGB
from tcgraph.models.official.dit import make_config
from tcgraph.plan import make_plan
from tcgraph.sampling import SamplerSettings
from tcgraph.plan.plan import COMPUTE, REUSE, Plan, Recipe, partial
from tcgraph.names import BRANCHES

TINY = make_config("DiT-S/2", input_size=8, depth=3, hidden_size=32, num_heads=2, in_channels=2,
                   num_classes=5, learn_sigma=True)
N = TINY.num_tokens  # 16 tokens on a 4 x 4 patch grid


def _token_plan() -> Plan:
    s = SamplerSettings(num_steps=5, batch=1, resolution=TINY.input_size)
    full = Recipe.uniform(TINY.depth, COMPUTE, BRANCHES)
    a = Recipe(((partial([0, 1, 5]), REUSE), (COMPUTE, partial(range(8))), (REUSE, REUSE)), BRANCHES)
    b = Recipe(((partial([15]), partial([2, 3])), (REUSE, REUSE), (COMPUTE, partial(range(12)))), BRANCHES)
    return Plan("hand-tokens", s, (full, a, b, a, full), N)


def test_block_view_and_focus_of_a_token_plan():
    plan = _token_plan()
    rows = block_view(plan.variants()[1], N)
    assert rows[0] == {"block": 0, "attn": "partial(3)", "attn_tokens": [0, 1, 5], "mlp": "reuse"}
    assert rows[1] == {"block": 1, "attn": "compute", "mlp": "partial(8)", "mlp_tokens": list(range(8))}
    info = inspect_plan(plan, TINY.to_dict(), step=3)
    assert info["focus"]["variant"] == "v1" and info["focus"]["step"]["occurrence"] == 2
    assert info["action_counts"] == {"compute": 15, "reuse": 8, "partial": 7}
    text = format_report(info)
    assert "block 0 attn: keeps tokens 0-1,5 (3)" in text
    assert "    ##..\n    .#..\n    ....\n    ...." in text  # the mask on the 4x4 patch grid
    json.dumps(info, allow_nan=False)


def test_no_full_variant_falls_back_to_the_costliest():
    """A valid plan's first step computes everything, so a plan always has a full variant today;
    merged variants (max_variants) may lose it. The fallback is checked on stand-ins."""
    heavy = Recipe(((COMPUTE, COMPUTE), (COMPUTE, COMPUTE), (COMPUTE, partial(range(4)))), BRANCHES)
    light = Recipe(((REUSE, REUSE), (REUSE, REUSE), (REUSE, partial(range(2)))), BRANCHES)
    stand_in = SimpleNamespace(variants=lambda: [light, heavy], num_tokens=N)
    assert full_variant(stand_in) == ("v1", False)  # by computed-branch count
    assert full_variant(stand_in, {"per_variant": {"v0": 5, "v1": 9}}) == ("v1", False)
    info = inspect_plan(_token_plan(), TINY.to_dict())
    assert (info["full_variant"], info["full_variant_exists"]) == ("v0", True)
    info.update(full_variant="v1", full_variant_exists=False)
    assert "no variant computes everything; diffs are against v1 (the most FLOPs)" in format_report(info)


def test_heatmap_pixels_match_actions(tmp_path):
    for plan in (_token_plan(), make_plan("fora:3", TINY, SamplerSettings(num_steps=7, batch=1,
                                                                            resolution=TINY.input_size))):
        files = write_plan_pictures(plan, tmp_path / plan.planner.replace(":", ""))
        img = Image.open(files[0]).convert("RGB")
        lay = heatmap_layout(plan)
        kinds = set()
        for step, recipe in enumerate(plan.recipes):
            for block, branch, action in recipe.items():
                assert img.getpixel(lay.cell_center(step, block, branch)) == action_color(action, N)
                kinds.add(action.kind)
        assert img.getpixel(lay.cell_center(0, 0, "attn")) == COMPUTE_RGB
    # Partial shades differ by k and lie between the light and dark ends; reuse is its own colour.
    assert action_color(partial(range(2)), N) != action_color(partial(range(12)), N)
    assert REUSE_RGB not in {action_color(partial(range(k)), N) for k in range(1, N + 1)}
    assert kinds == {"compute", "reuse"}  # fora:3, last plan checked


def test_token_mask_pixels_match_partial_indices(tmp_path):
    plan = _token_plan()
    files = write_plan_pictures(plan, tmp_path)
    masks = next(p for p in files if p.name == "token_masks.png")
    img = Image.open(masks).convert("RGB")
    lay = mask_layout(plan)
    assert lay.steps == (1, 2, 3)
    checked = 0
    for step in lay.steps:
        for block, branch, action in plan.recipes[step].items():
            for token in range(N):
                if action.kind == "partial":
                    want = KEPT_RGB if token in action.indices else REUSED_RGB
                else:
                    want = KEPT_RGB if action.kind == "compute" else REUSED_RGB
                assert img.getpixel(lay.token_center(step, block, branch, token)) == want
                checked += 1
    assert checked == 3 * TINY.depth * len(BRANCHES) * N
    assert mask_layout(make_plan("fora:2", TINY, SamplerSettings(num_steps=4, batch=1, resolution=8))) is None


def test_variant_dot_shows_cache_reads_and_writes(tmp_path):
    plan = _token_plan()
    dot = variant_dot(plan, plan.variants()[1], "v1")
    reads = [f"cache.{b}.{br}" for b, br in plan.variants()[1].reads()]
    writes = [f"cache.{b}.{br}" for b, br in plan.writes(plan.variants()[1])]
    for name in reads:
        assert f'"in:{name}" -> b{name.split(".")[1]}_{name.split(".")[2]}' in dot
    for name in writes:
        assert f'-> "out:{name}"' in dot
    assert dot.count('"in:') == 2 * len(reads) and dot.count('"out:') == 2 * len(writes)
    assert "partial k=3" in dot and dot.startswith('digraph "v1"') and dot.rstrip().endswith("}")
    files = write_plan_pictures(plan, tmp_path, variant="v1")
    assert [p.name for p in files][:3] == ["schedule_heatmap.png", "token_masks.png", "variant_v1.dot"]
    with pytest.raises(TcgraphError, match="valid variants: v0, v1, v2"):
        write_plan_pictures(plan, tmp_path, variant="v9")


def test_dot_is_rendered_where_graphviz_exists(tmp_path, monkeypatch):
    """A stand-in `dot` on PATH (graphviz itself is not installed here) shows the render call."""
    fake = tmp_path / "bin" / "dot"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\n# dot -Tsvg IN -o OUT\nprintf "<svg/>" > "$4"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    files = write_plan_pictures(_token_plan(), tmp_path / "out", variant="v0")
    assert [p.name for p in files][-2:] == ["variant_v0.dot", "variant_v0.svg"]
    assert (tmp_path / "out" / "variant_v0.svg").read_text() == "<svg/>"
