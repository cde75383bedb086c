"""TrtRunner: clear refusals, fixed addresses, caches that never move, one CUDA graph per variant.

Everywhere: the refusals (CPU device, no TensorRT, no GPU, foreign or damaged engines),
and the runner's whole data flow driven against the stand-in TensorRT of
tests/export/test_tensorrt.py with torch.cuda faked: its "engines" run the variants' fx
graphs on the CPU on the memory at the addresses the runner bound, so a wrong binding, a
missing copy or an extra copy shows up in the numbers. Tests marked `tensorrt` run real
engines and skip where TensorRT or a CUDA GPU is missing.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import sys

import pytest
import torch

from tcgraph.errors import TcgraphError
from tcgraph.export import load_artifact, write_artifact
from tcgraph.export.tensorrt import build_engines
from tcgraph.runtime import make_runner
from tcgraph.runtime.dispatch import ScheduleDispatcher, graph_runner
from tcgraph.runtime.trt import TrtRunner
from tests.export.tiny_variants import dit_variants, tiny_dit
from tests.fake_tensorrt import (
    FAKE_GPU,
    fake_engines,
    fake_tensorrt,
    install_fake_cuda,
    needs_real_tensorrt,
)

CACHE = "cache.0.attn"


class CpuTrtRunner(TrtRunner):
    """TrtRunner whose buffers live on the CPU: only for the stand-in TensorRT and faked torch.cuda."""

    def _cuda_device(self) -> torch.device:
        return torch.device("cpu")


@pytest.fixture(scope="module")
def variants():
    torch.set_num_threads(1)
    return {v.id: v for v in dit_variants(tiny_dit())}


@pytest.fixture(scope="module")
def built(tmp_path_factory, variants):
    """Artifacts with stand-in engines: plain and weight-stripped (one export each)."""
    result = {}
    for strip in (False, True):
        trt = fake_tensorrt()
        out = tmp_path_factory.mktemp("trt") / "art"
        write_artifact(out, model_config={"name": "tiny"}, plan={"steps": 3}, variants=list(variants.values()),
                       engines=fake_engines(trt, precision="fp16", strip_weights=strip))
        result[strip] = (load_artifact(out), trt)
    return result


@pytest.fixture
def artifact(built):
    return built[False][0]


@pytest.fixture
def fake(monkeypatch, built, variants):
    """The stand-in TensorRT and one fake GPU, in place for one test."""
    trt = built[False][1]
    trt.programs = {vid: v.gm for vid, v in variants.items()}
    trt.executions.clear()
    trt.refits.clear()
    trt.refit_fails, trt.corrupt = False, {}
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    install_fake_cuda(monkeypatch, trt)
    return trt


def _reference(variant, feeds=None):
    feeds = feeds or variant.example_inputs
    with torch.no_grad():
        out = variant.gm(*(feeds[n] for n in variant.input_names))
    return dict(zip(variant.output_names, out if isinstance(out, tuple) else (out,)))


def _without(artifact, **manifest_changes):
    """The artifact with its manifest changed (a copy; the fixture stays intact)."""
    manifest = copy.deepcopy(artifact.manifest)
    for key, value in manifest_changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    return dataclasses.replace(artifact, manifest=manifest)


#################################################################################
#                                  Refusals                                     #
#################################################################################


def test_device_must_be_a_gpu(artifact):
    for device in ("cpu", "gpu", "cuda:x", 0):
        with pytest.raises(TcgraphError, match=r"TensorRT runs only on NVIDIA GPUs: pass 'cuda' or 'cuda:N'; to "
                                               r"sample on the CPU use `--backend ort` or `--backend torch`"):
            TrtRunner(artifact, device=device)
    # checked against the machine on activate
    assert TrtRunner(artifact, device="cuda:1").device == torch.device("cuda:1")
    assert TrtRunner(artifact).device == torch.device("cuda")
    with pytest.raises(TcgraphError, match=r"unknown options \['fast'\]; valid options: cuda_graphs, device"):
        TrtRunner(artifact, fast=True)


def test_activation_without_tensorrt(monkeypatch, artifact):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    runner = make_runner("trt", artifact)
    assert isinstance(runner, TrtRunner)
    with pytest.raises(TcgraphError, match=r"needs the `tensorrt` Python package.*pip install tensorrt.*"
                                           r"`--backend torch --device cuda`, or `--backend ort`"):
        runner.activate()
    assert not runner.is_active


def test_activation_without_a_gpu(monkeypatch, built, artifact):
    trt = built[False][1]
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    install_fake_cuda(monkeypatch, trt, available=False)
    with pytest.raises(TcgraphError, match=r"TensorRT needs an NVIDIA GPU, and torch sees no CUDA device here"):
        TrtRunner(artifact).activate()
    install_fake_cuda(monkeypatch, trt)
    with pytest.raises(TcgraphError, match=r"got device 'cuda:3', but this machine has 1 CUDA device\(s\)"):
        TrtRunner(artifact, device="cuda:3").activate()


def test_refuses_engines_built_elsewhere(monkeypatch, fake, artifact):
    with pytest.raises(TcgraphError, match=r"built without TensorRT engines .*--backend trt"):
        CpuTrtRunner(_without(artifact, tensorrt=None)).activate()
    install_fake_cuda(monkeypatch, fake, gpu={"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"})
    with pytest.raises(TcgraphError, match=rf"built on the GPU '{FAKE_GPU['name']}' \(compute capability 9\.0\), "
                                           r"this machine has 'NVIDIA A100-SXM4-80GB' \(compute capability 8\.0\); "
                                           r"re-run `tcgraph transform --backend trt --force` on this machine"):
        CpuTrtRunner(artifact).activate()
    newer = fake_tensorrt(version="10.4.0.1")
    monkeypatch.setitem(sys.modules, "tensorrt", newer)
    install_fake_cuda(monkeypatch, newer)
    with pytest.raises(TcgraphError, match=r"TensorRT 10\.3\.0 built them, this machine has TensorRT 10\.4\.0"):
        CpuTrtRunner(artifact).activate()
    assert newer.executions == []  # refused before loading anything


def test_refuses_damaged_engine_sections(fake, artifact):
    section = copy.deepcopy(artifact.manifest["tensorrt"])
    del section["engines"]["reuse"]
    with pytest.raises(TcgraphError, match=r"has no engine for variants \['reuse'\]; the artifact is incomplete"):
        CpuTrtRunner(_without(artifact, tensorrt=section)).activate()
    fake.corrupt = {"fill": (CACHE, [2, 64, 64])}
    runner = CpuTrtRunner(artifact)
    with pytest.raises(TcgraphError, match=r"the TensorRT engine of variant fill does not match manifest\.json "
                                           r"\(cache\.0\.attn: engine \('output', \[2, 64, 64\], 'float32'\) vs "
                                           r"manifest \('output', \[2, 64, 128\], 'float32'\)\)"):
        runner.activate()
    assert not runner.is_active and runner._engines == {} and runner._bank is None  # cleaned up


#################################################################################
#                       Data flow, against the stand-in                         #
#################################################################################


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["enqueue", "graphs"])
def test_outputs_equal_the_graphs(fake, artifact, variants, cuda_graphs):
    with CpuTrtRunner(artifact, cuda_graphs=cuda_graphs) as runner:
        for vid, variant in variants.items():
            feeds = dict(variant.example_inputs)
            if vid == "full":
                feeds = {k: v.numpy() for k, v in feeds.items()}  # numpy feeds are copied in too
            got = runner.run(vid, feeds)
            want = _reference(variant)
            assert list(got) == variant.output_names  # by logical name, `cache.0.attn` not `.new`
            # (the stand-in graphs replay the engine only, not the scratch->bank copy, so compare
            # the aliased cache of `reuse` in the enqueue mode only)
            names = ["out"] if cuda_graphs and vid == "reuse" else variant.output_names
            for name in names:
                assert (runner.to_torch(got[name]) - want[name]).abs().max() <= 1e-6, (vid, name)


def test_addresses_are_fixed_and_caches_live_in_the_bank(fake, artifact):
    with CpuTrtRunner(artifact, cuda_graphs=False) as runner:
        bank, static = runner._bank, runner._static
        ptr = {name: t.data_ptr() for name, t in static.items()}
        for vid, context in runner._contexts.items():
            for name in ("x", "t", "y", "out"):  # one set of buffers for every variant
                assert context.addresses[name] == ptr[name], (vid, name)
        assert set(bank.buffers) == {CACHE}
        assert runner._contexts["fill"].addresses[CACHE] == bank[CACHE].data_ptr()  # written in place
        reuse = runner._contexts["reuse"].addresses
        assert reuse[CACHE] == bank[CACHE].data_ptr()  # read from the bank...
        scratch = runner._scratch["reuse"][CACHE]
        assert reuse[CACHE + ".new"] == scratch.data_ptr() != bank[CACHE].data_ptr()  # ...rewritten via scratch
        assert runner._scratch["full"] == {} and runner._scratch["fill"] == {}


@pytest.mark.parametrize("share", [True, False], ids=["shared", "own"])
def test_contexts_share_one_block_of_activation_memory(fake, artifact, variants, share):
    """Runs never overlap (one stream), so one block as large as the largest context's
    needs serves every variant; the outputs stay those of the graphs."""
    fake.context_strategies.clear()
    with CpuTrtRunner(artifact, share_activations=share, cuda_graphs=False) as runner:
        sizes = [engine.device_memory_size_v2 for engine in runner._engines.values()]
        assert len(set(sizes)) > 1  # the fake engines need different amounts
        if share:
            assert fake.context_strategies == ["USER_MANAGED"] * 3
            assert runner.activation_bytes == max(sizes)
            block = runner._activations.data_ptr()
            assert [c.device_memory for c in runner._contexts.values()] == [(block, n) for n in sizes]
        else:
            assert fake.context_strategies == [None] * 3
            assert runner.activation_bytes == sum(sizes)
            assert all(c.device_memory is None for c in runner._contexts.values())
        for vid, variant in variants.items():
            got = runner.run(vid, dict(variant.example_inputs))
            for name, want in _reference(variant).items():
                assert (got[name].cpu() - want).abs().max() <= 1e-5, (vid, name)


def test_caches_fed_back_are_not_copied(fake, artifact, variants):
    fill, reuse = variants["fill"], variants["reuse"]
    feeds = {k: v for k, v in reuse.example_inputs.items() if k != CACHE}
    with CpuTrtRunner(artifact, cuda_graphs=False) as runner:
        first = runner.run("fill", dict(fill.example_inputs))
        cache = first[CACHE]
        assert cache is runner._bank[CACHE]
        version = cache._version  # counts in-place writes by torch (the engine writes behind its back)
        second = runner.run("reuse", {**feeds, CACHE: cache})
        assert second[CACHE] is cache and second["out"] is first["out"]  # same buffers, every step
        assert cache._version == version + 1  # only the scratch->bank copy; the feed itself was not copied
        want = _reference(reuse, {**feeds, CACHE: _reference(fill)[CACHE]})
        assert (second["out"] - want["out"]).abs().max() <= 1e-6
        assert (second[CACHE] - want[CACHE]).abs().max() <= 1e-6
        # a cache made elsewhere is copied in (once), with the same result
        outside = want[CACHE].clone()
        third = runner.run("reuse", {**feeds, CACHE: outside})
        assert cache._version == version + 3
        want_again = _reference(reuse, {**feeds, CACHE: outside})
        assert (third[CACHE] - want_again[CACHE]).abs().max() <= 1e-6


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["enqueue", "graphs"])
def test_graphs_are_captured_once_at_activation(fake, artifact, variants, cuda_graphs):
    ids = ["full", "fill", "reuse"]
    with CpuTrtRunner(artifact, cuda_graphs=cuda_graphs) as runner:
        # a warm-up enqueue per variant, then (with graphs) one capture per variant
        assert fake.executions == ids + (ids if cuda_graphs else [])
        assert sorted(runner._graphs) == (sorted(ids) if cuda_graphs else [])
        fake.executions.clear()
        for vid in ("fill", "reuse", "reuse", "full"):
            runner.run(vid, dict(variants[vid].example_inputs))
        if cuda_graphs:
            assert fake.executions == []  # runs only replay: nothing is enqueued or captured lazily
            assert {vid: g.replays for vid, g in runner._graphs.items()} == {"full": 1, "fill": 1, "reuse": 2}
        else:
            assert fake.executions == ["fill", "reuse", "reuse", "full"]
    assert runner._graphs == {} and runner._contexts == {} and runner._engines == {}
    assert runner._bank is None and runner._static == {} and runner._stream is None


def test_dispatcher_runs_a_schedule(fake, artifact, variants):
    schedule = ["fill", "reuse", "reuse", "full", "fill", "reuse"]
    io = artifact.io_names()
    reference = ScheduleDispatcher(schedule, io, graph_runner({k: v.gm for k, v in variants.items()}, io))
    ex = variants["full"].example_inputs
    with CpuTrtRunner(artifact, cuda_graphs=False) as runner:
        dispatch = ScheduleDispatcher.for_runner(runner, schedule)
        x = ex["x"]
        for step in range(len(schedule)):
            got = dispatch(step, x, ex["t"], ex["y"]).clone()  # `out` is the runner's buffer: consume it first
            want = reference(step, x, ex["t"], ex["y"])
            assert (got - want).abs().max() <= 1e-5, step
            x = x - 0.1 * want  # a sampler-like update, so every step sees new inputs
    assert dispatch.calls == schedule


def test_weight_stripped_engines_are_refitted_from_the_onnx(monkeypatch, built, variants):
    artifact, trt = built[True]
    assert artifact.manifest["tensorrt"]["weight_stripped"] is True
    trt.programs = {vid: v.gm for vid, v in variants.items()}
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    install_fake_cuda(monkeypatch, trt)
    with CpuTrtRunner(artifact) as runner:
        assert trt.refits == [str(artifact.variant_path(vid)) for vid in ("full", "fill", "reuse")]
        got = runner.run("fill", dict(variants["fill"].example_inputs))
        assert (got["out"] - _reference(variants["fill"])["out"]).abs().max() <= 1e-6
    trt.refit_fails = True
    runner = CpuTrtRunner(artifact)
    with pytest.raises(TcgraphError, match=r"cannot refit the weight-stripped engine of variant full from "
                                           r".*full\.onnx: weights differ from the engine's; re-run "
                                           r"`tcgraph transform --backend trt"):
        runner.activate()
    assert not runner.is_active and runner._engines == {}


#################################################################################
#                         Real TensorRT (GPU machines)                          #
#################################################################################

# fp16 layers, fp32 inputs/outputs: outputs of this tiny DiT are O(1); fp16 rounding
# through 2 blocks gives ~1e-3, so 2e-2 (relative to max(1, |want|max)) leaves margin
# without hiding a wrong binding (those differ by O(1)).
FP16_TOL = 2e-2


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    want = want.float().cpu()
    return bool((got.float().cpu() - want).abs().max() <= FP16_TOL * max(1.0, float(want.abs().max())))


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "weight-stripped"])
def real_artifact(request, tmp_path_factory, variants):
    out = tmp_path_factory.mktemp("real-trt") / "art"
    write_artifact(out, model_config={"name": "tiny"}, plan={"steps": 3}, variants=list(variants.values()),
                   engines=functools.partial(build_engines, precision="fp16", strip_weights=request.param))
    return load_artifact(out)


def _cuda(feeds: dict) -> dict:
    return {k: v.cuda() for k, v in feeds.items()}


@needs_real_tensorrt
@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "enqueue"])
def test_real_outputs_match_the_graphs(real_artifact, variants, cuda_graphs):
    fill, reuse = variants["fill"], variants["reuse"]
    feeds = {k: v for k, v in reuse.example_inputs.items() if k != CACHE}
    with TrtRunner(real_artifact, cuda_graphs=cuda_graphs) as runner:
        for vid, variant in variants.items():
            got = runner.run(vid, _cuda(variant.example_inputs))
            want = _reference(variant)
            for name in variant.output_names:
                assert got[name].is_cuda and _close(got[name], want[name]), (vid, name)
        # caches chained on the device: fill -> reuse -> reuse, vs the graphs chained the same way
        cache = runner.run("fill", _cuda(fill.example_inputs))[CACHE]
        ptr = cache.data_ptr()
        want = _reference(reuse, {**feeds, CACHE: _reference(fill)[CACHE]})
        second = runner.run("reuse", {**_cuda(feeds), CACHE: cache})
        assert second[CACHE].data_ptr() == ptr  # the same device buffer: no copy, no new tensor
        assert _close(second["out"], want["out"]) and _close(second[CACHE], want[CACHE])
        want = _reference(reuse, {**feeds, CACHE: want[CACHE]})
        third = runner.run("reuse", {**_cuda(feeds), CACHE: second[CACHE]})
        assert third[CACHE].data_ptr() == ptr
        assert _close(third["out"], want["out"]) and _close(third[CACHE], want[CACHE])


@needs_real_tensorrt
def test_real_dispatcher_and_refusal(real_artifact, variants):
    schedule = ["fill", "reuse", "full", "fill", "reuse"]
    io = real_artifact.io_names()
    reference = ScheduleDispatcher(schedule, io, graph_runner({k: v.gm for k, v in variants.items()}, io))
    ex = variants["full"].example_inputs
    with TrtRunner(real_artifact) as runner:
        dispatch = ScheduleDispatcher.for_runner(runner, schedule)
        for step in range(len(schedule)):
            got = dispatch(step, ex["x"].cuda(), ex["t"].cuda(), ex["y"].cuda())
            assert _close(got, reference(step, ex["x"], ex["t"], ex["y"])), step
    section = copy.deepcopy(real_artifact.manifest["tensorrt"])
    section["device"]["name"] = "Some Other GPU"
    with pytest.raises(TcgraphError, match=r"built on the GPU 'Some Other GPU' .*engines are not portable"):
        TrtRunner(_without(real_artifact, tensorrt=section)).activate()
