"""TrtRunner: clear refusals, fixed addresses, caches that never move, one CUDA graph per variant.

The runner is handed stand-in engines directly (tests/runtime/trt/stand_ins.py: they run
the variants' fx graphs on the CPU on the memory at the addresses the runner bound, so a
wrong binding, a missing copy or an extra copy shows up in the numbers), with torch.cuda's
streams and graphs run on the CPU. Loading real engine files is tests/runtime/trt/test_loader.py.
Tests marked `tensorrt` run real engines and skip where TensorRT or a CUDA GPU is missing.
"""
from __future__ import annotations

import functools
import sys

import pytest
import torch

from tcgraph.errors import TcgraphError
from tcgraph.export import load_artifact, write_artifact
from tcgraph.runtime import make_runner
from tcgraph.runtime.dispatch import ScheduleDispatcher, graph_runner
from tcgraph.runtime.trt import LoadedEngines, TrtRunner, build_engines
from tests.export.tiny_variants import tiny_dit
from tests.runtime.tiny_artifact import tiny_artifact_args
from tests.fake_tensorrt import fake_tensorrt, install_fake_gpu, needs_real_tensorrt
from tests.runtime.trt.stand_ins import CpuTrtRunner, Log, install_cpu_cuda, stand_in_engines

CACHE = "cache.0.attn"


@pytest.fixture
def log(monkeypatch):
    log = Log()
    install_cpu_cuda(monkeypatch, log)
    return log


@pytest.fixture
def engines(artifact, variants, log):
    return stand_in_engines(artifact, {vid: v.gm for vid, v in variants.items()}, log)


def _reference(variant, feeds=None):
    feeds = feeds or variant.example_inputs
    with torch.no_grad():
        out = variant.gm(*(feeds[n] for n in variant.input_names))
    return dict(zip(variant.output_names, out if isinstance(out, tuple) else (out,)))


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


def test_activation_without_a_gpu(monkeypatch, artifact, engines):
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt())
    install_fake_gpu(monkeypatch, available=False)
    with pytest.raises(TcgraphError, match=r"TensorRT needs an NVIDIA GPU, and torch sees no CUDA device here"):
        TrtRunner(artifact).activate()
    with pytest.raises(TcgraphError, match=r"TensorRT needs an NVIDIA GPU"):
        TrtRunner(artifact, engines=engines).activate()  # given engines, still no GPU to run them on
    install_fake_gpu(monkeypatch)
    with pytest.raises(TcgraphError, match=r"got device 'cuda:3', but this machine has 1 CUDA device\(s\)"):
        TrtRunner(artifact, device="cuda:3").activate()


def test_a_failing_load_leaves_nothing_behind(artifact, engines, log):
    def load():
        raise TcgraphError("the loader refused")

    runner = CpuTrtRunner(artifact, engines=load)
    with pytest.raises(TcgraphError, match="the loader refused"):
        runner.activate()
    assert not runner.is_active and runner._engines == {} and runner._bank is None
    partial = LoadedEngines({k: v for k, v in engines.engines.items() if k != "v2"})
    with pytest.raises(TcgraphError, match=r"got no engine for variants \['v2'\]; it got \['v0', 'v1'\]"):
        CpuTrtRunner(artifact, engines=partial).activate()


#################################################################################
#                       Data flow, against stand-in engines                     #
#################################################################################


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["enqueue", "graphs"])
def test_outputs_equal_the_graphs(artifact, variants, engines, cuda_graphs):
    with CpuTrtRunner(artifact, cuda_graphs=cuda_graphs, engines=engines) as runner:
        for vid, variant in variants.items():
            feeds = dict(variant.example_inputs)
            if vid == "v0":
                feeds = {k: v.numpy() for k, v in feeds.items()}  # numpy feeds are copied in too
            got = runner.run(vid, feeds)
            want = _reference(variant)
            assert list(got) == variant.output_names  # by logical name, `cache.0.attn` not `.new`
            # (the stand-in graphs replay the engine only, not the scratch->bank copy, so compare
            # the aliased cache of `reuse` in the enqueue mode only)
            names = ["out"] if cuda_graphs and vid == "v2" else variant.output_names
            for name in names:
                assert (runner.to_torch(got[name]) - want[name]).abs().max() <= 1e-6, (vid, name)


def test_engines_as_a_plain_dict_or_a_loader(artifact, variants, engines):
    for given in (dict(engines.engines), lambda: engines):
        with CpuTrtRunner(artifact, cuda_graphs=False, engines=given) as runner:
            got = runner.run("v1", dict(variants["v1"].example_inputs))
            assert (got["out"] - _reference(variants["v1"])["out"]).abs().max() <= 1e-6


def test_addresses_are_fixed_and_caches_live_in_the_bank(artifact, engines):
    with CpuTrtRunner(artifact, cuda_graphs=False, engines=engines) as runner:
        bank, static = runner._bank, runner._static
        ptr = {name: t.data_ptr() for name, t in static.items()}
        for vid, context in runner._contexts.items():
            for name in ("x", "t", "y", "out"):  # one set of buffers for every variant
                assert context.addresses[name] == ptr[name], (vid, name)
        assert set(bank.buffers) == {CACHE}
        assert runner._contexts["v1"].addresses[CACHE] == bank[CACHE].data_ptr()  # written in place
        reuse = runner._contexts["v2"].addresses
        assert reuse[CACHE] == bank[CACHE].data_ptr()  # read from the bank...
        scratch = runner._scratch["v2"][CACHE]
        assert reuse[CACHE + ".new"] == scratch.data_ptr() != bank[CACHE].data_ptr()  # ...rewritten via scratch
        assert runner._scratch["v0"] == {} and runner._scratch["v1"] == {}


@pytest.mark.parametrize("share", [True, False], ids=["shared", "own"])
def test_contexts_share_one_block_of_activation_memory(artifact, variants, engines, log, share):
    """Runs never overlap (one stream), so one block as large as the largest context's
    needs serves every variant; the outputs stay those of the graphs."""
    with CpuTrtRunner(artifact, share_activations=share, cuda_graphs=False, engines=engines) as runner:
        sizes = [engine.device_memory_size_v2 for engine in runner._engines.values()]
        assert len(set(sizes)) > 1  # the stand-in engines need different amounts
        if share:
            assert log.strategies == ["USER_MANAGED"] * 3
            assert runner.activation_bytes == max(sizes)
            block = runner._activations.data_ptr()
            assert [c.device_memory for c in runner._contexts.values()] == [(block, n) for n in sizes]
        else:
            assert log.strategies == [None] * 3
            assert runner.activation_bytes == sum(sizes)
            assert all(c.device_memory is None for c in runner._contexts.values())
        for vid, variant in variants.items():
            got = runner.run(vid, dict(variant.example_inputs))
            for name, want in _reference(variant).items():
                assert (got[name].cpu() - want).abs().max() <= 1e-5, (vid, name)


def test_without_a_user_managed_strategy_contexts_own_their_memory(artifact, engines, log):
    with CpuTrtRunner(artifact, cuda_graphs=False, engines=LoadedEngines(engines.engines)) as runner:
        assert log.strategies == [None] * 3 and runner._activations is None


def test_caches_fed_back_are_not_copied(artifact, variants, engines):
    fill, reuse = variants["v1"], variants["v2"]
    feeds = {k: v for k, v in reuse.example_inputs.items() if k != CACHE}
    with CpuTrtRunner(artifact, cuda_graphs=False, engines=engines) as runner:
        first = runner.run("v1", dict(fill.example_inputs))
        cache = first[CACHE]
        assert cache is runner._bank[CACHE]
        version = cache._version  # counts in-place writes by torch (the engine writes behind its back)
        second = runner.run("v2", {**feeds, CACHE: cache})
        assert second[CACHE] is cache and second["out"] is first["out"]  # same buffers, every step
        assert cache._version == version + 1  # only the scratch->bank copy; the feed itself was not copied
        want = _reference(reuse, {**feeds, CACHE: _reference(fill)[CACHE]})
        assert (second["out"] - want["out"]).abs().max() <= 1e-6
        assert (second[CACHE] - want[CACHE]).abs().max() <= 1e-6
        # a cache made elsewhere is copied in (once), with the same result
        outside = want[CACHE].clone()
        third = runner.run("v2", {**feeds, CACHE: outside})
        assert cache._version == version + 3
        want_again = _reference(reuse, {**feeds, CACHE: outside})
        assert (third[CACHE] - want_again[CACHE]).abs().max() <= 1e-6


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["enqueue", "graphs"])
def test_graphs_are_captured_once_at_activation(artifact, variants, engines, log, cuda_graphs):
    ids = ["v0", "v1", "v2"]
    with CpuTrtRunner(artifact, cuda_graphs=cuda_graphs, engines=engines) as runner:
        # a warm-up enqueue per variant, then (with graphs) one capture per variant
        assert log.executions == ids + (ids if cuda_graphs else [])
        assert sorted(runner._graphs) == (sorted(ids) if cuda_graphs else [])
        log.executions.clear()
        for vid in ("v1", "v2", "v2", "v0"):
            runner.run(vid, dict(variants[vid].example_inputs))
        if cuda_graphs:
            assert log.executions == []  # runs only replay: nothing is enqueued or captured lazily
            assert {vid: g.replays for vid, g in runner._graphs.items()} == {"v0": 1, "v1": 1, "v2": 2}
        else:
            assert log.executions == ["v1", "v2", "v2", "v0"]
    assert runner._graphs == {} and runner._contexts == {} and runner._engines == {}
    assert runner._bank is None and runner._static == {} and runner._stream is None


def test_dispatcher_runs_a_schedule(artifact, variants, engines):
    schedule = ["v1", "v2", "v2", "v0", "v1", "v2"]
    io = {vid: (v.input_names, v.output_names) for vid, v in variants.items()}
    reference = ScheduleDispatcher(schedule, io, graph_runner({k: v.gm for k, v in variants.items()}, io))
    ex = variants["v0"].example_inputs
    with CpuTrtRunner(artifact, cuda_graphs=False, engines=engines) as runner:
        dispatch = ScheduleDispatcher.for_runner(runner, schedule)
        x = ex["x"]
        for step in range(len(schedule)):
            got = dispatch(step, x, ex["t"], ex["y"]).clone()  # `out` is the runner's buffer: consume it first
            want = reference(step, x, ex["t"], ex["y"])
            assert (got - want).abs().max() <= 1e-5, step
            x = x - 0.1 * want  # a sampler-like update, so every step sees new inputs
    assert dispatch.calls == schedule


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
    write_artifact(out, **tiny_artifact_args(tiny_dit()), variants=list(variants.values()),
                   engines=functools.partial(build_engines, precision="fp16", strip_weights=request.param))
    return load_artifact(out)


def _cuda(feeds: dict) -> dict:
    return {k: v.cuda() for k, v in feeds.items()}


@needs_real_tensorrt
@pytest.mark.parametrize("cuda_graphs", [True, False], ids=["graphs", "enqueue"])
def test_real_outputs_match_the_graphs(real_artifact, variants, cuda_graphs):
    fill, reuse = variants["v1"], variants["v2"]
    feeds = {k: v for k, v in reuse.example_inputs.items() if k != CACHE}
    with TrtRunner(real_artifact, cuda_graphs=cuda_graphs) as runner:
        for vid, variant in variants.items():
            got = runner.run(vid, _cuda(variant.example_inputs))
            want = _reference(variant)
            for name in variant.output_names:
                assert got[name].is_cuda and _close(got[name], want[name]), (vid, name)
        # caches chained on the device: fill -> reuse -> reuse, vs the graphs chained the same way
        cache = runner.run("v1", _cuda(fill.example_inputs))[CACHE]
        ptr = cache.data_ptr()
        want = _reference(reuse, {**feeds, CACHE: _reference(fill)[CACHE]})
        second = runner.run("v2", {**_cuda(feeds), CACHE: cache})
        assert second[CACHE].data_ptr() == ptr  # the same device buffer: no copy, no new tensor
        assert _close(second["out"], want["out"]) and _close(second[CACHE], want[CACHE])
        want = _reference(reuse, {**feeds, CACHE: want[CACHE]})
        third = runner.run("v2", {**_cuda(feeds), CACHE: second[CACHE]})
        assert third[CACHE].data_ptr() == ptr
        assert _close(third["out"], want["out"]) and _close(third[CACHE], want[CACHE])


@needs_real_tensorrt
def test_real_dispatcher(real_artifact, variants):
    schedule = ["v1", "v2", "v0", "v1", "v2"]
    io = {vid: (v.input_names, v.output_names) for vid, v in variants.items()}
    reference = ScheduleDispatcher(schedule, io, graph_runner({k: v.gm for k, v in variants.items()}, io))
    ex = variants["v0"].example_inputs
    with TrtRunner(real_artifact) as runner:
        dispatch = ScheduleDispatcher.for_runner(runner, schedule)
        for step in range(len(schedule)):
            got = dispatch(step, ex["x"].cuda(), ex["t"].cuda(), ex["y"].cuda())
            assert _close(got, reference(step, ex["x"], ex["t"], ex["y"])), step
