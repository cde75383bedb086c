"""PyTorch backend: the variant GraphModules themselves, on CPU or CUDA.

The GPU path where TensorRT is absent, and a reference on CPU. The artifact folder holds
everything it needs: the model config, the plan, and the model's tensors (mapped into the
shared `variants/weights.bin` by `manifest["parameters"]`: no second copy on disk). On
activation the model is rebuilt from them and every variant is rewritten by the same
passes that produced the ONNX files; each graph's inputs and outputs are checked
against the manifest.

Precision: float32 by default on CPU, bfloat16 on CUDA. A lower precision casts the
weights once and inserts a cast in front of every `Linear`/`Conv2d` (the sinusoidal
timestep embedding is computed in float32); caches stay in the low precision, `out` is
returned in float32 for the sampler's update.

CUDA graphs (default on CUDA): every cache lives in one device buffer per name
(`CacheBank`), and one CUDA graph per variant is captured at activation: it reads
`x`/`t`/`y` from static buffers and its caches from the bank, and writes `out` and its
cache outputs back into static memory. A run copies `x`/`t`/`y` in (device to device)
and replays; the caches it returns are the bank's own tensors, so feeding them to the
next step costs nothing. Without CUDA graphs (CPU, or `cuda_graphs=False`) each run
calls the graph eagerly and caches are passed on as the tensors it returned.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import Artifact
from tcgraph.runtime.base import Runner
from tcgraph.runtime.bank import CacheBank, load_into, static_buffers, torch_dtype

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


def rebuild_model(artifact: Artifact):
    """The DiT of an artifact folder, from its config and the tensors mapped into weights.bin."""
    from tcgraph.export.weights import load_parameters
    from tcgraph.models.dit import DiT, DiTConfig

    redo = "re-run `tcgraph transform` with this tcgraph to write a folder the torch backend can read"
    entries = artifact.manifest.get("parameters")
    if not isinstance(entries, dict) or not entries:
        raise TcgraphError(
            f"{artifact.root} does not map the model's parameters (manifest.json has no 'parameters'; it was "
            f"written by an older tcgraph or not by `tcgraph transform`), so the torch backend cannot rebuild the "
            f"model; {redo}, or use --backend ort"
        )
    try:
        config = DiTConfig(**artifact.model_config)
    except TypeError as e:
        raise TcgraphError(f"the model config in {artifact.root}/manifest.json is not a DiT config ({e}); {redo}") from e
    with torch.device("meta"):
        model = DiT(config)
    try:
        state = load_parameters(artifact.weights_path, entries)
        model.load_state_dict(state, strict=True, assign=True)
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError) as e:
        raise TcgraphError(f"cannot rebuild the model from {artifact.weights_path}: {e}; the folder is damaged; "
                           f"{redo}") from e
    return model.eval()


def rebuild_graphs(artifact: Artifact, model) -> dict[str, torch.fx.GraphModule]:
    """Every variant's GraphModule, rewritten from the plan exactly as for export, I/O checked."""
    from tcgraph.compile import rewrite_variant
    from tcgraph.passes import io_names
    from tcgraph.plan.plan import Plan

    plan = Plan.from_dict(artifact.plan)
    recipes = plan.variants()
    expected = artifact.io_names()
    if [f"v{i}" for i in range(len(recipes))] != list(expected):
        raise TcgraphError(
            f"the plan of {artifact.root} has {len(recipes)} variants but manifest.json lists {list(expected)}; "
            "the folder is inconsistent: re-run `tcgraph transform`"
        )
    graphs = {}
    for i, recipe in enumerate(recipes):
        vid = f"v{i}"
        gm = rewrite_variant(model, plan, recipe)
        got = io_names(gm)
        if tuple(got) != tuple(expected[vid]):
            raise TcgraphError(
                f"variant {vid} rewritten here has inputs/outputs {got}, but manifest.json says {expected[vid]}: "
                "the folder was written by another tcgraph version; re-run `tcgraph transform`"
            )
        graphs[vid] = gm
    return graphs


def lower_precision(gm: torch.fx.GraphModule, dtype: torch.dtype) -> torch.fx.GraphModule:
    """Cast floating weights to `dtype` and the input of every Linear/Conv2d to its weight's dtype."""
    if dtype == torch.float32:
        return gm
    gm.to(dtype)  # floating parameters and buffers (the variant graphs keep no other constants)
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), (nn.Linear, nn.Conv2d)):
            with graph.inserting_before(node):
                cast = graph.call_method("to", (node.args[0], dtype))
            node.args = (cast, *node.args[1:])
    graph.lint()
    gm.recompile()
    return gm


class TorchRunner(Runner):
    """Run artifact variants as PyTorch GraphModules.

    Options:
        device: "cpu" (default) or "cuda" / "cuda:N".
        dtype: float32 | float16 | bfloat16 (fp32/fp16/bf16 accepted); default float32 on
            CPU, bfloat16 on CUDA.
        cuda_graphs: one CUDA graph per variant, captured at activation (default: on for CUDA;
            not available on CPU).
        compile: wrap each variant in `torch.compile` first (default False; the first run of
            each variant compiles, on CPU this needs a C++ compiler).
    """

    name = "torch"

    def __init__(self, artifact: Artifact, *, device: str = "cpu", dtype: str | None = None,
                 cuda_graphs: bool | None = None, compile: bool = False, **options: Any):
        super().__init__(artifact, **options)
        try:
            self._dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise TcgraphError(f"unknown device {device!r} for the torch backend; use 'cpu' or 'cuda'") from e
        if self._dev.type not in ("cpu", "cuda"):
            raise TcgraphError(f"the torch backend runs on 'cpu' or 'cuda', not {device!r}")
        name = _ALIASES.get(dtype, dtype) if dtype is not None else (
            "bfloat16" if self._dev.type == "cuda" else "float32")
        if name not in _DTYPES:
            raise TcgraphError(f"unknown dtype {dtype!r} for the torch backend; use float32, float16 or bfloat16")
        self.dtype = _DTYPES[name]
        if cuda_graphs is None:
            cuda_graphs = self._dev.type == "cuda"
        if cuda_graphs and self._dev.type != "cuda":
            raise TcgraphError("CUDA graphs need device 'cuda'; pass cuda_graphs=False (or omit it) on the CPU")
        self.cuda_graphs = bool(cuda_graphs)
        self.compile = bool(compile)
        self._io = artifact.io_names()
        self._graphs: dict[str, Any] = {}
        self._bank: CacheBank | None = None
        self._static: dict[str, torch.Tensor] = {}
        self._cuda_graphs: dict[str, torch.cuda.CUDAGraph] = {}

    @property
    def device(self) -> torch.device:
        return self._dev

    # ---------------------------------------------------------------- lifecycle

    def _activate_impl(self) -> None:
        if self._dev.type == "cuda" and not torch.cuda.is_available():
            raise TcgraphError(
                "the torch backend was asked for device 'cuda', but this PyTorch sees no CUDA GPU "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); use --device cpu, or install "
                "a CUDA build of PyTorch on a machine with an NVIDIA GPU"
            )
        model = rebuild_model(self.artifact)
        graphs = rebuild_graphs(self.artifact, model)
        for vid, gm in graphs.items():
            gm = lower_precision(gm.to(self._dev), self.dtype).eval()
            self._graphs[vid] = torch.compile(gm, dynamic=False) if self.compile else gm
        if self.cuda_graphs:
            try:
                self._capture()
            except BaseException:
                self._deactivate_impl()
                raise

    def _deactivate_impl(self) -> None:
        self._cuda_graphs.clear()
        self._graphs.clear()
        self._static.clear()
        self._bank = None

    def _low(self, manifest_dtype: str) -> torch.dtype:
        dtype = torch_dtype(manifest_dtype)
        return self.dtype if dtype.is_floating_point else dtype

    @torch.no_grad()
    def _capture(self) -> None:
        self._bank = CacheBank(self.artifact, self._dev, self._low)
        # x in the graphs' precision, out in float32 for the sampler
        self._static = static_buffers(self.artifact, self._dev,
                                      lambda name, dtype: torch.float32 if name == "out" else self._low(dtype))
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device=self._dev)
        for vid, gm in self._graphs.items():
            body = self._body(vid, gm)
            stream.wait_stream(torch.cuda.current_stream(self._dev))
            with torch.cuda.stream(stream):  # warm-up (allocator, cuBLAS handles, compiled kernels)
                for _ in range(2):
                    body()
            torch.cuda.current_stream(self._dev).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                body()
            self._cuda_graphs[vid] = graph
        torch.cuda.synchronize(self._dev)
        for buf in self._bank.buffers.values():  # warm-up values are not caches of any run
            buf.zero_()

    def _body(self, vid: str, gm):
        inputs, outputs = self._io[vid]
        bank, static = self._bank, self._static
        args = [static[n] for n in inputs[:3]] + [bank[n] for n in inputs[3:]]

        def body() -> None:
            result = gm(*args)
            result = result if isinstance(result, tuple) else (result,)
            static["out"].copy_(result[0])
            for name, value in zip(outputs[1:], result[1:]):
                bank[name].copy_(value)  # after every read of the old value: same stream, program order

        return body

    # ---------------------------------------------------------------- running

    def _feed_dtype(self, name: str, manifest_dtype: str) -> str:
        if name.startswith("cache."):
            return str(self._low(manifest_dtype)).removeprefix("torch.")
        return manifest_dtype

    @torch.no_grad()
    def _run_impl(self, variant_id: str, feeds: dict[str, Any]) -> dict[str, Any]:
        inputs, outputs = self._io[variant_id]
        if self.cuda_graphs:
            for name in inputs[:3]:
                load_into(self._static[name], feeds[name])
            for name in inputs[3:]:
                self._bank.load(name, feeds[name])
            self._cuda_graphs[variant_id].replay()
            return {"out": self._static["out"], **{n: self._bank[n] for n in outputs[1:]}}
        args = []
        for name in inputs:
            value = torch.as_tensor(feeds[name]) if isinstance(feeds[name], np.ndarray) else feeds[name]
            dtype = self.dtype if value.is_floating_point() else value.dtype
            args.append(value.to(self._dev, dtype))
        result = self._graphs[variant_id](*args)
        result = result if isinstance(result, tuple) else (result,)
        values = {"out": result[0].float()}
        values.update({n: v.to(self.dtype) for n, v in zip(outputs[1:], result[1:])})
        return values

    def _to_torch_impl(self, value: Any) -> torch.Tensor:
        raise TcgraphError(
            f"cannot convert a {type(value).__name__} to torch; pass a value returned by this runner's run()"
        )
