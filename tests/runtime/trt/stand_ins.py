"""Stand-in engines for TrtRunner, handed to it directly (`TrtRunner(art, engines=...)`), and a
CPU stand-in for the few torch.cuda calls it makes (streams, CUDA graphs).

A stand-in engine runs its variant's fx graph on the CPU on the memory at the addresses
the runner bound, so a wrong binding, a missing copy or an extra copy shows up in the
numbers. Nothing of TensorRT is faked here: the runner only calls the engines and
contexts it is given.
"""
from __future__ import annotations

import contextlib
import ctypes
import math

import torch

from tcgraph.export.specs import VariantSpec
from tcgraph.runtime.trt import LoadedEngines, TrtRunner

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


class Log:
    """What the stand-ins saw: engine executions (variant ids), context allocation strategies,
    and the CUDA graph being captured."""

    def __init__(self):
        self.executions: list[str] = []
        self.strategies: list = []
        self.capturing = None


def view_at(address: int, shape, dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor over the memory at `address` (what an engine reads and writes there)."""
    count = math.prod(shape)
    raw = (ctypes.c_char * (count * torch.empty((), dtype=dtype).element_size())).from_address(address)
    return torch.frombuffer(raw, dtype=dtype, count=count).view(list(shape))


class StandInEngine:
    """What TrtRunner asks of an engine: its activation memory and execution contexts."""

    def __init__(self, spec: VariantSpec, program, log: Log):
        self.spec, self.program, self.log = spec, program, log
        self.inputs = [(i.name, i.shape, i.dtype) for i in spec.inputs]
        self.outputs = [(o.onnx_name, o.shape, o.dtype) for o in spec.outputs]
        self.device_memory_size_v2 = 1024 * (1 + len(self.inputs) + len(self.outputs))  # differs per variant

    def create_execution_context(self, strategy=None):
        self.log.strategies.append(strategy)
        return StandInContext(self)


class StandInContext:
    def __init__(self, engine: StandInEngine):
        self.engine, self.addresses, self.device_memory = engine, {}, None

    def set_device_memory(self, address, size):
        self.device_memory = (address, size)

    def set_tensor_address(self, name, address):
        if name not in {n for n, _, _ in (*self.engine.inputs, *self.engine.outputs)}:
            return False
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream):
        log = self.engine.log
        log.executions.append(self.engine.spec.id)
        if log.capturing is not None:  # recorded into the graph, run on replay
            log.capturing.ops.append(self)
            return True
        return self.execute()

    def execute(self) -> bool:
        view = {name: view_at(self.addresses[name], shape, _DTYPES[dtype])
                for name, shape, dtype in (*self.engine.inputs, *self.engine.outputs)}
        with torch.no_grad():
            result = self.engine.program(*(view[n] for n, _, _ in self.engine.inputs))
        result = result if isinstance(result, tuple) else (result,)
        for (name, _, _), value in zip(self.engine.outputs, result):
            view[name].copy_(value)
        return True


def stand_in_engines(artifact, programs: dict, log: Log, *, user_managed="USER_MANAGED") -> LoadedEngines:
    """One stand-in engine per variant of `artifact`, running `programs[vid]`."""
    return LoadedEngines({v.id: StandInEngine(v, programs[v.id], log) for v in artifact.variants}, user_managed)


class CpuTrtRunner(TrtRunner):
    """TrtRunner whose buffers live on the CPU: only for stand-in engines and `install_cpu_cuda`."""

    def _cuda_device(self) -> torch.device:
        return torch.device("cpu")


def install_cpu_cuda(monkeypatch, log: Log) -> None:
    """Make the torch.cuda streams and graphs TrtRunner uses run on the CPU (graphs replay the
    engine executions recorded while capturing)."""

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
        log.capturing = g
        try:
            yield
        finally:
            log.capturing = None

    cuda = torch.cuda
    monkeypatch.setattr(cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(cuda, "Stream", Stream)
    monkeypatch.setattr(cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(cuda, "graph", graph)
    monkeypatch.setattr(cuda, "graph_pool_handle", lambda: object())
