"""The dynamic(k) action in the plan model: JSON, validation, cache I/O names (with the
branch-input caches `cache.L.B.in`), FLOPs, and the inspection views that render actions."""
import json

import pytest

from tcgraph.errors import TcgraphError
from tcgraph.plan import branch_flops, plan_flops
from tcgraph.plan.plan import COMPUTE, REUSE, Action, Plan, Recipe, dynamic, partial
from tcgraph.sampling import SamplerSettings
from tcgraph.names import BRANCHES

N = 16
FULL = Recipe.uniform(3, COMPUTE, BRANCHES)
DYN = Recipe(((dynamic(3), REUSE), (COMPUTE, dynamic(N)), (REUSE, REUSE)), BRANCHES)


def settings(steps):
    return SamplerSettings(num_steps=steps, batch=2, cfg_scale=2.0, resolution=8)


def plan(*recipes):
    return Plan("dyn", settings(len(recipes)), tuple(recipes), N)


def test_action_basics():
    a = dynamic(12)
    assert a == Action("dynamic", size=12) and a.k == 12 and partial([1, 4]).k == 2 and COMPUTE.k is None
    assert a.reads_cache and a.computes and a.short() == "D12" and partial([1]).short() == "P1"
    assert DYN.short() == "D3R CD16 RR"
    assert DYN.input_reads() == [(0, "attn"), (1, "mlp")] and DYN.reads() == [(0, "attn"), (0, "mlp"), (1, "mlp"),
                                                                               (2, "attn"), (2, "mlp")]
    for bad in (lambda: Action("dynamic"), lambda: Action("dynamic", (1, 2)), lambda: Action("partial", (1,), 1),
                lambda: Action("compute", size=2), lambda: Action("dynamic", size=2.5),
                lambda: Action("dynamic", size=True)):
        with pytest.raises(TcgraphError):
            bad()


def test_json_round_trip():
    p = plan(FULL, DYN, DYN, FULL, DYN)
    text = p.to_json()
    back = Plan.from_json(text)
    assert back == p and back.schedule() == ["v0", "v1", "v1", "v0", "v1"]
    assert json.loads(text)["variants"]["v1"] == [[{"dynamic": 3}, "reuse"], ["compute", {"dynamic": 16}],
                                                   ["reuse", "reuse"]]
    for bad in ({"dynamic": "3"}, {"dynamic": 2.0}, {"dynamic": True}, {"dynamic": 3, "partial": [1]}):
        with pytest.raises(TcgraphError, match="cannot read action"):
            Action.from_json(bad)


def test_io_names_with_input_caches():
    p = plan(FULL, DYN)
    full_in, full_out = p.variant_io(FULL)
    assert full_in == ["x", "t", "y"]
    assert full_out == ["out", "cache.0.attn", "cache.0.attn.in", "cache.0.mlp", "cache.1.mlp", "cache.1.mlp.in",
                        "cache.2.attn", "cache.2.mlp"]
    ins, outs = p.variant_io(DYN)
    assert ins == ["x", "t", "y", "cache.0.attn", "cache.0.attn.in", "cache.0.mlp", "cache.1.mlp", "cache.1.mlp.in",
                   "cache.2.attn", "cache.2.mlp"]
    assert outs == ["out", "cache.0.attn", "cache.0.attn.in", "cache.1.mlp", "cache.1.mlp.in"]
    assert p.input_cache_keys() == [(0, "attn"), (1, "mlp")] and p.input_writes(DYN) == [(0, "attn"), (1, "mlp")]
    assert p.cache_names() == full_out[1:]
    # A step that computes block 1's attention (not dynamic anywhere) writes no `.in` for it.
    assert p.input_writes(FULL) == [(0, "attn"), (1, "mlp")]


def test_validate_refuses_out_of_range_k_and_mixing_with_partial():
    for k in (0, -1, N + 1):
        with pytest.raises(TcgraphError, match=f"k={k} out of range 1..{N}"):
            plan(FULL, Recipe(((dynamic(k), COMPUTE),) * 3, BRANCHES))
    plan(FULL, Recipe(((dynamic(1), dynamic(N)),) * 3, BRANCHES))  # the bounds themselves are fine
    with pytest.raises(TcgraphError, match="no earlier step computed"):
        plan(Recipe(((dynamic(2), COMPUTE),) * 3, BRANCHES), FULL)
    with pytest.raises(TcgraphError, match="partial at some steps and dynamic"):
        plan(FULL, Recipe(((dynamic(2), COMPUTE),) * 3, BRANCHES), Recipe(((partial([1]), COMPUTE),) * 3, BRANCHES))
    plan(FULL, Recipe(((dynamic(2), partial([3])),) * 3, BRANCHES))  # different branches may differ


def test_flops_dynamic_is_partial_plus_score(tiny_config):
    n, d = tiny_config.num_tokens, tiny_config.hidden_size
    for br in ("attn", "mlp"):
        for k in (1, 5, n):
            assert branch_flops(tiny_config, br, dynamic(k)) == branch_flops(tiny_config, br, partial(range(k))) + 2 * n * d
        assert 0 < branch_flops(tiny_config, br, dynamic(4)) < branch_flops(tiny_config, br, COMPUTE)
    f = plan_flops(tiny_config, plan(FULL, DYN))
    assert 1.0 < f["predicted_speedup"] < 2.0


def test_inspection_renders_dynamic(tiny_config, tmp_path):
    from tcgraph.inspection import format_report, inspect_plan
    from tcgraph.inspection.pictures import (
        action_color,
        variant_dot,
        write_plan_pictures,
    )
    from tcgraph.inspection.report import block_view

    mixed = Recipe(((dynamic(3), partial([1, 2])), (COMPUTE, dynamic(N)), (REUSE, REUSE)), BRANCHES)
    p = plan(FULL, mixed, DYN)
    info = inspect_plan(p, tiny_config.to_dict(), variant="v1")
    assert info["action_counts"] == {"compute": 8, "reuse": 5, "partial": 1, "dynamic": 4}
    assert info["variants"][1]["dynamic"] == 2 and info["variants"][1]["partial"] == 1
    assert block_view(mixed, N)[0] == {"block": 0, "attn": "dynamic(3)", "mlp": "partial(2)", "mlp_tokens": [1, 2]}
    text = format_report(info)
    assert "dynamic 4" in text and "dynamic(16)" in text
    assert action_color(dynamic(5), N) == action_color(partial(range(5)), N) != action_color(dynamic(12), N)
    dot = variant_dot(p, mixed, "v1")
    assert "dynamic k=3" in dot and '"in:cache.0.attn.in"' in dot and '"out:cache.1.mlp.in"' in dot
    assert '"in:cache.0.mlp.in"' not in dot
    written = write_plan_pictures(p, tmp_path)
    assert any(w.name == "schedule_heatmap.png" for w in written) and any(w.name == "token_masks.png" for w in written)
