"""EnginesFromArtifact: the engine files of a folder, checked against this machine and the
manifest, weight-stripped ones refitted; driven against the stand-in TensorRT of
tests/fake_tensorrt.py (its engines report the I/O of the ONNX file they were built from).
"""
from __future__ import annotations

import copy
import dataclasses
import sys

import pytest
import torch

from tcgraph.errors import TcgraphError
from tcgraph.export import load_artifact, write_artifact
from tcgraph.runtime.trt import EnginesFromArtifact, LoadedEngines, TrtRunner, check_engine_io
from tests.export.tiny_variants import tiny_dit
from tests.runtime.tiny_artifact import tiny_artifact_args
from tests.fake_tensorrt import FAKE_GPU, fake_engines, fake_tensorrt, install_fake_gpu, needs_real_tensorrt

CACHE = "cache.0.attn"


@pytest.fixture(scope="module")
def built(tmp_path_factory, variants):
    """Artifacts with stand-in engines: plain and weight-stripped (one export each)."""
    result = {}
    for strip in (False, True):
        trt = fake_tensorrt()
        out = tmp_path_factory.mktemp("trt") / "art"
        write_artifact(out, **tiny_artifact_args(tiny_dit()), variants=list(variants.values()),
                       engines=fake_engines(trt, precision="fp16", strip_weights=strip))
        result[strip] = (load_artifact(out), trt)
    return result


@pytest.fixture
def artifact(built):
    return built[False][0]


@pytest.fixture
def fake(monkeypatch, built):
    """The stand-in TensorRT and one fake GPU, in place for one test."""
    trt = built[False][1]
    trt.refits.clear()
    trt.refit_fails, trt.corrupt = False, {}
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    install_fake_gpu(monkeypatch)
    return trt


def _with_section(artifact, section):
    """The artifact with another "tensorrt" section (a copy; the fixture stays intact)."""
    return dataclasses.replace(artifact, tensorrt_section=section)


def test_loads_every_engine_and_checks_it(fake, artifact):
    loaded = EnginesFromArtifact(artifact)()
    assert isinstance(loaded, LoadedEngines) and loaded.user_managed == "USER_MANAGED"
    assert list(loaded.engines) == ["v0", "v1", "v2"]
    assert [e.plan["id"] for e in loaded.engines.values()] == ["v0", "v1", "v2"]
    assert fake.refits == []  # plain engines hold their weights


def test_refuses_engines_built_elsewhere(monkeypatch, fake, artifact):
    with pytest.raises(TcgraphError, match=r"built without TensorRT engines .*--backend trt"):
        EnginesFromArtifact(_with_section(artifact, None))()
    install_fake_gpu(monkeypatch, gpu={"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"})
    with pytest.raises(TcgraphError, match=rf"built on the GPU '{FAKE_GPU['name']}' \(compute capability 9\.0\), "
                                           r"this machine has 'NVIDIA A100-SXM4-80GB' \(compute capability 8\.0\); "
                                           r"re-run `tcgraph transform --backend trt --force` on this machine"):
        EnginesFromArtifact(artifact)()
    newer = fake_tensorrt(version="10.4.0.1")
    monkeypatch.setitem(sys.modules, "tensorrt", newer)
    install_fake_gpu(monkeypatch)
    loader = EnginesFromArtifact(artifact)
    with pytest.raises(TcgraphError, match=r"TensorRT 10\.3\.0 built them, this machine has TensorRT 10\.4\.0"):
        loader()
    assert loader.runtime is None  # refused before loading anything


def test_refuses_damaged_engine_sections(fake, artifact):
    section = copy.deepcopy(artifact.tensorrt)
    del section["engines"]["v2"]
    with pytest.raises(TcgraphError, match=r"has no engine for variants \['v2'\]; the artifact is incomplete"):
        EnginesFromArtifact(_with_section(artifact, section))()
    fake.corrupt = {"v1": (CACHE, [2, 64, 64])}
    with pytest.raises(TcgraphError, match=r"the TensorRT engine of variant v1 does not match manifest\.json "
                                           r"\(cache\.0\.attn: engine \('output', \[2, 64, 64\], 'float32'\) vs "
                                           r"manifest \('output', \[2, 64, 128\], 'float32'\)\)"):
        EnginesFromArtifact(artifact)()


def test_engine_io_is_checked_by_name_direction_shape_and_dtype(fake, artifact):
    engines = EnginesFromArtifact(artifact)().engines
    specs = {v.id: v for v in artifact.variants}
    check_engine_io(engines["v2"], specs["v2"], input_mode=fake.TensorIOMode.INPUT)
    with pytest.raises(TcgraphError, match=r"variant v1 does not match manifest\.json \(cache\.0\.attn: engine "
                                           r"\('output', \[2, 64, 128\], 'float32'\) vs manifest \('input', "
                                           r"\[2, 64, 128\], 'float32'\), cache\.0\.attn\.new: engine \('input'"):
        check_engine_io(engines["v2"], dataclasses.replace(specs["v2"], id="v1"),
                        input_mode=fake.TensorIOMode.OUTPUT)  # every direction wrong


def test_weight_stripped_engines_are_refitted_from_the_onnx(monkeypatch, built):
    artifact, trt = built[True]
    assert artifact.tensorrt["weight_stripped"] is True
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    install_fake_gpu(monkeypatch)
    engines = EnginesFromArtifact(artifact)().engines
    paths = [str(artifact.variant_path(vid)) for vid in ("v0", "v1", "v2")]
    assert trt.refits == paths
    assert [e.refitted_from for e in engines.values()] == paths
    trt.refit_fails = True
    with pytest.raises(TcgraphError, match=r"cannot refit the weight-stripped engine of variant v0 from "
                                           r".*v0\.onnx: weights differ from the engine's; re-run "
                                           r"`tcgraph transform --backend trt"):
        EnginesFromArtifact(artifact)()


def test_the_runner_activates_through_the_loader(monkeypatch, fake, artifact):
    """The default loader runs inside activate, on the runner's device; a refusal leaves it inactive."""
    monkeypatch.setattr(torch.cuda, "device", lambda device: __import__("contextlib").nullcontext())
    fake.corrupt = {"v1": (CACHE, [2, 64, 64])}
    runner = TrtRunner(artifact)
    with pytest.raises(TcgraphError, match=r"variant v1 does not match manifest\.json"):
        runner.activate()
    assert not runner.is_active and runner._engines == {} and runner._bank is None


@needs_real_tensorrt
def test_real_refusal(tmp_path, variants):
    import functools

    from tcgraph.runtime.trt import build_engines

    out = write_artifact(tmp_path / "art", **tiny_artifact_args(tiny_dit()),
                         variants=list(variants.values()),
                         engines=functools.partial(build_engines, precision="fp16"))
    artifact = load_artifact(out)
    assert set(EnginesFromArtifact(artifact)().engines) == {"v0", "v1", "v2"}
    section = copy.deepcopy(artifact.tensorrt)
    section["device"]["name"] = "Some Other GPU"
    with pytest.raises(TcgraphError, match=r"built on the GPU 'Some Other GPU' .*engines are not portable"):
        TrtRunner(_with_section(artifact, section)).activate()
