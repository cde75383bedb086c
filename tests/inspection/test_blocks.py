"""The block table (tcgraph.export.blocks): what a manifest records of where a model's blocks are,
and inspection by it, whatever the model calls its modules.

- the manifest records each model's table; a family's old folders (without one) are read with the
  table its graphs record;
- a diffusers DiT (`transformer_blocks.<l>.attn1`, `ff`) and the two-stream toy (`double_blocks`,
  `single_blocks`, tests/models/two_stream.py) are inspected as the official DiT is: every (block,
  branch) unit of a full variant costs what the plan's measured cost table says, and a variant that
  reuses every branch lost exactly those units;
- a folder without the table inspects exactly as the code before the table did;
- inspection and export name no family's modules (their string literals, checked with `ast`).
"""
from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import tcgraph
from tcgraph import api
from tcgraph.export.artifact import load_artifact
from tcgraph.export.blocks import GRAPH_ADAPTER, GRAPH_BLOCKS, BlockTable, old_manifest_table, variants_block_table
from tcgraph.inspection import diff_graphs, format_report, heatmap_layout, inspect_artifact, write_pictures
from tcgraph.inspection.graph import unit_name
from tcgraph.inspection.pictures import BACKGROUND_RGB, COMPUTE_RGB
from tcgraph.plan import make_plan
from tcgraph.sampling import SamplerSettings
from tests.inspection.artifacts import STEPS, graph_of

TINY_DIFFUSERS = dict(num_attention_heads=2, attention_head_dim=16, in_channels=2, out_channels=4, num_layers=3,
                      sample_size=8, patch_size=2, num_embeds_ada_norm=5)  # the official tiny DiT's sizes


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn anew (std 0.05; diffusers zero-initialises gates); buffers kept."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def transform(model, out: Path, settings: SamplerSettings) -> Path:
    return api.transform(model, make_plan("fora:2", model.config, settings), out, progress=False, check=False)


@pytest.fixture(scope="module")
def diffusers_dit(tmp_path_factory):
    """fora:2 of a diffusers DiTTransformer2DModel of the official tiny DiT's sizes (`fora2`'s settings)."""
    pytest.importorskip("diffusers")
    from diffusers import DiTTransformer2DModel

    from tcgraph.models.diffusers.dit import DiffusersDiT

    model = DiffusersDiT(randomized(DiTTransformer2DModel(**TINY_DIFFUSERS), seed=1)).eval()
    s = SamplerSettings(num_steps=STEPS, cfg_scale=2.0, batch=1, resolution=model.config.input_size)
    return transform(model, tmp_path_factory.mktemp("blocks") / "diffusers", s)


@pytest.fixture(scope="module")
def toy_family():
    from tests.models.two_stream import registered

    with registered():
        yield


@pytest.fixture(scope="module")
def toy(toy_family, tmp_path_factory):
    """fora:2 of the two-stream toy: blocks 0-1 double (attn over both streams, mlp, mlp_text), 2-3 single."""
    from tests.models.two_stream import build, toy_config

    model = randomized(build(toy_config(depth=4)), seed=7)
    s = SamplerSettings(num_steps=STEPS, cfg_scale=2.0, batch=1, resolution=model.config.input_size, text_length=5)
    return transform(model, tmp_path_factory.mktemp("blocks") / "toy", s)


@pytest.fixture(params=["official", "diffusers", "toy"])
def artifact(request, fora2):
    return fora2 if request.param == "official" else request.getfixturevalue(
        {"diffusers": "diffusers_dit", "toy": "toy"}[request.param])


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _without_table(root: Path, dst: Path) -> Path:
    """A copy of `root` whose manifest lacks the block table, as folders written before it (the
    manifest is not among the hashed files)."""
    shutil.copytree(root, dst)
    manifest = _manifest(dst)
    del manifest["blocks"]
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


def _units(root: Path, vid: str) -> dict[str, tuple[int, int]]:
    """{unit: (nodes, FLOPs)} of a variant's node table."""
    units: dict[str, tuple[int, int]] = {}
    for n in graph_of(root, vid).nodes:
        nodes, flops = units.get(n.unit, (0, 0))
        units[n.unit] = (nodes + 1, flops + n.flops)
    return units


#################################################################################
#                          The table in the manifest                            #
#################################################################################


def test_the_manifest_records_each_models_blocks(fora2, diffusers_dit, toy):
    official = _manifest(fora2)["blocks"]
    assert official == {"kinds": [{"name": "block", "container": "blocks", "count": 3, "branches": [
        {"name": "attn", "module": "attn", "norms": ["norm1"]}, {"name": "mlp", "module": "mlp", "norms": ["norm2"]}]}],
        "top": {"before": ["x_embedder", "t_embedder", "y_embedder"], "after": ["final_layer"]}}
    diffusers = _manifest(diffusers_dit)["blocks"]
    assert [(k["container"], k["count"], [(b["name"], b["module"], b["norms"]) for b in k["branches"]])
            for k in diffusers["kinds"]] == [("transformer_blocks", 3, [("attn", "attn1", ["norm1.norm"]),
                                                                          ("mlp", "ff", ["norm3"])])]
    assert diffusers["top"] == {"before": ["pos_embed"], "after": ["proj_out_1", "norm_out", "proj_out_2"]}
    two = _manifest(toy)["blocks"]
    assert [(k["name"], k["container"], k["count"], [(b["name"], b["module"], b["norms"]) for b in k["branches"]])
            for k in two["kinds"]] == [
        ("double", "double_blocks", 2, [("attn", "attn", ["norm1_text", "norm1"]), ("mlp", "mlp", ["norm2"]),
                                        ("mlp_text", "mlp_text", ["norm2_text"])]),
        ("single", "single_blocks", 2, [("attn", "attn", ["norm"]), ("mlp", "mlp", ["norm"])])]
    table = load_artifact(toy).blocks  # blocks numbered across kinds: single_blocks.1 is block 3
    assert (table.block_of("double_blocks.1.attn.qkv.weight"), table.block_of("single_blocks.1.mlp.fc1.weight"),
            table.block_of("cache.3.mlp"), table.block_of("single_blocks.2.mlp.fc1.weight")) == (1, 3, 3, None)
    for root in (fora2, diffusers_dit, toy):
        assert load_artifact(root).blocks == BlockTable.from_dict(_manifest(root)["blocks"], "m", "")


def test_old_folders_are_read_with_the_table_their_familys_graphs_record(fora2, diffusers_dit):
    assert old_manifest_table("official", 3) == load_artifact(fora2).blocks
    assert old_manifest_table("diffusers", 3) == load_artifact(diffusers_dit).blocks
    pytest.importorskip("diffusers")
    from diffusers import PixArtTransformer2DModel

    from tcgraph.compile import build_variants
    from tcgraph.models.diffusers.pixart import DiffusersPixArt

    pixart = DiffusersPixArt(randomized(PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=2, out_channels=4, num_layers=2, sample_size=8,
        patch_size=2, caption_channels=24, cross_attention_dim=32, use_additional_conditions=False), seed=2))
    s = SamplerSettings(num_steps=2, cfg_scale=2.0, batch=1, resolution=8, text_length=7)
    variants = build_variants(pixart, make_plan("full", pixart.config, s), check=False)
    assert variants_block_table(variants) == old_manifest_table("pixart", 2)
    assert old_manifest_table("two-stream-toy", 4) is None  # a family added later always records its table


def test_the_table_module_imports_no_torch():
    """`tcgraph inspect` reads the table: its module, loaded alone in a fresh interpreter, imports
    neither torch nor onnx (the package `tcgraph.export` around it still does)."""
    code = ("import importlib.util, json, sys\n"
            "spec = importlib.util.spec_from_file_location('blocks_alone', sys.argv[1])\n"
            "module = sys.modules['blocks_alone'] = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(module)\n"
            "print(json.dumps([module.old_manifest_table('diffusers', 28).depth,\n"
            "                  sorted(m for m in ('torch', 'onnx', 'numpy') if m in sys.modules)]))\n")
    path = Path(tcgraph.__file__).parent / "export" / "blocks.py"
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60,
                          cwd=Path(tcgraph.__file__).parents[1])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [28, []]


def test_the_graph_meta_it_reads_is_what_capture_writes():
    from tcgraph.passes.meta import META_ADAPTER, META_BLOCKS

    assert (GRAPH_ADAPTER, GRAPH_BLOCKS) == (META_ADAPTER, META_BLOCKS)


#################################################################################
#                         Nodes to blocks and branches                          #
#################################################################################


def test_every_branch_unit_costs_what_the_cost_table_says(artifact):
    """The full variant's (block, branch) units are exactly the plan's branches, each with the FLOPs
    the plan's measured cost table gives that branch of that block's kind; no product is left to
    the catch-all unit. A variant that reuses every branch lost exactly those units."""
    art = load_artifact(artifact)
    costs = art.extra["costs"]
    layout = art.plan.block_layout().branches()
    units = _units(artifact, "v0")
    want = {unit_name(l, br): costs["kinds"][costs["blocks"][l]][br]["full"]
            for l in range(len(layout)) for br in layout[l]}
    assert {u: units[u][1] for u in units if u in want} == want and set(want) <= set(units)
    assert units.get("model", (0, 0))[1] == 0
    d = diff_graphs(graph_of(artifact, "v0"), graph_of(artifact, "v1"))
    removed = {u: x["flops"] for u, x in d["removed_by_unit"].items() if x["branch"] is not None}
    assert removed == want and d["flops_removed"] == sum(want.values()) and d["nodes_added"] == 0
    assert [(x["block"], x["branch"]) for x in d["removed_by_unit"].values() if x["branch"]] == \
        [(l, br) for l in range(len(layout)) for br in sorted(layout[l])]  # in block order, then by name


def test_a_diffusers_dit_inspects_as_its_official_twin(fora2, diffusers_dit):
    """Same sizes, same plan: the same branch FLOPs per block; the MLP units (diffusers' `ff` and its
    norm3, the official `mlp` and norm2) alike node for node; the attention units differ by the
    projections diffusers keeps apart (q, k, v: three products where the official DiT has one)."""
    official, diffusers = _units(fora2, "v0"), _units(diffusers_dit, "v0")
    for l in range(3):
        for br in ("attn", "mlp"):
            assert official[unit_name(l, br)][1] == diffusers[unit_name(l, br)][1] > 0
        assert official[unit_name(l, "mlp")] == diffusers[unit_name(l, "mlp")] == (11, 524288)
    matmuls = [sum(n.op_type == "MatMul" for n in graph_of(root, "v0").nodes if n.unit == unit_name(0, "attn"))
               for root in (fora2, diffusers_dit)]
    assert matmuls == [4, 6]  # (qkv | q, k, v), scores, mix, output projection
    assert {n.unit for n in graph_of(diffusers_dit, "v0").nodes if n.block is None} == \
        {"pos_embed", "proj_out_1", "norm_out", "proj_out_2", "model"}  # the top-level modules the table records
    text = format_report(inspect_artifact(diffusers_dit, step=1))
    assert "  - blocks 0-2 .attn        30 nodes each  327.68 kFLOP each" in text
    assert "  - blocks 0-2 .mlp         11 nodes each  524.29 kFLOP each" in text


def test_the_two_stream_toys_report_and_pictures(toy, tmp_path):
    """Blocks whose branches differ: a column per branch any block has, blank (or -) where a block has none."""
    plan = load_artifact(toy).plan
    lay = heatmap_layout(plan)
    assert lay.branches == ("attn", "mlp", "mlp_text")
    written = {p.name: p for p in write_pictures(toy, tmp_path)}
    img = Image.open(written["schedule_heatmap.png"]).convert("RGB")
    assert img.getpixel(lay.cell_center(0, 1, "mlp_text")) == COMPUTE_RGB  # a double block's text MLP
    assert img.getpixel(lay.cell_center(0, 3, "mlp_text")) == BACKGROUND_RGB  # a single block has none
    dot = written["variant_v0.dot"].read_text()
    assert "b1_mlp -> b1_mlp_text;" in dot and "b2_attn -> b2_mlp;" in dot and "b2_mlp_text" not in dot
    text = format_report(inspect_artifact(toy, step=1))
    assert "block  attn          mlp           mlp_text      " in text
    assert "    3  reuse         reuse         -             " in text
    assert "  - blocks 0-1 .mlp_text    11 nodes each   81.92 kFLOP each" in text  # its norm and modulation too
    assert "  - blocks 2-3 .mlp          5 nodes each  344.06 kFLOP each" in text  # the shared norm is the block's


#################################################################################
#                        Folders written before the table                       #
#################################################################################

# The official tiny DiT's fora:2 full variant as the code before the block table attributed it
# (tcgraph b3adaa6, this torch's ONNX exporter): {unit: (nodes, FLOPs)}.
BEFORE_V0 = {"x_embedder": (3, 16384), "model": (5, 0), "t_embedder": (10, 36864), "y_embedder": (1, 0),
             "final_layer": (9, 40960),
             **{f"blocks.{l}": (11 if l == 2 else 8, 24576) for l in range(3)},
             **{f"blocks.{l}.attn": (25, 327680) for l in range(3)},
             **{f"blocks.{l}.mlp": (11, 524288) for l in range(3)}}


@pytest.mark.parametrize("name", ["official", "diffusers"])
def test_a_folder_without_the_table_inspects_as_before(name, fora2, request, tmp_path):
    root = fora2 if name == "official" else request.getfixturevalue("diffusers_dit")
    old = _without_table(root, tmp_path / "old")
    assert load_artifact(old).blocks == load_artifact(root).blocks == old_manifest_table(name, 3)
    for vid in ("v0", "v1"):
        new_info, old_info = inspect_artifact(root, variant=vid), inspect_artifact(old, variant=vid)
        assert {**old_info, "path": None} == {**new_info, "path": None}
        assert format_report(old_info).splitlines()[1:] == format_report(new_info).splitlines()[1:]
    if name == "official":
        assert _units(old, "v0") == BEFORE_V0
        assert {u: x["nodes"] for u, x in inspect_artifact(old, step=1)["focus"]["diff"]["removed_by_unit"].items()} \
            == {f"blocks.{l}.{br}": n for l in range(3) for br, n in (("attn", 25), ("mlp", 11))}


#################################################################################
#                         No family's modules named                             #
#################################################################################

# Module names of the official DiT and diffusers' DiT and PixArt: inspection and export name none of
# them, except the table of the families whose old folders have none (`OLD_MANIFESTS`).
FAMILY_MODULES = re.compile(r"\b(?:x_embedder|t_embedder|y_embedder|final_layer|adaLN_modulation|transformer_blocks|"
                            r"attn1|attn2|norm1|norm2|norm3|norm_out|proj_out(?:_\d)?|pos_embed|adaln_single|"
                            r"caption_projection)\b")
BLOCK_PATTERNS = re.compile(r"\bblocks\\?\.|\(\?:blocks|blocks\|")  # `blocks.`, `blocks\.`, `(?:blocks|cache)`


def _code_strings(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every string literal of a module's code (f-string parts too); docstrings and
    the `OLD_MANIFESTS` table left out."""
    tree = ast.parse(path.read_text(), str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            skip.add(id(body[0].value))  # a docstring
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "OLD_MANIFESTS"
                                                for t in node.targets):
            skip.update(id(n) for n in ast.walk(node.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in skip]


def test_inspection_and_export_name_no_modules_of_a_family():
    root = Path(tcgraph.__file__).parent
    files = sorted((*(root / "inspection").glob("*.py"), *(root / "export").glob("*.py")))
    assert len(files) > 10
    found = [f"{f.relative_to(root)}:{line}: {text!r}" for f in files for line, text in _code_strings(f)
             if BLOCK_PATTERNS.search(text) or FAMILY_MODULES.search(text)]
    assert not found, "module names in code strings:\n" + "\n".join(found)
    # the check itself finds what the code before the block table had
    for before in ('r"^(?:blocks|cache)\\.(\\d+)\\."', '"x_embedder"', '"blocks."', 'f"blocks.{b}.{br}"'):
        assert any(BLOCK_PATTERNS.search(t) or FAMILY_MODULES.search(t)
                   for t in (n.value for n in ast.walk(ast.parse(before)) if isinstance(n, ast.Constant)))
