"""OrtRunner: same numbers as the fx graphs, shared weights, caches kept as OrtValues, clear feed errors."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from tests.export.tiny_variants import BATCH

from tcgraph.errors import TcgraphError
from tcgraph.export import read_external_initializers
from tcgraph.runtime import make_runner
from tcgraph.runtime.ort import OrtRunner, SessionsFromArtifact


@pytest.fixture(scope="module", params=["one", "shared", "plain"])
def runner(request, artifact):
    """The default (one session for all variants), and one session per variant with and without shared weights."""
    options = {"one": {}, "shared": {"one_session": False}, "plain": {"one_session": False, "share_weights": False}}
    with OrtRunner(artifact, intra_op_threads=1, **options[request.param]) as r:
        yield r


def _reference(variant, feeds=None):
    feeds = feeds or variant.example_inputs
    with torch.no_grad():
        out = variant.gm(*(feeds[n] for n in variant.input_names))
    return dict(zip(variant.output_names, out if isinstance(out, tuple) else (out,)))


def test_outputs_equal_the_graphs(runner, variants):
    assert runner.variant_ids() == ["v0", "v1", "v2"]
    for vid, variant in variants.items():
        got = runner.run(vid, {k: v.numpy() for k, v in variant.example_inputs.items()})
        want = _reference(variant)
        assert list(got) == variant.output_names  # by logical name, `cache.0.attn` not `.new`
        for name, value in got.items():
            assert isinstance(value, ort.OrtValue)
            assert (runner.to_torch(value) - want[name]).abs().max() <= 1e-4


def test_torch_feeds_work(runner, variants):
    variant = variants["v0"]
    got = runner.run("v0", dict(variant.example_inputs))
    assert (runner.to_torch(got["out"]) - _reference(variant)["out"]).abs().max() <= 1e-4


def test_cache_ortvalue_feeds_the_next_step(runner, variants):
    fill, reuse = variants["v1"], variants["v2"]
    first = runner.run("v1", dict(fill.example_inputs))
    cache = first["cache.0.attn"]
    feeds = {k: v for k, v in reuse.example_inputs.items() if k != "cache.0.attn"}
    as_value = runner.run("v2", {**feeds, "cache.0.attn": cache})
    as_numpy = runner.run("v2", {**feeds, "cache.0.attn": runner.to_torch(cache).numpy().copy()})
    for name in ("out", "cache.0.attn"):
        assert np.array_equal(as_value[name].numpy(), as_numpy[name].numpy())
    # and both equal the eager graphs chained the same way
    want = _reference(reuse, {**feeds, "cache.0.attn": _reference(fill)["cache.0.attn"]})
    assert (runner.to_torch(as_value["out"]) - want["out"]).abs().max() <= 1e-4
    # a cache that a variant reads and rewrites goes round again under the same name
    again = runner.run("v2", {**feeds, "cache.0.attn": as_value["cache.0.attn"]})
    want_again = _reference(reuse, {**feeds, "cache.0.attn": want["cache.0.attn"]})
    assert (runner.to_torch(again["cache.0.attn"]) - want_again["cache.0.attn"]).abs().max() <= 1e-4


def test_to_torch_is_zero_copy_on_cpu(runner, variants):
    got = runner.run("v0", dict(variants["v0"].example_inputs))["out"]
    tensor = runner.to_torch(got)
    assert tensor.data_ptr() == got.data_ptr()
    assert tensor.shape == (BATCH, 1, 16, 16) and tensor.dtype == torch.float32


def test_shared_weights_are_created_once(artifact):
    names = set()
    for vid in artifact.variant_ids():
        names |= set(read_external_initializers(artifact.variant_path(vid)))
    loader = SessionsFromArtifact(artifact, share_weights=True, intra_op_threads=1, one_session=False)
    with OrtRunner(artifact, sessions=loader) as r:
        assert set(loader._shared) == names  # one OrtValue per tensor of weights.bin, for all sessions
        mapped = loader._weights_map
        for name, value in loader._shared.items():  # views of the mapped file, not copies
            assert mapped.ctypes.data <= value.data_ptr() < mapped.ctypes.data + mapped.size
    assert loader._shared == {} and loader._weights_map is None and r._sessions == {}
    loader = SessionsFromArtifact(artifact, share_weights=False, intra_op_threads=1, one_session=False)
    with OrtRunner(artifact, sessions=loader):
        assert loader._shared == {}


def test_injected_sessions(artifact, variants):
    """Polygraphy-style loaders: a loader is a cheap callable; the runner runs the sessions it is given."""
    loader = SessionsFromArtifact(artifact, intra_op_threads=1)
    assert loader._shared == {}  # nothing loaded before it is called
    sessions = loader()
    with OrtRunner(artifact, sessions=sessions) as r:
        assert r._sessions == sessions
        got = r.run("v0", dict(variants["v0"].example_inputs))
        assert (r.to_torch(got["out"]) - _reference(variants["v0"])["out"]).abs().max() <= 1e-4
    with pytest.raises(TcgraphError, match=r"got no session for variants \['v2'\]"):
        OrtRunner(artifact, sessions={k: v for k, v in sessions.items() if k != "v2"}).activate()
    with pytest.raises(TcgraphError, match=r"got sessions and the session options \['share_weights'\]"):
        OrtRunner(artifact, sessions=sessions, share_weights=False)


def test_feed_checks(runner, variants):
    feeds = {k: v.numpy() for k, v in variants["v0"].example_inputs.items()}
    with pytest.raises(TcgraphError, match=r"unknown variant 'v7'; this artifact has variants v0, v1, v2"):
        runner.run("v7", feeds)
    with pytest.raises(TcgraphError, match=r"variant v0: missing inputs \['y'\]; it takes exactly \['x', 't', 'y'\]"):
        runner.run("v0", {k: v for k, v in feeds.items() if k != "y"})
    with pytest.raises(TcgraphError, match=r"unknown inputs \['cache.0.attn'\]"):
        runner.run("v0", {**feeds, "cache.0.attn": np.zeros((2, 64, 128), np.float32)})
    wrong_batch = np.zeros((4, 1, 16, 16), np.float32)
    with pytest.raises(TcgraphError, match=r"input x of variant v0 expects shape \[2,1,16,16\], got \[4,1,16,16\]; "
                                           r"this artifact was built for batch 2"):
        runner.run("v0", {**feeds, "x": wrong_batch})
    with pytest.raises(TcgraphError, match=r"expects shape \[2,1,16,16\], got \[2,1,8,8\]; .*static shapes"):
        runner.run("v0", {**feeds, "x": torch.zeros(2, 1, 8, 8)})
    with pytest.raises(TcgraphError, match=r"input t of variant v0 expects dtype int64, got int32"):
        runner.run("v0", {**feeds, "t": feeds["t"].astype(np.int32)})
    with pytest.raises(TcgraphError, match=r"input y of variant v0 is a list"):
        runner.run("v0", {**feeds, "y": [3, 10]})
    # a backend value of the wrong shape is caught too
    cache = runner.run("v1", feeds)["cache.0.attn"]
    with pytest.raises(TcgraphError, match=r"input x of variant v0 expects shape \[2,1,16,16\], got \[2,64,128\]"):
        runner.run("v0", {**feeds, "x": cache})


def test_lifecycle_and_options(artifact):
    r = make_runner("ort", artifact, intra_op_threads=1)
    assert isinstance(r, OrtRunner) and not r.is_active
    with pytest.raises(TcgraphError, match="not active; call activate"):
        r.run("v0", {})
    with pytest.raises(TcgraphError, match="unknown backend 'nope'; available backends: ort"):
        make_runner("nope", artifact)
    valid = "valid options: providers, share_weights, intra_op_threads"
    with pytest.raises(TcgraphError, match=r"unknown options \[.fast.\]; " + valid):
        OrtRunner(artifact, fast=True)
    with pytest.raises(TcgraphError, match="not available in this onnxruntime"):
        OrtRunner(artifact, providers=["NoSuchExecutionProvider"]).activate()
