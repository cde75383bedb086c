"""write_artifact / load_artifact: complete folders or none, damaged or inconsistent folders
refused, and the loaded artifact typed (Plan, DiTConfig, VariantSpec, ParameterSpec)."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from tests.export.tiny_variants import DEPTH, dit_variants, tiny_dit

import tcgraph.export.onnx as export_onnx
from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import (
    SCHEMA_VERSION,
    Artifact,
    ParameterSpec,
    TensorSpec,
    VariantSpec,
    config_hash,
    load_artifact,
    write_artifact,
)
from tcgraph.export.blocks import old_manifest_table
from tcgraph.export.onnx import WEIGHTS_PATH, file_sha256
from tcgraph.export.weights import load_parameters
from tcgraph.models.official.dit import DiTConfig
from tcgraph.plan.plan import COMPUTE, REUSE, Plan, Recipe
from tcgraph.progress import Recorder
from tcgraph.sampling import SamplerSettings
from tcgraph.names import BRANCHES

FULL = Recipe.uniform(DEPTH, COMPUTE, BRANCHES)
REUSE_ATTN0 = Recipe(((REUSE, COMPUTE),) + FULL.actions[1:], BRANCHES)  # block 0 reuses its attention branch
# The tiny variants as the plan's variants: `fill` computes everything and writes cache.0.attn (v0),
# `reuse` reads it (v1). (`reuse` also writes a cache, which a real rewrite would not: the folder
# checks do not compare I/O with the plan.)
AS_PLAN = {"fill": "v0", "reuse": "v1", "full": "v0"}


def tiny_plan(recipes: tuple[Recipe, ...], num_tokens: int = 64) -> Plan:
    settings = SamplerSettings(num_steps=len(recipes), cfg_scale=1.0, batch=2, resolution=16)
    return Plan(planner="test", settings=settings, recipes=recipes, num_tokens=num_tokens)


PLAN = tiny_plan((FULL, REUSE_ATTN0, FULL, REUSE_ATTN0))  # schedule v0 v1 v0 v1


def variants(model, ids):
    """Tiny variants under the plan's ids (v0, v1)."""
    return [dataclasses.replace(v, id=AS_PLAN[v.id]) for v in dit_variants(model, ids)]


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_dit()


@pytest.fixture(scope="module")
def written(tmp_path_factory, model):
    """One artifact folder with the parameter map and programs, written once, and the progress
    it reported; tests that damage the folder work on copies."""
    out = tmp_path_factory.mktemp("built") / "art"
    recorder = Recorder()
    write_artifact(
        out, model_config=model.config, plan=PLAN, variants=variants(model, ("fill", "reuse")),
        extra={"note": "test", "model": "tiny", "flops": {"total": 1.0}}, state=model.state_dict(),
        progress=recorder,
    )
    return out, recorder


@pytest.fixture(scope="module")
def built(written):
    return written[0]


@pytest.fixture
def copy(built, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(built, dst)
    return dst


def _siblings(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def _edit_manifest(folder, edit):
    manifest = _manifest(folder)
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


#################################################################################
#                        The folder and its manifest                            #
#################################################################################


def test_folder_layout_and_manifest(built, model):
    m = _manifest(built)
    assert m["schema_version"] == SCHEMA_VERSION
    assert m["tcgraph_version"]
    assert m["model_config"] == model.config.to_dict()
    assert m["model_config_hash"] == config_hash(model.config.to_dict())
    assert m["plan"] == PLAN.to_dict() == json.loads((built / "plan.json").read_text())
    assert m["extra"] == {"note": "test", "model": "tiny", "flops": {"total": 1.0}}
    assert m["created"].endswith("+00:00")
    assert set(m) == {"schema_version", "tcgraph_version", "model_config", "model_config_hash", "plan", "variants",
                      "weights", "files", "created", "extra", "parameters", "programs"}
    # every file of the folder, manifest.json excepted, with its hash
    on_disk = sorted(p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file())
    assert sorted(m["files"]) == [f for f in on_disk if f != "manifest.json"]
    assert {"plan.json", WEIGHTS_PATH, "variants/v0.onnx", "variants/v1.onnx"} <= set(m["files"])
    assert m["programs"] == {"v0": "variants/v0.program.safetensors", "v1": "variants/v1.program.safetensors"}
    assert set(m["programs"].values()) <= set(m["files"])  # hashed like every other file
    for rel, sha in m["files"].items():
        assert file_sha256(built / rel) == sha
    assert m["weights"] == {"file": WEIGHTS_PATH, "bytes": (built / WEIGHTS_PATH).stat().st_size}
    assert _siblings(built) == []  # no temporary folder left next to it


def test_progress_phase(written):
    [(desc, total, notes)] = written[1].phases
    assert desc == "export" and total == 2 + 3 == len(notes)
    assert notes[0].startswith("verified variant v0") and notes[1].startswith("verified variant v1")
    assert notes[2:] == ["parameter map", "torch programs", "wrote 2 variants"]


def test_config_hash_is_canonical():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


#################################################################################
#                               The typed artifact                              #
#################################################################################


def test_loaded_artifact_is_typed(built, model):
    art = load_artifact(built)
    assert isinstance(art, Artifact) and art.root == built
    assert isinstance(art.plan, Plan) and art.plan == PLAN and art.plan.schedule() == ["v0", "v1", "v0", "v1"]
    assert isinstance(art.model_config, DiTConfig) and art.model_config == model.config
    assert art.model_config_hash == config_hash(model.config.to_dict())
    assert art.source_model == "tiny" and art.flops == {"total": 1.0} and art.tcgraph_version
    assert art.tensorrt is None  # no engines were built
    assert isinstance(art.variants, tuple) and all(isinstance(v, VariantSpec) for v in art.variants)
    assert art.variant_ids() == ["v0", "v1"]
    v0, v1 = art.variants
    assert v0.file == "variants/v0.onnx" and art.variant_path("v1") == built / "variants/v1.onnx"
    assert v1.input_names == ("x", "t", "y", "cache.0.attn") and v1.output_names == ("out", "cache.0.attn")
    x = v0.input("x")
    assert isinstance(x, TensorSpec) and x == TensorSpec("x", (2, 1, 16, 16), "float32")
    assert isinstance(x.shape, tuple) and v0.input("t").dtype == "int64"
    assert v1.input("cache.0.attn").shape == (2, 64, 128)
    assert [o.onnx_name for o in v1.outputs] == ["out", "cache.0.attn.new"]  # read and written: renamed in ONNX
    assert v1.outputs[0].max_abs_diff <= 1e-4 and v0.max_abs_diff <= 1e-4 and v0.opset >= 17
    assert v0.sha256 == file_sha256(built / v0.file) and "dit.pos_embed" in v0.external_initializers
    assert art.io_names() == {"v0": (["x", "t", "y"], ["out", "cache.0.attn"]),
                              "v1": (["x", "t", "y", "cache.0.attn"], ["out", "cache.0.attn"])}
    assert art.weights_path == built / WEIGHTS_PATH
    assert art.programs == {"v0": "variants/v0.program.safetensors", "v1": "variants/v1.program.safetensors"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        art.plan = None


def test_parameters_are_typed_and_load(built, model):
    art = load_artifact(built)
    assert isinstance(art.parameters, tuple) and all(isinstance(p, ParameterSpec) for p in art.parameters)
    state = model.state_dict()
    assert [p.name for p in art.parameters] == list(state)
    spec = next(p for p in art.parameters if p.name == "blocks.0.attn.qkv.weight")
    assert spec.shape == tuple(state[spec.name].shape) and spec.dtype == "float32" and spec.transposed
    for entries in (art.parameters, _manifest(built)["parameters"]):  # typed, or the manifest's map
        loaded = load_parameters(art.weights_path, entries)
        assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_unknown_variant_is_named(built):
    art = load_artifact(built)
    with pytest.raises(TcgraphError, match=r"unknown variant 'v9' in .*available variants: v0, v1"):
        art.variant("v9")
    with pytest.raises(TcgraphError, match="available variants: v0, v1"):
        art.variant_path("v9")
    with pytest.raises(TcgraphError, match="has no input 'cache.3.mlp'; its inputs are: x, t, y, cache.0.attn"):
        art.variant("v1").input("cache.3.mlp")


def test_file_refuses_paths_outside_the_folder(built):
    art = load_artifact(built)
    assert art.file("plan.json") == built / "plan.json"
    for bad in ("../elsewhere", "/etc/passwd", "variants/../../x"):
        with pytest.raises(TcgraphError, match="outside the artifact folder"):
            art.file(bad)


def test_links_out_of_the_folder_and_link_loops_name_their_cause(copy, tmp_path):
    """A file that is a link leaving the folder is named as such (not "the manifest is damaged"); a loop of
    links is one clear error, not a traceback; nothing of the folder changes."""
    outside = tmp_path / "plan-elsewhere.json"
    (copy / "plan.json").rename(outside)
    (copy / "plan.json").symlink_to(outside)
    with pytest.raises(TcgraphError, match=r"plan.json in .* is a link to .*plan-elsewhere.json, outside the artifact"):
        load_artifact(copy)
    (copy / "plan.json").unlink()
    (copy / "plan.json").symlink_to("plan.json")
    with pytest.raises(TcgraphError, match=r"plan.json in .* is a loop of symbolic links"):
        load_artifact(copy)


def test_copies_keep_the_artifact_unchanged(copy):
    _edit_manifest(copy, lambda m: m.update(tensorrt={"precision": "fp16", "engines": {}}))
    art = load_artifact(copy)
    art.tensorrt["precision"] = "fp32"
    art.programs["v0"] = "elsewhere"
    assert art.tensorrt == {"precision": "fp16", "engines": {}} and art.programs["v0"] == "variants/v0.program.safetensors"


def test_old_folder_without_programs_or_parameters(copy):
    def old(m):
        del m["programs"], m["parameters"]
    _edit_manifest(copy, old)
    art = load_artifact(copy)
    assert art.programs == {} and art.parameters is None


def test_graphs_not_made_by_capture_are_read_with_their_familys_block_table(built):
    """The tiny variants are plain fx traces, which record no block table: the manifest holds none and
    the folder is read, as one written before manifests held it, with its family's table."""
    assert "blocks" not in _manifest(built)
    blocks = load_artifact(built).blocks
    assert blocks == old_manifest_table("official", DEPTH)
    assert [(k.container, k.count) for k in blocks.kinds] == [("blocks", DEPTH)]


#################################################################################
#                           Damaged folders refused                             #
#################################################################################


def test_missing_file_is_named(copy):
    (copy / "variants/v1.onnx").unlink()
    with pytest.raises(TcgraphError, match=r"missing file: variants/v1.onnx .* re-run `tcgraph transform`"):
        load_artifact(copy)
    with pytest.raises(TcgraphError, match="missing file"):
        load_artifact(copy, verify_hashes=False)  # existence is checked even without hashes


def test_edited_byte_is_detected(copy):
    path = copy / WEIGHTS_PATH
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(TcgraphError, match=r"hash mismatch: variants/weights.bin .*the folder is damaged"):
        load_artifact(copy)
    load_artifact(copy, verify_hashes=False)  # the caller may skip the check


def test_truncated_file_is_detected(copy):
    path = copy / "variants/v0.onnx"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(TcgraphError, match=r"hash mismatch: variants/v0.onnx .*100 bytes"):
        load_artifact(copy)


def test_edited_program_is_detected(copy):
    (copy / "variants/v1.program.safetensors").write_bytes(b"not a program")
    with pytest.raises(TcgraphError, match=r"hash mismatch: variants/v1.program.safetensors"):
        load_artifact(copy)


def test_edited_plan_is_detected(copy):
    (copy / "plan.json").write_text(json.dumps({**PLAN.to_dict(), "planner": "edited"}))
    with pytest.raises(TcgraphError, match="hash mismatch: plan.json"):
        load_artifact(copy)


def test_edited_model_config_is_detected(copy):
    _edit_manifest(copy, lambda m: m["model_config"].update(depth=3))
    with pytest.raises(TcgraphError, match=r"manifest.json: model_config_hash .* does not match its model config.*"
                                           r"re-run `tcgraph transform`"):
        load_artifact(copy, verify_hashes=False)  # the manifest itself is not in the file hashes


def test_plan_for_another_model_is_refused(copy):
    def other_model(m):
        m["model_config"]["depth"] = 3
        m["model_config_hash"] = config_hash(m["model_config"])
    _edit_manifest(copy, other_model)
    with pytest.raises(TcgraphError, match=r"plan.json: the plan is for 2 blocks x 64 tokens, but the model config "
                                           r"has 3 blocks x 64 tokens.*re-run"):
        load_artifact(copy)


def test_model_config_that_is_not_a_dit_is_refused(copy):
    def foreign(m):
        m["model_config"] = {"name": "tiny"}
        m["model_config_hash"] = config_hash(m["model_config"])
    _edit_manifest(copy, foreign)
    with pytest.raises(TcgraphError, match=r"manifest.json: the model config is not one tcgraph can build"):
        load_artifact(copy)


def test_variants_other_than_the_schedule_are_refused(copy):
    _edit_manifest(copy, lambda m: m["variants"][1].update(id="v7"))
    with pytest.raises(TcgraphError, match=r"the variants are \['v0', 'v7'\], but the plan's schedule runs "
                                           r"\['v0', 'v1'\]"):
        load_artifact(copy)
    _edit_manifest(copy, lambda m: m["variants"].pop())
    with pytest.raises(TcgraphError, match=r"the variants are \['v0'\]"):
        load_artifact(copy)


def test_damaged_variant_entry_is_named(copy):
    _edit_manifest(copy, lambda m: m["variants"][0]["inputs"][0].update(shape="big"))
    with pytest.raises(TcgraphError, match=r"manifest.json: variant v0 input x shape is 'big', not a list"):
        load_artifact(copy)


@pytest.mark.parametrize("version", [0, -1, True, "1"])
def test_schema_version_must_be_a_positive_int(copy, version):
    _edit_manifest(copy, lambda m: m.update(schema_version=version))
    match = r"no integer schema_version" if isinstance(version, (bool, str)) else r"schemas start at 1"
    with pytest.raises(TcgraphError, match=match):
        load_artifact(copy)


def test_newer_schema_is_refused(copy):
    _edit_manifest(copy, lambda m: m.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(TcgraphError, match=r"written by a newer tcgraph.*upgrade tcgraph"):
        load_artifact(copy)


def test_unreadable_manifest_is_refused(copy):
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(TcgraphError, match=r"cannot read .*manifest.json"):
        load_artifact(copy)


def test_not_an_artifact_folder(tmp_path):
    msg = r"not a tcgraph artifact folder \(no manifest.json.*run `tcgraph transform`"
    with pytest.raises(TcgraphError, match=msg):
        load_artifact(tmp_path / "nowhere")
    with pytest.raises(TcgraphError, match=msg):
        load_artifact(tmp_path)  # a folder, but no manifest
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(TcgraphError, match=msg):
        load_artifact(tmp_path / "file.txt")


def test_extra_files_are_fine(copy):
    (copy / "notes.txt").write_text("mine")
    assert load_artifact(copy).variant_ids() == ["v0", "v1"]


def _with_table(edit):
    """A manifest edit that writes the family's block table, as `edit` changes it."""
    def apply(m):
        m["blocks"] = old_manifest_table("official", DEPTH).to_dict()
        edit(m["blocks"])
    return apply


@pytest.mark.parametrize("edit, match", [
    (lambda b: b["kinds"][0].update(count=DEPTH + 1),
     r"the block table holds 3 blocks \(3 in blocks\), but the model config has 2"),
    (lambda b: b["kinds"][0]["branches"].pop(), r"block 0 has branches \['attn'\] in the block table but \['attn', "
                                                r"'mlp'\] in the plan"),
    (lambda b: b["kinds"][0].update(container="../blocks"), r"container '../blocks', not a name and a module path"),
    (lambda b: b["kinds"][0]["branches"][0].update(name="ffn"), r"a branch is a name of \['attn', '"),
    (lambda b: b["kinds"][0]["branches"][0].update(norms="norm1"), r"norms of attn is 'norm1', not a list"),
    (lambda b: b["kinds"][0].update(count=True), r"kind block has count True, not a whole number"),
    (lambda b: b.update(kinds={}), r"'kinds' is missing or not a non-empty list"),
])
def test_damaged_block_table_is_named(copy, edit, match):
    _edit_manifest(copy, _with_table(edit))
    with pytest.raises(TcgraphError, match=r"manifest.json: .*" + match + r".*re-run `tcgraph transform`"):
        load_artifact(copy)


def test_weights_of_blocks_the_model_lacks_are_refused_by_the_recorded_containers(copy):
    """The check reads the block table: weights under a container past its count are refused; the
    same name is no block's where the table puts the blocks in another container."""
    def reads(name):
        def edit(m):
            m["variants"][1]["external_initializers"].append(name)
        return edit

    _edit_manifest(copy, reads("blocks.2.attn.qkv.weight.T"))
    with pytest.raises(TcgraphError, match=r"variant v1 reads weights \['blocks.2.attn.qkv.weight.T'\] of blocks that "
                                           r"a model with this config \(2 blocks in blocks\) does not have"):
        load_artifact(copy)
    _edit_manifest(copy, _with_table(lambda b: b["kinds"][0].update(container="trunk")))
    load_artifact(copy)  # blocks.2 is no block of a model whose blocks are trunk.0, trunk.1
    _edit_manifest(copy, reads("trunk.2.mlp.fc1.weight"))
    with pytest.raises(TcgraphError, match=r"weights \['trunk.2.mlp.fc1.weight'\] of blocks that a model with this "
                                           r"config \(2 blocks in trunk\) does not have"):
        load_artifact(copy)


#################################################################################
#                     Writing: refused early, replaced atomically               #
#################################################################################


def test_what_cannot_be_loaded_is_not_written(tmp_path, model):
    out = tmp_path / "art"
    with pytest.raises(TcgraphError, match=r"cannot write .*: the plan cannot be read .*pass the model's config "
                                           r"and a tcgraph Plan"):
        write_artifact(out, model_config=model.config, plan={"steps": 3}, variants=variants(model, ("full",)))
    with pytest.raises(TcgraphError, match=r"cannot write .*: the model config is not one tcgraph can build"):
        write_artifact(out, model_config={"name": "tiny"}, plan=PLAN, variants=variants(model, ("full",)))
    with pytest.raises(TcgraphError, match=r"the plan is for 2 blocks x 16 tokens, but the model config has 2 blocks"):
        write_artifact(out, model_config=model.config, plan=tiny_plan((FULL,), num_tokens=16),
                       variants=variants(model, ("full",)))
    with pytest.raises(TcgraphError, match=r"the variants are \['full'\], but the plan's schedule runs \['v0'\]; "
                                           r"pass one variant graph per variant of the plan, with the plan's ids"):
        write_artifact(out, model_config=model.config, plan=tiny_plan((FULL,)), variants=dit_variants(model, ("full",)))
    assert not out.exists() and _siblings(out) == []


def test_engine_section_is_carried_and_its_files_hashed(tmp_path, model):
    seen = []

    def engines(folder, specs):  # a stand-in builder: one file per variant, and its section
        seen.extend(specs)
        (folder / "engines").mkdir()
        for spec in specs:
            (folder / "engines" / f"{spec.id}.plan").write_bytes(spec.id.encode())
        return {"precision": "fp16", "engines": {s.id: {"file": f"engines/{s.id}.plan"} for s in specs}}

    out = write_artifact(tmp_path / "art", model_config=model.config, plan=tiny_plan((FULL,)),
                         variants=variants(model, ("full",)), engines=engines, verify=False)
    assert [type(s) for s in seen] == [VariantSpec] and seen[0].file == "variants/v0.onnx"
    art = load_artifact(out)
    assert art.tensorrt == {"precision": "fp16", "engines": {"v0": {"file": "engines/v0.plan"}}}
    assert art.files["engines/v0.plan"] == file_sha256(out / "engines/v0.plan")
    (out / "engines/v0.plan").write_bytes(b"edited")
    with pytest.raises(TcgraphError, match=r"hash mismatch: engines/v0\.plan"):
        load_artifact(out)


def test_existing_folder_needs_overwrite(copy, model):
    before = (copy / "manifest.json").read_bytes()
    with pytest.raises(TcgraphError, match=r"already exists; replace it \(`--force` on the command line, force=True in the API\)"):
        write_artifact(copy, model_config=model.config.to_dict(), plan=PLAN, variants=[])
    assert (copy / "manifest.json").read_bytes() == before


def test_overwrite_replaces_the_folder(copy, model):
    (copy / "stale.txt").write_text("from the old folder")
    new_plan = tiny_plan((FULL, FULL))
    progress = Recorder()
    write_artifact(copy, model_config=model.config.to_dict(), plan=new_plan.to_dict(),
                   variants=variants(model, ("full",)), overwrite=True, progress=progress)
    art = load_artifact(copy)
    assert art.plan == new_plan and art.variant_ids() == ["v0"]
    assert art.programs == {} and art.parameters is None  # written without a state dict
    assert "programs" not in _manifest(copy) and "parameters" not in _manifest(copy)
    assert not (copy / "stale.txt").exists()
    assert _siblings(copy) == []
    assert progress.phases[-1][0] == "export" and progress.phases[-1][2][-1] == "wrote 1 variants"


@pytest.mark.parametrize("error", [RuntimeError("simulated crash"), KeyboardInterrupt()])
def test_interrupted_write_leaves_nothing_and_keeps_the_old_folder(copy, model, monkeypatch, error):
    real_export = export_onnx._torch_export
    calls = []

    def export_then_fail(*args, **kwargs):
        calls.append(args[0].id)
        if len(calls) == 2:  # in the middle: after the first variant was written
            raise error
        return real_export(*args, **kwargs)

    monkeypatch.setattr(export_onnx, "_torch_export", export_then_fail)
    files_before = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    two = variants(model, ("fill", "reuse"))
    with pytest.raises(type(error)):
        write_artifact(copy, model_config=model.config, plan=PLAN, variants=two, overwrite=True)
    assert calls == ["v0", "v1"]
    files_after = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert files_after == files_before  # the old folder, byte for byte
    load_artifact(copy)
    assert _siblings(copy) == []  # and no temporary folder

    fresh = copy.parent / "fresh"
    calls.clear()
    with pytest.raises(type(error)):
        write_artifact(fresh, model_config=model.config, plan=PLAN, variants=two)
    assert not fresh.exists()
    assert sorted(p.name for p in copy.parent.iterdir()) == ["art"]  # no fresh, no temporary folder
