"""TensorRT engines: `check_engines`, the clear errors, and `build_engines`.

Everywhere: `check_engines` on numbers, the one clear error of `import_tensorrt` and
`build_engines`, and `build_engines` driven against `fake_tensorrt()`, a stand-in for
the `tensorrt` module that records what the builder was asked (flags, workspace, the
timing cache, the ONNX paths) and writes plans whose engines report their I/O (it
lives in tests/fake_tensorrt.py; tests/runtime/trt/test_loader.py loads them).
Tests marked `tensorrt` build real engines; they skip where TensorRT or a CUDA GPU is
missing.
"""
from __future__ import annotations

import functools
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from tcgraph.errors import TcgraphError
from tcgraph.export import load_artifact, write_artifact
from tcgraph.export.onnx import export_variants
from tcgraph.progress import Recorder
from tcgraph.runtime.trt import build_engines, check_engines, import_tensorrt, keep_sinusoids_fp32, release
from tests.export.tiny_variants import tiny_dit
from tests.runtime.tiny_artifact import tiny_artifact_args
from tests.fake_tensorrt import (
    FAKE_GPU,
    FAKE_VERSION,
    fake_engines,
    fake_section,
    fake_tensorrt,
    install_fake_gpu,
    needs_real_tensorrt,
    timestep_network,
)

def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


#################################################################################
#                                  check_engines                                #
#################################################################################

HERE = {"tensorrt_version": "10.3.0.26", "device_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def _built(version="10.3.0.26", name="NVIDIA H100 80GB HBM3", cc="9.0") -> dict:
    return fake_section(tensorrt_version=version, device={"name": name, "compute_capability": cc})


def test_check_engines_accepts_the_same_release_and_gpu():
    check_engines(_built(), **HERE)
    check_engines(_built(version="10.3.0.30"), **HERE)  # only the build number differs
    assert release("10.3.0.26") == "10.3.0" and release("10.3") == "10.3"


def test_check_engines_refuses_a_missing_section():
    for section in (None, {}):
        with pytest.raises(TcgraphError, match=r"built without TensorRT engines .*re-run `tcgraph transform \.\.\. "
                                               r"--backend trt`"):
            check_engines(section, **HERE)


def test_check_engines_refuses_another_tensorrt():
    fix = r"re-run `tcgraph transform --backend trt --force` on this machine \(engines are not portable\)"
    with pytest.raises(TcgraphError, match=r"TensorRT 10\.1\.0 built them, this machine has TensorRT 10\.3\.0; "
                                           + fix):
        check_engines(_built(version="10.1.0.27"), **HERE)


@pytest.mark.parametrize("name, cc", [("NVIDIA A100-SXM4-80GB", "8.0"), ("NVIDIA H100 80GB HBM3", "8.9"),
                                      ("NVIDIA H100 PCIe", "9.0")])
def test_check_engines_refuses_another_gpu(name, cc):
    with pytest.raises(TcgraphError) as e:
        check_engines(_built(name=name, cc=cc), **HERE)
    msg = str(e.value)
    assert f"built on the GPU '{name}' (compute capability {cc})" in msg
    assert "this machine has 'NVIDIA H100 80GB HBM3' (compute capability 9.0)" in msg
    assert msg.endswith("re-run `tcgraph transform --backend trt --force` on this machine (engines are not portable)")
    assert "TensorRT 10" not in msg  # the versions agree: only the GPU is named


def test_check_engines_names_every_difference():
    with pytest.raises(TcgraphError, match=r"TensorRT 10\.0\.1 built them, this machine has TensorRT 10\.3\.0; "
                                           r"they were built on the GPU 'NVIDIA L4' \(compute capability 8\.9\)"):
        check_engines(_built(version="10.0.1.6", name="NVIDIA L4", cc="8.9"), **HERE)


def test_check_engines_refuses_a_damaged_section():
    with pytest.raises(TcgraphError, match=r"lacks 'device'.*the artifact is damaged"):
        check_engines({"tensorrt_version": "10.3.0"}, **HERE)


#################################################################################
#                       import_tensorrt and early refusals                      #
#################################################################################

_INSTALL = r"pip install tensorrt.*`--backend torch --device cuda`, or `--backend ort`"


def test_import_tensorrt_without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    with pytest.raises(TcgraphError, match=r"needs the `tensorrt` Python package, which cannot be imported here "
                                           r"\((ModuleNotFound|Import)Error: .*\); install TensorRT 10 with its "
                                           r"builder libraries on an NVIDIA GPU machine .*" + _INSTALL):
        import_tensorrt()


def test_import_tensorrt_refuses_stubs_and_old_releases(monkeypatch):
    stub = types.ModuleType("tensorrt")
    monkeypatch.setitem(sys.modules, "tensorrt", stub)
    with pytest.raises(TcgraphError, match=r"is a stub or a lean runtime without the builder .*" + _INSTALL):
        import_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(version="8.6.1"))
    with pytest.raises(TcgraphError, match=r"needs TensorRT 10 or newer .*found TensorRT 8\.6\.1"):
        import_tensorrt()
    fake = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    assert import_tensorrt() is fake


@pytest.mark.parametrize("kwargs, message", [
    ({"precision": "int8"}, r"unknown TensorRT precision 'int8'; choose one of fp16, bf16, fp32"),
    ({"precision": "FP16"}, r"unknown TensorRT precision 'FP16'"),
    ({"workspace_gib": 0}, r"workspace_gib must be a positive number of GiB, got 0"),
])
def test_build_engines_checks_options_before_tensorrt(monkeypatch, tmp_path, kwargs, message):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # touching TensorRT would fail differently
    with pytest.raises(TcgraphError, match=message):
        build_engines(tmp_path, [{"id": "v0", "file": "variants/v0.onnx"}], **kwargs)


def test_build_engines_without_tensorrt_or_gpu(monkeypatch, onnx_folder):
    root, entries = onnx_folder
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TcgraphError, match=_INSTALL):
        build_engines(root, entries)
    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    install_fake_gpu(monkeypatch, available=False)
    with pytest.raises(TcgraphError, match=r"TensorRT needs an NVIDIA GPU, and torch sees no CUDA device here"):
        build_engines(root, entries)
    assert not (root / "engines").exists()


#################################################################################
#                     build_engines against the stand-in                        #
#################################################################################


@pytest.fixture(scope="module")
def exported(tmp_path_factory, variants):
    root = tmp_path_factory.mktemp("trt") / "exported"
    entries = export_variants(list(variants.values()), root)
    return root, entries


@pytest.fixture
def onnx_folder(exported, tmp_path):
    """A fresh copy of the exported variants (build_engines writes into it)."""
    root, entries = exported
    copy = tmp_path / "art"
    shutil.copytree(root, copy)
    return copy, entries


@pytest.fixture
def fake(monkeypatch):
    trt = fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    install_fake_gpu(monkeypatch)
    return trt


def test_sinusoidal_embedding_stays_fp32():
    trt = fake_tensorrt()
    inputs, layers = timestep_network(trt)
    network = trt.Builder(None).create_network(0)
    network.inputs, network.layers = inputs, layers
    assert keep_sinusoids_fp32(trt, network) == 2  # sin and cos of t; not the sin of x
    pinned = {layer.name for layer in layers if layer.precision is trt.float32}
    assert pinned == {"cast", "freqs", "mul", "sin", "cos"}  # not the int64 shuffle, nothing that reads x
    assert all(layer.output_types == {0: trt.float32} for layer in layers if layer.name in pinned)
    assert keep_sinusoids_fp32(trt, network, max_layers=3) == 0  # a chain that long is not an embedding


@pytest.mark.parametrize("precision, flags", [("fp16", ["FP16", "PREFER_PRECISION_CONSTRAINTS"]),
                                              ("bf16", ["BF16", "PREFER_PRECISION_CONSTRAINTS"]), ("fp32", [])])
def test_build_engines_one_engine_per_variant(fake, onnx_folder, precision, flags):
    root, entries = onnx_folder
    progress = Recorder()
    section = build_engines(root, entries, precision=precision, progress=progress)
    ids = [e["id"] for e in entries]
    assert section == {
        "tensorrt_version": FAKE_VERSION,
        "device": FAKE_GPU,
        "precision": precision,
        "weight_stripped": False,
        "timing_cache": "engines/timing.cache",
        "engines": {vid: {"file": f"engines/{vid}.plan", "bytes": (root / f"engines/{vid}.plan").stat().st_size}
                    for vid in ids},
    }
    (builder,) = fake.builders  # one builder for all variants
    assert [Path(p) for p, _ in builder.builds] == [root / e["file"] for e in entries]  # parsed from the path
    for _, config in builder.builds:
        assert sorted(config.flags) == flags and config.pools == {}
    # ONE timing cache, shared by every build, saved once
    (cache,) = fake.timing_caches
    assert all(config.timing_cache is cache for _, config in builder.builds)
    assert (root / "engines/timing.cache").read_bytes() == b"fake timing cache after 3 builds"
    assert progress.phases == [["engines", 3, [f"{vid} ({i + 1}/3, {precision})" for i, vid in enumerate(ids)]]]
    assert sorted(p.name for p in (root / "engines").iterdir()) == sorted([f"{v}.plan" for v in ids] + ["timing.cache"])


def test_build_engines_weight_stripped_and_workspace(fake, onnx_folder):
    root, entries = onnx_folder
    progress = Recorder()
    section = build_engines(root, entries, strip_weights=True, workspace_gib=1.5, progress=progress)
    assert section["weight_stripped"] is True and section["precision"] == "fp16"
    for _, config in fake.builders[0].builds:
        assert config.flags == {"FP16", "PREFER_PRECISION_CONSTRAINTS", "STRIP_PLAN", "REFIT_IDENTICAL"}
        assert config.pools == {"WORKSPACE": 1610612736}  # 1.5 GiB in bytes
    assert progress.phases[0][2][0] == "v0 (1/3, fp16, weight-stripped)"


def test_build_engines_reports_parser_errors(fake, onnx_folder):
    root, entries = onnx_folder
    fake.parse_errors = ["In node 12 (Gelu): UNSUPPORTED_NODE"]
    with pytest.raises(TcgraphError, match=r"TensorRT 10\.3\.0\.26 cannot parse variant v0 \(v0\.onnx\): "
                                           r"In node 12 \(Gelu\): UNSUPPORTED_NODE; .*`--backend ort`"):
        build_engines(root, entries)


def test_build_engines_without_precision_flags(monkeypatch, onnx_folder):
    trt = fake_tensorrt(version="11.0.0.1", precision_flags=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    install_fake_gpu(monkeypatch)
    root, entries = onnx_folder
    with pytest.raises(TcgraphError, match=r"TensorRT 11\.0\.0\.1 has no BuilderFlag\.BF16 .*precision fp32"):
        build_engines(root, entries, precision="bf16")
    assert build_engines(root, entries, precision="fp32")["precision"] == "fp32"


def test_build_engines_refuses_missing_onnx(fake, tmp_path):
    with pytest.raises(TcgraphError, match=r"lacks \['variants/v0\.onnx'\]; export the variants first"):
        build_engines(tmp_path, [{"id": "v0", "file": "variants/v0.onnx"}])


def test_write_artifact_hashes_the_engines(tmp_path, variants):
    out = write_artifact(tmp_path / "art", **tiny_artifact_args(tiny_dit(), 1),
                         variants=[variants["v0"]], engines=fake_engines(fake_tensorrt(), precision="fp16"))
    load_artifact(out)  # checks every hash, engine files included
    section, files = _manifest(out)["tensorrt"], _manifest(out)["files"]
    size = (out / "engines/v0.plan").stat().st_size
    assert section["engines"] == {"v0": {"file": "engines/v0.plan", "bytes": size}}
    assert {"engines/v0.plan", "engines/timing.cache"} <= set(files)
    (out / "engines/v0.plan").write_bytes(b"{}")
    with pytest.raises(TcgraphError, match=r"hash mismatch: engines/v0\.plan"):
        load_artifact(out)


#################################################################################
#                        Real TensorRT (GPU machines)                           #
#################################################################################


@needs_real_tensorrt
def test_real_engines_plain_and_weight_stripped(tmp_path, variants):
    import tensorrt as trt

    sizes = {}
    for strip in (False, True):
        out = write_artifact(tmp_path / f"art-{strip}", **tiny_artifact_args(tiny_dit()),
                             variants=list(variants.values()),
                             engines=functools.partial(build_engines, precision="fp16", strip_weights=strip))
        load_artifact(out)
        section, files = _manifest(out)["tensorrt"], _manifest(out)["files"]
        major, minor = torch.cuda.get_device_capability()
        assert section["tensorrt_version"] == trt.__version__
        assert section["device"] == {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
        assert section["weight_stripped"] is strip and section["precision"] == "fp16"
        assert set(section["engines"]) == {"v0", "v1", "v2"}
        for engine in section["engines"].values():
            assert engine["file"] in files and engine["bytes"] == (out / engine["file"]).stat().st_size
        assert (out / "engines/timing.cache").stat().st_size > 0
        sizes[strip] = sum(e["bytes"] for e in section["engines"].values())
    weights = (tmp_path / "art-False" / "variants/weights.bin").stat().st_size
    # plain engines each hold (fp16) copies of the weights; stripped ones hold (almost) none
    assert sizes[True] < sizes[False] and sizes[True] < weights
