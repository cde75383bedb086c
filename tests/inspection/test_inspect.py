"""inspect_artifact / format_report on a real fora:2 artifact (tests/inspection/conftest.py): summary numbers, block view,
graph diff by stable node keys, focus options, errors, and the folder left untouched."""
from __future__ import annotations

import json
import shutil

import pytest

from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import load_artifact
from tcgraph.inspection import (
    diff_graphs,
    format_report,
    inspect_artifact,
    write_pictures,
)
from tcgraph.names import BRANCHES
from tcgraph.plan import plan_flops
from tcgraph.plan.plan import Plan
from tests.inspection.artifacts import STEPS, graph_of


@pytest.fixture(scope="module")
def plan(fora2):
    return Plan.from_dict(json.loads((fora2 / "plan.json").read_text()))


def _snapshot(root):
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def test_summary_matches_plan_json(fora2, plan):
    info = inspect_artifact(fora2)
    raw = json.loads((fora2 / "plan.json").read_text())
    counts = {"compute": 0, "reuse": 0, "partial": 0}
    for vid in raw["schedule"]:  # counted straight from the JSON, not through Plan
        for pair in raw["variants"][vid]:
            for a in pair:
                counts[a if isinstance(a, str) else "partial"] += 1
    assert info["action_counts"] == counts == {"compute": 12, "reuse": 12, "partial": 0}
    assert info["schedule"] == raw["schedule"] == ["v0", "v1", "v0", "v1"]
    assert info["schedule_compact"] == "v0 v1 v0 v1"
    assert info["settings"]["num_steps"] == STEPS and info["settings"]["model_batch"] == 2
    flops = plan_flops(load_artifact(fora2).model_config, plan)
    assert info["predicted_speedup"] == pytest.approx(flops["predicted_speedup"])
    v0, v1 = info["variants"]
    assert (v0["id"], v0["full"], v0["steps"], v0["compute"], len(v0["writes"])) == ("v0", True, [0, 2], 6, 6)
    assert (v1["id"], v1["full"], v1["steps"], v1["reuse"], len(v1["reads"])) == ("v1", False, [1, 3], 6, 6)
    assert v0["fraction"] == 1.0 and v1["fraction"] == pytest.approx(flops["fraction"]["v1"])
    assert info["weights"]["bytes"] == (fora2 / "variants" / "weights.bin").stat().st_size > 0
    assert info["engines"] == {"files": [], "backend": None, "settings": {}}
    assert info["full_variant"] == "v0" and info["full_variant_exists"]
    json.dumps(info, allow_nan=False)  # JSON-able as is


def test_onnx_flops_equal_plan_flops(fora2, plan):
    cfg = load_artifact(fora2).model_config
    flops = plan_flops(cfg, plan)["per_variant"]
    for vid in ("v0", "v1"):
        graph = graph_of(fora2, vid)
        # Matrix products and convolutions only, like the plan: equal up to rounding.
        assert graph.flops == pytest.approx(flops[vid], rel=0.02)


def test_diff_of_full_variant_with_itself_is_empty(fora2):
    g = graph_of(fora2, "v0")
    d = diff_graphs(g, g)
    assert d["nodes_added"] == d["nodes_removed"] == d["flops_removed"] == 0
    assert not (d["inputs_added"] or d["inputs_removed"] or d["outputs_added"] or d["outputs_removed"])
    focus = inspect_artifact(fora2, variant="v0")["focus"]
    assert focus["diff_base"] == "v0" and focus["diff"]["nodes_removed"] == 0 and focus["diff"]["nodes_added"] == 0


def test_cache_variant_diff_lists_exactly_the_reused_branches(fora2, plan):
    info = inspect_artifact(fora2, variant="v1")
    d = info["focus"]["diff"]
    reused = {(b, br) for b, br, a in plan.variants()[1].items() if a.kind == "reuse"}
    assert reused == {(b, br) for b in range(3) for br in BRANCHES}
    # Every removed node falls in a reused (block, branch), and every reused one lost nodes.
    assert {(n["block"], n["branch"]) for n in d["removed"]} == reused
    assert set(d["removed_by_unit"]) == {f"blocks.{b}.{br}" for b, br in reused}
    assert all(u["ops"].get("MatMul", 0) >= 2 for u in d["removed_by_unit"].values())
    assert d["nodes_added"] == 0
    assert sorted(d["inputs_added"]) == sorted(f"cache.{b}.{br}" for b, br in reused)
    assert sorted(d["outputs_removed"]) == sorted(f"cache.{b}.{br}" for b, br in reused)
    cfg = load_artifact(fora2).model_config
    f = plan_flops(cfg, plan)["per_variant"]
    assert d["flops_removed"] == pytest.approx(f["v0"] - f["v1"], rel=0.02)
    assert info["focus"]["graph"]["flops"] + d["flops_removed"] == info["focus"]["base_flops"]


def test_node_keys_survive_reexport_numbering(fora2):
    """The gate multiply and residual add of every block exist in both variants and match by key
    although their raw ONNX names differ."""
    g0 = graph_of(fora2, "v0")
    g1 = graph_of(fora2, "v1")
    k0, k1 = g0.by_key(), g1.by_key()
    common = set(k0) & set(k1)
    assert len(common) == len(g1.nodes)  # v1 is a strict subset of v0
    renamed = [k for k in common if k0[k].name != k1[k].name]
    assert renamed  # raw names do change between exports: the key is what matches them
    assert all(k0[k].op_type == k1[k].op_type for k in common)


def test_step_focus_and_errors(fora2):
    info = inspect_artifact(fora2, step=3)
    pos = info["focus"]["step"]
    assert info["focus"]["variant"] == "v1"
    assert (pos["last_full_step"], pos["steps_since_full"], pos["occurrence"], pos["run"]) == (2, 1, 2, [3, 3])
    assert [r["attn"] for r in info["focus"]["blocks"]] == ["reuse"] * 3
    with pytest.raises(TcgraphError, match=r"valid steps are 0\.\.3"):
        inspect_artifact(fora2, step=4)
    with pytest.raises(TcgraphError, match=r"not an integer; valid steps are 0\.\.3"):
        inspect_artifact(fora2, step="last")
    assert inspect_artifact(fora2, step="2")["focus"]["variant"] == "v0"  # CLI strings are fine
    with pytest.raises(TcgraphError, match="valid variants: v0, v1"):
        inspect_artifact(fora2, variant="v7")
    with pytest.raises(TcgraphError, match="runs variant v1"):
        inspect_artifact(fora2, variant="v0", step=1)


def test_format_report_sizes(fora2):
    text = format_report(inspect_artifact(fora2))
    lines = text.splitlines()
    assert len(lines) < 20 and "v0 v1 v0 v1" in text and "compute 12, reuse 12, partial 0" in text
    assert "onnx name" not in text  # no node table without a focus
    focused = format_report(inspect_artifact(fora2, variant="v0"))
    table = focused.split("onnx name", 1)[1].splitlines()[1:]
    assert len([ln for ln in table if ln.strip() and not ln.strip().startswith("…")]) == 40
    n_nodes = len(graph_of(fora2, "v0").nodes)
    assert f"… {n_nodes - 40} more nodes" in focused
    step_text = format_report(inspect_artifact(fora2, step=1))
    assert "step 1 of 0..3: runs v1" in step_text and "cache reads (inputs added): cache.0.attn" in step_text
    assert "- blocks 0-2 .mlp" in step_text and "nodes each" in step_text
    assert "onnx name" not in step_text  # the node table is for a variant focus only


def test_folder_facts_come_from_the_manifest(fora2):
    info = inspect_artifact(fora2)
    manifest = json.loads((fora2 / "manifest.json").read_text())
    assert info["model"] == {**manifest["model_config"], "source": "in-memory", "num_tokens": 16}
    assert info["tcgraph_version"] == manifest["tcgraph_version"]
    assert [v["file"] for v in info["variants"]] == [v["file"] for v in manifest["variants"]]
    assert info["weights"] == {"file": manifest["weights"]["file"], "bytes": manifest["weights"]["bytes"]}
    assert info["engines"] == {"files": [], "backend": None, "settings": {}}


def test_inconsistent_plan_is_refused_by_name(fora2, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fora2, copy)
    raw = json.loads((copy / "plan.json").read_text())
    raw["schedule"] = ["v0"] * STEPS  # v1 is exported but never scheduled
    (copy / "plan.json").write_text(json.dumps(raw))
    with pytest.raises(TcgraphError, match=r"plan.json: the variants are \['v0', 'v1'\], but the plan's schedule "
                                           r"runs \['v0'\]"):
        inspect_artifact(copy, verify=False)


def test_not_an_artifact_and_damaged_folders(fora2, tmp_path):
    for bad in (tmp_path / "nothing", tmp_path):
        with pytest.raises(TcgraphError) as expected:
            load_artifact(bad)
        with pytest.raises(TcgraphError) as got:
            inspect_artifact(bad)
        assert str(got.value) == str(expected.value)
    copy = tmp_path / "copy"
    shutil.copytree(fora2, copy)
    onnx_file = copy / "variants" / "v1.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-10])
    with pytest.raises(TcgraphError) as expected:
        load_artifact(copy)
    for call in (lambda: inspect_artifact(copy), lambda: write_pictures(copy, tmp_path / "pics")):
        with pytest.raises(TcgraphError) as got:
            call()
        assert str(got.value) == str(expected.value) and "hash mismatch" in str(got.value)


def test_inspect_never_writes_into_the_artifact(fora2, tmp_path):
    before = _snapshot(fora2)
    inspect_artifact(fora2, variant="v1")
    inspect_artifact(fora2, step=2)
    written = write_pictures(fora2, tmp_path / "pics")
    assert written and all(p.parent == tmp_path / "pics" for p in written)
    with pytest.raises(TcgraphError, match="inside the artifact folder"):
        write_pictures(fora2, fora2 / "pics")
    assert _snapshot(fora2) == before


def test_engines_folder_is_reported(fora2, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fora2, copy)
    (copy / "engines").mkdir()
    for vid in ("v0", "v1"):
        (copy / "engines" / f"{vid}.plan").write_bytes(b"engine")
    info = inspect_artifact(copy)
    assert info["engines"]["files"] == ["v0.plan", "v1.plan"] and info["engines"]["backend"] == "tensorrt"
    assert "engines    2 for tensorrt: v0.plan, v1.plan" in format_report(info)
    manifest = json.loads((copy / "manifest.json").read_text())  # the section `transform --backend trt` writes
    manifest["tensorrt"] = {"tensorrt_version": "10.9.0", "precision": "fp16", "weight_stripped": True,
                            "device": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    text = format_report(inspect_artifact(copy, verify=False))
    assert ("TensorRT 10.9.0, fp16, built for NVIDIA H100 80GB HBM3 (sm 9.0), weight-stripped (refitted from "
            "weights.bin on load)") in text
    with pytest.raises(TcgraphError, match="no focus data"):
        format_report(info, variant="v1")


def test_the_cli_inspects_without_torch(fora2, tmp_path, monkeypatch):
    """`tcgraph inspect` (summary, a variant's focus, --json, pictures) in a fresh interpreter imports
    no torch and prints what the API's `inspect` and `format_inspect` give."""
    from tcgraph import api, cli_table
    from tests.test_cli_start import probe

    monkeypatch.setenv("TCGRAPH_CACHE_DIR", str(tmp_path / "cache"))
    cli_table.table()  # the parser's table, cached: a cold cache would read the planner registry (torch)
    pictures = tmp_path / "pictures"
    argvs = [["inspect", str(fora2)], ["inspect", str(fora2), "--variant", "v1"], ["inspect", str(fora2), "--json"],
             ["inspect", str(fora2), "--out", str(pictures)], ["inspect", str(fora2), "--variant", "v9"]]
    found = probe(argvs, tmp_path / "cache")
    assert found["imported"] == ["onnx"]  # the variant graphs are read with onnx; never torch
    summary, focus, as_json, drawn, unknown = found["results"]
    assert summary["code"] == 0 and summary["out"].strip() == api.format_inspect(api.inspect(fora2)).strip()
    assert focus["out"].strip() == api.format_inspect(api.inspect(fora2, variant="v1")).strip()
    assert json.loads(as_json["out"]) == json.loads(json.dumps(api.inspect(fora2)))
    assert drawn["code"] == 0 and (pictures / "schedule_heatmap.png").is_file()
    assert unknown["code"] == 2 and "v9" in unknown["err"] and "Traceback" not in unknown["err"]


def test_a_learned_plan_shows_its_held_out_psnr_and_floor():
    from tcgraph.inspection.text import _learned_line

    params = {"method": "learning-to-cache, replaced by the fixed plan taylor:4:2", "held_out_psnr": 48.31,
              "min_psnr": 45.0}
    assert _learned_line(params) == ("learned    learning-to-cache, replaced by the fixed plan taylor:4:2, "
                                     "held-out PSNR 48.3 dB (--min-psnr 45.0)")
    del params["min_psnr"]
    assert _learned_line(params).endswith(", held-out PSNR 48.3 dB")
    assert _learned_line({"interval": 2}) is None  # a fixed plan
