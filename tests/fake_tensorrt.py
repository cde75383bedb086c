"""A stand-in for the `tensorrt` module's build and load path, and the marks for tests that need the real one.

`fake_tensorrt()` records what the builder was asked (flags, workspace, the timing cache,
the ONNX paths) and writes JSON plans whose engines report their I/O tensors, so that
the loader (`EnginesFromArtifact`: deserialize, refit, check I/O) can read them back;
`install_fake_gpu` fakes the `torch.cuda` device queries. tests/runtime/trt/test_build.py
drives `build_engines` with them, tests/runtime/trt/test_loader.py the loader. The runner
needs none of this: tests/runtime/trt/stand_ins.py hands it stand-in engines directly.
Tests marked with `needs_real_tensorrt` build real engines and skip, with the reason,
where TensorRT or a CUDA GPU is missing.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import onnx
import pytest
import torch

from tcgraph.errors import TcgraphError
from tcgraph.runtime.trt.build import build_engines
from tcgraph.runtime.trt.common import import_tensorrt

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


def fake_tensorrt(version: str = FAKE_VERSION, *, precision_flags: bool = True) -> types.ModuleType:
    """A module that answers the TensorRT 10 calls tcgraph makes, on the CPU.

    Attributes the tests set or read: `parse_errors`, `refit_fails`, `corrupt` (variant
    id -> (tensor, shape) an engine reports wrongly), `builders`, `timing_caches`, `refits`.
    """
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.__file__ = "<fake tensorrt>"
    trt.parse_errors, trt.refit_fails, trt.corrupt = [], False, {}
    trt.builders, trt.timing_caches, trt.refits = [], [], []

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
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="USER_MANAGED")
    trt.DataType = types.SimpleNamespace(**{n: _Member(n) for n in _NP_TO_TRT.values()})
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

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    trt.Refitter, trt.OnnxParserRefitter = Refitter, OnnxParserRefitter
    return trt


def install_fake_gpu(monkeypatch, *, available: bool = True, gpu: dict = FAKE_GPU) -> None:
    """Make the torch.cuda device queries answer like one GPU `gpu` (or none)."""
    major, minor = gpu["compute_capability"].split(".")
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: available)
    monkeypatch.setattr(cuda, "get_device_name", lambda device=None: gpu["name"])
    monkeypatch.setattr(cuda, "get_device_capability", lambda device=None: (int(major), int(minor)))
    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda, "device_count", lambda: 1)


def fake_engines(trt, **options):
    """An `engines=` callable for write_artifact: build_engines with `trt`, torch.cuda faked only
    meanwhile (the ONNX exporter must see the real torch.cuda)."""

    def build(root, entries, **more):
        with pytest.MonkeyPatch.context() as mp:
            mp.setitem(sys.modules, "tensorrt", trt)
            install_fake_gpu(mp)
            return build_engines(root, entries, **options, **more)

    return build


def fake_section(**changes) -> dict:
    section = {"tensorrt_version": FAKE_VERSION, "device": dict(FAKE_GPU), "precision": "fp16",
               "weight_stripped": False, "timing_cache": "engines/timing.cache", "engines": {}}
    section.update(changes)
    return section
