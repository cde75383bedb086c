"""PyTorch runner: the variants' torch programs, on CPU or CUDA.

The GPU path where TensorRT is absent, and a reference on CPU. The programs come from a
loader (`ProgramsFromArtifact`: the folder's `torch.export` programs with the shared
weights mapped in, see loader.py), called on `activate`; pass `programs=` (a loader, or
a dict of callables `program(*inputs) -> tuple`) to run others.

CUDA graphs (default on CUDA): every cache lives in one device buffer per name
(`CacheBank`), and one CUDA graph per variant is captured at activation: it reads
`x`/`t`/`y` from static buffers and its caches from the bank, and writes `out` and its
cache outputs back into static memory. A run copies `x`/`t`/`y` in (device to device)
and replays; the caches it returns are the bank's own tensors, so feeding them to the
next step costs nothing. Without CUDA graphs (CPU, or `cuda_graphs=False`) each run
calls the program eagerly and caches are passed on as the tensors it returned.

Gated steps (a `torch.cond` in the program): captured under torch's control-flow dispatch modes
(`torch._higher_order_ops.cudagraph_conditional_nodes`), the decision becomes a conditional node of
the CUDA graph (CUDA >= 12.4), evaluated on the device at replay: no device-to-host copy per step.
Without CUDA graphs, torch evaluates the condition on the host (one sync per gated step); on the CPU
that costs nothing.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import Artifact
from tcgraph.names import OUT, T, is_cache, is_model_input, model_input_count
from tcgraph.runtime.bank import CacheBank, load_into, static_buffers, step_input_buffers, torch_dtype
from tcgraph.runtime.base import Runner
from tcgraph.runtime.torch.loader import ProgramsFromArtifact
from tcgraph.runtime.torch.precision import precision_dtype

Programs = dict[str, Callable] | Callable[[], dict[str, Callable]]


class TorchRunner(Runner):
    """Run artifact variants as PyTorch programs.

    Options:
        device: "cpu" (default) or "cuda" / "cuda:N".
        precision: fp32 | bf16 | fp16 (the words of the TensorRT engine precision); default
            fp32 on CPU, bf16 on CUDA.
        cuda_graphs: one CUDA graph per variant, captured at activation (default: on for CUDA;
            not available on CPU).
        compile: wrap each variant in `torch.compile` first (default False; the first run of
            each variant compiles, on CPU this needs a C++ compiler).
        programs: the programs to run, by variant id, or a loader returning them (default:
            `ProgramsFromArtifact(artifact, device=device, precision=precision)`).
    """

    name = "torch"

    def __init__(self, artifact: Artifact, *, device: str = "cpu", precision: str | None = None,
                 cuda_graphs: bool | None = None, compile: bool = False, programs: Programs | None = None,
                 **options: Any):
        super().__init__(artifact, **options)
        try:
            self._dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise TcgraphError(f"unknown device {device!r} for the torch backend; use 'cpu' or 'cuda'") from e
        if self._dev.type not in ("cpu", "cuda"):
            raise TcgraphError(f"the torch backend runs on 'cpu' or 'cuda', not {device!r}")
        self.precision = precision if precision is not None else ("bf16" if self._dev.type == "cuda" else "fp32")
        self.dtype = precision_dtype(self.precision)
        if cuda_graphs is None:
            cuda_graphs = self._dev.type == "cuda"
        if cuda_graphs and self._dev.type != "cuda":
            raise TcgraphError("CUDA graphs need device 'cuda'; pass cuda_graphs=False (or omit it) on the CPU")
        self.cuda_graphs = bool(cuda_graphs)
        self.compile = bool(compile)
        self._load = programs if programs is not None else ProgramsFromArtifact(
            artifact, device=self._dev, precision=self.precision)
        self._io = self.io_names()
        self._programs: dict[str, Callable] = {}
        self._bank: CacheBank | None = None
        self._static: dict[str, torch.Tensor] = {}
        self._step_inputs: dict[str, dict[str, torch.Tensor]] = {}
        self._cuda_graphs: dict[str, torch.cuda.CUDAGraph] = {}

    @property
    def device(self) -> torch.device:
        return self._dev

    @property
    def returns_buffers(self) -> bool:
        return self.cuda_graphs

    # ---------------------------------------------------------------- lifecycle

    def _activate_impl(self) -> None:
        if self._dev.type == "cuda" and not torch.cuda.is_available():
            raise TcgraphError(
                "the torch backend was asked for device 'cuda', but this PyTorch sees no CUDA GPU "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu, or install "
                "a CUDA build of PyTorch on a machine with an NVIDIA GPU"
            )
        programs = self._load() if callable(self._load) else dict(self._load)
        missing = [vid for vid in self.specs if vid not in programs]
        if missing:
            raise TcgraphError(f"the torch runner got no program for variants {missing}; it got {sorted(programs)}")
        for vid in self.specs:
            self._programs[vid] = torch.compile(programs[vid], dynamic=False) if self.compile else programs[vid]
        if self.cuda_graphs:
            try:
                self._capture()
            except BaseException:
                self._deactivate_impl()
                raise

    def _deactivate_impl(self) -> None:
        self._cuda_graphs.clear()
        self._programs.clear()
        self._static.clear()
        self._step_inputs.clear()
        self._bank = None

    def _low(self, manifest_dtype: str) -> torch.dtype:
        dtype = torch_dtype(manifest_dtype)
        return self.dtype if dtype.is_floating_point else dtype

    @torch.no_grad()
    def _capture(self) -> None:
        variants = self.specs.values()
        self._bank = CacheBank(variants, self._dev, self._low)
        # x in the graphs' precision, out in float32 for the sampler, t as the manifest says (a
        # flow-matching t such as 999.6 would round to 1000 in bf16)
        self._static = static_buffers(variants, self._dev, lambda name, dtype: torch.float32 if name == OUT
                                      else torch_dtype(dtype) if name == T else self._low(dtype))
        self._step_inputs = step_input_buffers(variants, self._dev, lambda name, dtype: self._low(dtype))
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device=self._dev)
        for vid, program in self._programs.items():
            body = self._body(vid, program)
            warm, capture = _control_flow_modes(program)
            stream.wait_stream(torch.cuda.current_stream(self._dev))
            with torch.cuda.stream(stream), warm():  # warm-up (allocator, cuBLAS handles, compiled kernels)
                for _ in range(2):
                    body()
            torch.cuda.current_stream(self._dev).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream), capture():
                body()
            self._cuda_graphs[vid] = graph
        torch.cuda.synchronize(self._dev)
        for buf in self._bank.buffers.values():  # warm-up values are not caches of any run
            buf.zero_()

    def _body(self, vid: str, program):
        inputs, outputs = self._io[vid]
        bank, static, own = self._bank, self._static, self._step_inputs[vid]
        model_inputs = model_input_count(inputs)
        args = [static[n] for n in inputs[:model_inputs]] + [own[n] if n in own else bank[n]
                                                             for n in inputs[model_inputs:]]

        def body() -> None:
            result = _as_tuple(program(*args))
            static[OUT].copy_(result[0])
            for name, value in zip(outputs[1:], result[1:]):
                bank[name].copy_(value)  # after every read of the old value: same stream, program order

        return body

    # ---------------------------------------------------------------- running

    def _feed_dtype(self, name: str, manifest_dtype: str) -> str:
        if not is_model_input(name) and name != OUT:
            return str(self._low(manifest_dtype)).removeprefix("torch.")
        return manifest_dtype

    @torch.no_grad()
    def _run_impl(self, variant_id: str, feeds: dict[str, Any]) -> dict[str, Any]:
        inputs, outputs = self._io[variant_id]
        if self.cuda_graphs:
            model_inputs = model_input_count(inputs)
            for name in inputs[:model_inputs]:
                load_into(self._static[name], feeds[name])
            own = self._step_inputs[variant_id]
            for name in inputs[model_inputs:]:
                if name in own:
                    load_into(own[name], feeds[name])
                else:
                    self._bank.load(name, feeds[name])
            self._cuda_graphs[variant_id].replay()
            return {OUT: self._static[OUT], **{n: self._bank[n] for n in outputs[1:]}}
        args = []
        for name in inputs:
            value = torch.as_tensor(feeds[name]) if isinstance(feeds[name], np.ndarray) else feeds[name]
            dtype = self.dtype if value.is_floating_point() and name != T else value.dtype  # t: as given
            args.append(value.to(self._dev, dtype))
        result = _as_tuple(self._programs[variant_id](*args))
        values = {OUT: result[0].float()}
        values.update({n: v.to(self.dtype) for n, v in zip(outputs[1:], result[1:])})
        return values

    def _to_torch_impl(self, value: Any) -> torch.Tensor:
        raise TcgraphError(
            f"cannot convert a {type(value).__name__} to torch; pass a value returned by this runner's run()"
        )


def _control_flow_modes(program):
    """(warm-up mode, capture mode) for a program: both branches of every `torch.cond` warmed up, then
    captured as a CUDA-graph conditional node; no modes for a program without one."""
    import contextlib

    gm = getattr(program, "gm", program)
    graphs = [m.graph for m in gm.modules() if isinstance(m, torch.fx.GraphModule)] if isinstance(
        gm, torch.nn.Module) else []
    if not any(n.target is torch.ops.higher_order.cond for g in graphs for n in g.nodes):
        return contextlib.nullcontext, contextlib.nullcontext
    try:
        from torch._higher_order_ops.cudagraph_conditional_nodes import (
            CUDAGraphCaptureControlFlowOpDispatchMode, ControlFlowOpWarmupDispatchMode)
    except ImportError as e:
        raise TcgraphError(f"torch {torch.__version__} cannot capture a gated step (torch.cond) into a CUDA graph "
                           "as a conditional node; create the runner with cuda_graphs=False") from e
    return ControlFlowOpWarmupDispatchMode, CUDAGraphCaptureControlFlowOpDispatchMode


def _as_tuple(result) -> tuple:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)
