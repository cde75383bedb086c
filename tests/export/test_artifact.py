"""write_artifact / load_artifact: complete folders or none, and damaged folders refused."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from tests.export.tiny_variants import dit_variants, tiny_dit

import tcgraph.export.onnx as export_onnx
from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import SCHEMA_VERSION, config_hash, load_artifact, write_artifact
from tcgraph.export.onnx import WEIGHTS_PATH, file_sha256

PLAN = {"sampler": "ddim", "steps": 4, "batch": 2, "schedule": ["fill", "reuse", "fill", "reuse"]}


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return tiny_dit()


@pytest.fixture(scope="module")
def built(tmp_path_factory, model):
    """One artifact folder, written once; tests that damage it work on copies."""
    out = tmp_path_factory.mktemp("built") / "art"
    write_artifact(
        out, model_config=model.config.to_dict(), plan=PLAN, variants=dit_variants(model, ("fill", "reuse")),
        extra={"note": "test"},
    )
    return out


@pytest.fixture
def copy(built, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(built, dst)
    return dst


def _siblings(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


def test_folder_layout_and_manifest(built, model):
    art = load_artifact(built)
    m = art.manifest
    assert m["schema_version"] == SCHEMA_VERSION
    assert m["tcgraph_version"]
    assert m["model_config"] == model.config.to_dict() == art.model_config
    assert m["model_config_hash"] == config_hash(model.config.to_dict())
    assert m["plan"] == PLAN == art.plan
    assert json.loads((built / "plan.json").read_text()) == PLAN
    assert m["extra"] == {"note": "test"}
    assert m["created"].endswith("+00:00")
    # every file of the folder, manifest.json excepted, with its hash
    on_disk = sorted(p.relative_to(built).as_posix() for p in built.rglob("*") if p.is_file())
    assert sorted(m["files"]) == [f for f in on_disk if f != "manifest.json"]
    assert {"plan.json", WEIGHTS_PATH, "variants/fill.onnx", "variants/reuse.onnx"} == set(m["files"])
    for rel, sha in m["files"].items():
        assert file_sha256(built / rel) == sha
    assert m["weights"] == {"file": WEIGHTS_PATH, "bytes": (built / WEIGHTS_PATH).stat().st_size}
    assert art.variant_ids() == ["fill", "reuse"]
    assert art.variant_path("reuse") == built / "variants/reuse.onnx"
    assert art.variant("fill")["max_abs_diff"] <= 1e-4
    assert art.weights_path == built / WEIGHTS_PATH
    with pytest.raises(TcgraphError, match="available variants: fill, reuse"):
        art.variant_path("v9")
    assert _siblings(built) == []  # no temporary folder left next to it


def test_config_hash_is_canonical():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_missing_file_is_named(copy):
    (copy / "variants/reuse.onnx").unlink()
    with pytest.raises(TcgraphError, match=r"missing file: variants/reuse.onnx .* re-run `tcgraph transform`"):
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
    path = copy / "variants/fill.onnx"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(TcgraphError, match=r"hash mismatch: variants/fill.onnx .*100 bytes"):
        load_artifact(copy)


def test_edited_plan_is_detected(copy):
    (copy / "plan.json").write_text(json.dumps({**PLAN, "steps": 5}))
    with pytest.raises(TcgraphError, match="hash mismatch: plan.json"):
        load_artifact(copy)


def test_newer_schema_is_refused(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
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
    assert load_artifact(copy).variant_ids() == ["fill", "reuse"]


def test_existing_folder_needs_overwrite(copy, model):
    before = (copy / "manifest.json").read_bytes()
    with pytest.raises(TcgraphError, match=r"already exists; pass overwrite=True \(`--force`"):
        write_artifact(copy, model_config=model.config.to_dict(), plan=PLAN, variants=[])
    assert (copy / "manifest.json").read_bytes() == before


def test_overwrite_replaces_the_folder(copy, model):
    (copy / "stale.txt").write_text("from the old folder")
    new_plan = {**PLAN, "steps": 2}
    write_artifact(copy, model_config=model.config.to_dict(), plan=new_plan,
                   variants=dit_variants(model, ("full",)), overwrite=True)
    art = load_artifact(copy)
    assert art.plan == new_plan and art.variant_ids() == ["full"]
    assert not (copy / "stale.txt").exists()
    assert _siblings(copy) == []


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
    variants = dit_variants(model, ("full", "fill"))
    with pytest.raises(type(error)):
        write_artifact(copy, model_config={"new": True}, plan={}, variants=variants, overwrite=True)
    assert calls == ["full", "fill"]
    files_after = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}
    assert files_after == files_before  # the old folder, byte for byte
    load_artifact(copy)
    assert _siblings(copy) == []  # and no temporary folder

    fresh = copy.parent / "fresh"
    calls.clear()
    with pytest.raises(type(error)):
        write_artifact(fresh, model_config={}, plan={}, variants=variants)
    assert not fresh.exists()
    assert sorted(p.name for p in copy.parent.iterdir()) == ["art"]  # no fresh, no temporary folder
