"""TensorRT engines: `check_engines`, the clear errors, and `build_engines`.

Everywhere: `check_engines` on numbers, the one clear error of `import_tensorrt` and
`build_engines`, and `build_engines` driven against `fake_tensorrt()`, a stand-in for
the `tensorrt` module that records what the builder was asked (flags, workspace, the
timing cache, the ONNX paths) and writes plans that its runtime executes on the CPU
with the variants' fx graphs (tests/runtime/test_trt.py runs TrtRunner on them).
Tests marked `tensorrt` build real engines; they skip where TensorRT or a CUDA GPU is
missing.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import shutil
import sys
import types
from pathlib import Path

import onnx
import pytest
import torch
from tests.export.tiny_variants import dit_variants, tiny_dit

from tcgraph.errors import TcgraphError
from tcgraph.export import load_artifact, write_artifact
from tcgraph.export.onnx import export_variants
from tcgraph.export.tensorrt import build_engines, check_engines, import_tensorrt, keep_sinusoids_fp32, release

FAKE_GPU = {"name": "Fake GPU 80GB", "compute_capability": "9.0"}
FAKE_VERSION = "10.3.0.26"


def _real_tensorrt() -> str | None:
    """None where real engines can be built here, else why not."""
    try:
        import_tensorrt()
    except TcgraphError as e:
        return f"needs TensorRT 10 with its builder ({str(e).split(';')[0]})"
    if not torch.cuda.is_available():
        return "needs an NVIDIA GPU visible to torch (torch.cuda.is_available() is False)"
    return None


REAL_TRT_MISSING = _real_tensorrt()


def needs_real_tensorrt(test):
    """Mark a test `gpu` + `tensorrt` and skip it, with the reason, where real engines cannot be built."""
    skip = pytest.mark.skipif(REAL_TRT_MISSING is not None, reason=REAL_TRT_MISSING or "")
    return pytest.mark.gpu(pytest.mark.tensorrt(skip(test)))


#################################################################################
#                         A stand-in for `tensorrt`                             #
#################################################################################

_NP_TO_TRT = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int64": "INT64", "int32": "INT32",
              "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}
_TRT_TO_TORCH = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
                 "INT32": torch.int32, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}


class _Member:
    """Like a member of a pybind11 enum: has a `.name`."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"DataType.{self.name}"


class FakeTensor:
    def __init__(self, name: str, dtype, is_execution_tensor: bool = True):
        self.name, self.dtype, self.is_execution_tensor = name, dtype, is_execution_tensor


class FakeLayer:
    """An ILayer of a network definition: records the precision asked for."""

    def __init__(self, name: str, type: str, inputs: list, outputs: list, op: str | None = None):
        self.name, self.type, self.op = name, type, op
        self.inputs, self.outputs = inputs, outputs
        self.precision, self.output_types = None, {}

    @property
    def num_inputs(self):
        return len(self.inputs)

    def get_input(self, k):
        return self.inputs[k]

    @property
    def num_outputs(self):
        return len(self.outputs)

    def get_output(self, j):
        return self.outputs[j]

    def set_output_type(self, j, dtype):
        self.output_types[j] = dtype


def timestep_network(trt) -> tuple[list[FakeTensor], list[FakeLayer]]:
    """The layers of a DiT's sinusoidal timestep embedding, and a Sin of `x` beside them:

    t (int64) -> Shuffle (int64) -> Cast -> Mul(freqs) -> Sin, Cos;  x -> Abs -> Sin
    """
    f32, i64 = trt.DataType.FLOAT, trt.DataType.INT64
    x, t = FakeTensor("x", f32), FakeTensor("t", i64)
    t2, tf = FakeTensor("t2", i64), FakeTensor("tf", f32)
    freqs, args = FakeTensor("freqs", f32), FakeTensor("args", f32)
    abs_x = FakeTensor("abs_x", f32)
    layers = [
        FakeLayer("unsqueeze", "SHUFFLE", [t], [t2]),
        FakeLayer("cast", "CAST", [t2], [tf]),
        FakeLayer("freqs", "CONSTANT", [], [freqs]),
        FakeLayer("mul", "ELEMENTWISE", [tf, freqs], [args]),
        FakeLayer("sin", "UNARY", [args], [FakeTensor("sin", f32)], op="SIN"),
        FakeLayer("cos", "UNARY", [args], [FakeTensor("cos", f32)], op="COS"),
        FakeLayer("abs", "UNARY", [x], [abs_x], op="ABS"),
        FakeLayer("sin_x", "UNARY", [abs_x], [FakeTensor("sin_x", f32)], op="SIN"),
    ]
    return [x, t], layers


def view_at(address: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor over the memory at `address` (what an engine reads and writes there)."""
    count = math.prod(shape)
    raw = (ctypes.c_char * (count * torch.empty((), dtype=dtype).element_size())).from_address(address)
    return torch.frombuffer(raw, dtype=dtype, count=count).view(shape)


def fake_tensorrt(version: str = FAKE_VERSION, *, precision_flags: bool = True) -> types.ModuleType:
    """A module that answers the TensorRT 10 calls tcgraph makes, on the CPU.

    Attributes the tests set or read: `programs` (variant id -> fx graph the "engine"
    runs), `parse_errors`, `refit_fails`, `corrupt` (variant id -> (tensor, shape) an
    engine reports wrongly), `builders`, `timing_caches`, `executions`, `refits`.
    """
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.__file__ = "<fake tensorrt>"
    trt.programs, trt.parse_errors, trt.refit_fails, trt.corrupt = {}, [], False, {}
    trt.builders, trt.timing_caches, trt.executions, trt.refits = [], [], [], []
    trt.capturing = None  # the fake CUDA graph being captured, if any

    class Logger:
        WARNING = "WARNING"

        def __init__(self, severity):
            self.severity = severity

    names = ["REFIT", "REFIT_IDENTICAL", "STRIP_PLAN"]
    names += ["FP16", "BF16", "PREFER_PRECISION_CONSTRAINTS"] if precision_flags else []
    trt.Logger = Logger
    trt.BuilderFlag = types.SimpleNamespace(**{n: n for n in names})
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT")
    trt.DataType = types.SimpleNamespace(**{n: _Member(n) for n in _TRT_TO_TORCH})
    trt.float32, trt.float16 = trt.DataType.FLOAT, trt.DataType.HALF
    trt.LayerType = types.SimpleNamespace(**{n: n for n in ("UNARY", "CONSTANT", "CAST", "ELEMENTWISE", "SHUFFLE")})
    trt.UnaryOperation = types.SimpleNamespace(SIN="SIN", COS="COS", ABS="ABS")
    trt.IUnaryLayer = FakeLayer

    class TimingCache:
        def __init__(self, data: bytes):
            self.builds = 0

        def serialize(self) -> bytes:
            return f"fake timing cache after {self.builds} builds".encode()

    class Config:
        def __init__(self):
            self.flags, self.pools, self.timing_cache = set(), {}, None

        def set_flag(self, flag):
            self.flags.add(flag)

        def set_memory_pool_limit(self, pool, size):
            self.pools[pool] = size

        def create_timing_cache(self, data):
            cache = TimingCache(data)
            trt.timing_caches.append(cache)
            return cache

        def set_timing_cache(self, cache, ignore_mismatch):
            self.timing_cache = cache
            return True

    class Network:
        def __init__(self, flags):
            self.flags, self.path, self.inputs, self.layers = flags, None, [], []

        def __iter__(self):
            return iter(self.layers)

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, k):
            return self.inputs[k]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, []

        def parse_from_file(self, path):
            if trt.parse_errors:
                self.errors = list(trt.parse_errors)
                return False
            self.network.path = path
            self.network.inputs, self.network.layers = timestep_network(trt)
            return True

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, k):
            return self.errors[k]

    class Builder:
        def __init__(self, logger):
            self.builds = []  # (onnx path, config) per build
            trt.builders.append(self)

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def build_serialized_network(self, network, config):
            self.builds.append((network.path, config))
            config.timing_cache.builds += 1
            model = onnx.load(network.path, load_external_data=False)
            io = []
            for mode, values in (("INPUT", model.graph.input), ("OUTPUT", model.graph.output)):
                for v in values:
                    t = v.type.tensor_type
                    dtype = str(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
                    io.append([v.name, mode, [d.dim_value for d in t.shape.dim], _NP_TO_TRT[dtype]])
            plan = {"id": Path(network.path).stem, "stripped": "STRIP_PLAN" in config.flags,
                    "flags": sorted(config.flags), "io": io}
            return json.dumps(plan).encode()

    class Engine:
        def __init__(self, plan: dict):
            self.plan, self.refitted_from = plan, None
            self.io = {name: (mode, shape, dtype) for name, mode, shape, dtype in plan["io"]}
            if plan["id"] in trt.corrupt:
                name, shape = trt.corrupt[plan["id"]]
                self.io[name] = (self.io[name][0], shape, self.io[name][2])
            self.names = list(self.io)

        @property
        def num_io_tensors(self):
            return len(self.names)

        def get_tensor_name(self, k):
            return self.names[k]

        def get_tensor_mode(self, name):
            return getattr(trt.TensorIOMode, self.io[name][0])

        def get_tensor_dtype(self, name):
            return getattr(trt.DataType, self.io[name][2])

        def get_tensor_shape(self, name):
            return tuple(self.io[name][1])

        def create_execution_context(self):
            return Context(self)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            try:
                return Engine(json.loads(bytes(data)))
            except ValueError:
                return None

    class Refitter:
        def __init__(self, engine, logger):
            self.engine, self.loaded = engine, None

        def get_missing_weights(self):
            return [] if self.loaded else ["blocks.0.attn.qkv.weight"]

        def refit_cuda_engine(self):
            self.engine.refitted_from = self.loaded
            return self.loaded is not None

    class OnnxParserRefitter:
        def __init__(self, refitter, logger):
            self.refitter, self.errors = refitter, []

        def refit_from_file(self, path):
            trt.refits.append(path)
            if trt.refit_fails:
                self.errors = ["weights differ from the engine's"]
                return False
            self.refitter.loaded = path
            return True

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, k):
            return self.errors[k]

    class Context:
        def __init__(self, engine):
            self.engine, self.addresses = engine, {}

        def set_tensor_address(self, name, address):
            if name not in self.engine.io:
                return False
            self.addresses[name] = address
            return True

        def execute_async_v3(self, stream):
            trt.executions.append(self.engine.plan["id"])
            if trt.capturing is not None:  # recorded into the graph, run on replay
                trt.capturing.ops.append(self)
                return True
            return self.execute()

        def execute(self) -> bool:
            if self.engine.plan["stripped"] and self.engine.refitted_from is None:
                return False  # a weight-stripped engine has no weights until refitted
            views = {name: view_at(self.addresses[name], shape, _TRT_TO_TORCH[dtype])
                     for name, (mode, shape, dtype) in self.engine.io.items()}
            inputs = [views[n] for n, (mode, _, _) in self.engine.io.items() if mode == "INPUT"]
            outputs = [n for n, (mode, _, _) in self.engine.io.items() if mode == "OUTPUT"]
            with torch.no_grad():
                result = trt.programs[self.engine.plan["id"]](*inputs)
            result = result if isinstance(result, tuple) else (result,)
            for name, value in zip(outputs, result):
                views[name].copy_(value)
            return True

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    trt.Refitter, trt.OnnxParserRefitter = Refitter, OnnxParserRefitter
    return trt


def install_fake_cuda(monkeypatch, trt, *, available: bool = True, gpu: dict = FAKE_GPU) -> None:
    """Make torch.cuda answer like one GPU `gpu`, with streams and graphs that run on the CPU."""

    class Stream:
        cuda_stream = 0

        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, other):
            pass

        def synchronize(self):
            pass

    class Graph:
        def __init__(self):
            self.ops, self.replays = [], 0

        def replay(self):
            self.replays += 1
            for op in self.ops:
                assert op.execute()

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None):
        trt.capturing = g
        try:
            yield
        finally:
            trt.capturing = None

    major, minor = gpu["compute_capability"].split(".")
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: available)
    monkeypatch.setattr(cuda, "get_device_name", lambda device=None: gpu["name"])
    monkeypatch.setattr(cuda, "get_device_capability", lambda device=None: (int(major), int(minor)))
    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda, "device_count", lambda: 1)
    monkeypatch.setattr(cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(cuda, "Stream", Stream)
    monkeypatch.setattr(cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(cuda, "graph", graph)
    monkeypatch.setattr(cuda, "graph_pool_handle", lambda: object())


def fake_engines(trt, **options):
    """An `engines=` callable for write_artifact: build_engines with `trt`, torch.cuda faked only
    meanwhile (the ONNX exporter must see the real torch.cuda)."""

    def build(root, entries):
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(sys.modules, "tensorrt", trt)
            install_fake_cuda(mp, trt)
            return build_engines(root, entries, **options)

    return build


def fake_section(**changes) -> dict:
    section = {"tensorrt_version": FAKE_VERSION, "device": dict(FAKE_GPU), "precision": "fp16",
               "weight_stripped": False, "timing_cache": "engines/timing.cache", "engines": {}}
    section.update(changes)
    return section


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
    install_fake_cuda(monkeypatch, trt, available=False)
    with pytest.raises(TcgraphError, match=r"TensorRT needs an NVIDIA GPU, and torch sees no CUDA device here"):
        build_engines(root, entries)
    assert not (root / "engines").exists()


#################################################################################
#                     build_engines against the stand-in                        #
#################################################################################


@pytest.fixture(scope="module")
def variants():
    torch.set_num_threads(1)
    return {v.id: v for v in dit_variants(tiny_dit())}


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
    install_fake_cuda(monkeypatch, trt)
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
    said = []
    section = build_engines(root, entries, precision=precision, progress=said.append)
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
    assert said == [f"building TensorRT engine {vid} ({i + 1}/3, {precision})" for i, vid in enumerate(ids)]
    assert sorted(p.name for p in (root / "engines").iterdir()) == sorted([f"{v}.plan" for v in ids] + ["timing.cache"])


def test_build_engines_weight_stripped_and_workspace(fake, onnx_folder):
    root, entries = onnx_folder
    said = []
    section = build_engines(root, entries, strip_weights=True, workspace_gib=1.5, progress=said.append)
    assert section["weight_stripped"] is True and section["precision"] == "fp16"
    for _, config in fake.builders[0].builds:
        assert config.flags == {"FP16", "PREFER_PRECISION_CONSTRAINTS", "STRIP_PLAN", "REFIT_IDENTICAL"}
        assert config.pools == {"WORKSPACE": 1610612736}  # 1.5 GiB in bytes
    assert said[0] == "building TensorRT engine full (1/3, fp16, weight-stripped)"


def test_build_engines_reports_parser_errors(fake, onnx_folder):
    root, entries = onnx_folder
    fake.parse_errors = ["In node 12 (Gelu): UNSUPPORTED_NODE"]
    with pytest.raises(TcgraphError, match=r"TensorRT 10\.3\.0\.26 cannot parse variant full \(full\.onnx\): "
                                           r"In node 12 \(Gelu\): UNSUPPORTED_NODE; .*`--backend ort`"):
        build_engines(root, entries)


def test_build_engines_without_precision_flags(monkeypatch, onnx_folder):
    trt = fake_tensorrt(version="11.0.0.1", precision_flags=False)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    install_fake_cuda(monkeypatch, trt)
    root, entries = onnx_folder
    with pytest.raises(TcgraphError, match=r"TensorRT 11\.0\.0\.1 has no BuilderFlag\.BF16 .*precision fp32"):
        build_engines(root, entries, precision="bf16")
    assert build_engines(root, entries, precision="fp32")["precision"] == "fp32"


def test_build_engines_refuses_missing_onnx(fake, tmp_path):
    with pytest.raises(TcgraphError, match=r"lacks \['variants/v0\.onnx'\]; export the variants first"):
        build_engines(tmp_path, [{"id": "v0", "file": "variants/v0.onnx"}])


def test_write_artifact_hashes_the_engines(tmp_path, variants):
    out = write_artifact(tmp_path / "art", model_config={"name": "tiny"}, plan={"steps": 1},
                         variants=[variants["full"]], engines=fake_engines(fake_tensorrt(), precision="fp16"))
    art = load_artifact(out)  # checks every hash, engine files included
    section = art.manifest["tensorrt"]
    size = (out / "engines/full.plan").stat().st_size
    assert section["engines"] == {"full": {"file": "engines/full.plan", "bytes": size}}
    assert {"engines/full.plan", "engines/timing.cache"} <= set(art.manifest["files"])
    (out / "engines/full.plan").write_bytes(b"{}")
    with pytest.raises(TcgraphError, match=r"hash mismatch: engines/full\.plan"):
        load_artifact(out)


#################################################################################
#                        Real TensorRT (GPU machines)                           #
#################################################################################


@needs_real_tensorrt
def test_real_engines_plain_and_weight_stripped(tmp_path, variants):
    import tensorrt as trt

    sizes = {}
    for strip in (False, True):
        out = write_artifact(tmp_path / f"art-{strip}", model_config={"name": "tiny"}, plan={"steps": 3},
                             variants=list(variants.values()),
                             engines=functools.partial(build_engines, precision="fp16", strip_weights=strip))
        art = load_artifact(out)
        section = art.manifest["tensorrt"]
        major, minor = torch.cuda.get_device_capability()
        assert section["tensorrt_version"] == trt.__version__
        assert section["device"] == {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
        assert section["weight_stripped"] is strip and section["precision"] == "fp16"
        assert set(section["engines"]) == {"full", "fill", "reuse"}
        for engine in section["engines"].values():
            assert engine["file"] in art.manifest["files"] and engine["bytes"] == (out / engine["file"]).stat().st_size
        assert (out / "engines/timing.cache").stat().st_size > 0
        sizes[strip] = sum(e["bytes"] for e in section["engines"].values())
    weights = (tmp_path / "art-False" / "variants/weights.bin").stat().st_size
    # plain engines each hold (fp16) copies of the weights; stripped ones hold (almost) none
    assert sizes[True] < sizes[False] and sizes[True] < weights
