"""TensorRT backend: one engine per variant, caches resident on the GPU, one CUDA graph per variant.

Everything lives at fixed device addresses, set once per variant at activation:

- `x`, `t`, `y` and `out` are static buffers shared by every variant (all variants of an
  artifact have the same shapes for them);
- every cache is one buffer of a `CacheBank`: a variant reads its cache inputs from the
  bank and writes its cache outputs into it, so the tensors `run` returns for caches are
  the bank's buffers and feeding them to the next `run` costs nothing (no copy at all);
- an output that the same variant also reads (a token-pruning variant rewriting rows of
  `cache.3.mlp`) is written to a scratch buffer of that variant and copied into the bank
  right after the engine, on the same stream (inside the variant's CUDA graph).

With fixed addresses each variant is captured ONCE into a CUDA graph at activation
(after one warm-up enqueue, which TensorRT needs before a capture), on zero buffers; a
run is then a few device copies for the feeds that are not already in place plus one
graph replay. Nothing is captured lazily during sampling: a warm-up there would run a
variant twice.

Runs are enqueued on the runner's own stream, ordered after the caller's current stream
and before whatever the caller enqueues next (stream waits, no host synchronisation).
The returned tensors ARE the runner's buffers: `out` is overwritten by the next run and
each cache by the next run that writes it. The sampler consumes `out` (on its stream)
before it asks for the next step, so that is safe; copy a value to keep it.

Engines come from a loader (`EnginesFromArtifact`: the folder's engines, checked and
refitted, see loader.py), called on `activate`; pass `engines=` (a loader, a
`LoadedEngines`, or a dict of engines) to run others: the runner itself never imports
`tensorrt`, it only calls the engines and contexts it is given.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import Artifact
from tcgraph.names import OUT
from tcgraph.runtime.bank import CacheBank, aliased_outputs, load_into, static_buffers, step_input_buffers, torch_dtype
from tcgraph.runtime.base import Runner
from tcgraph.runtime.trt.common import REBUILD_HINT, cuda_device_info, device_memory_size, import_tensorrt, \
    set_device_memory
from tcgraph.runtime.trt.loader import EnginesFromArtifact, LoadedEngines

_CUDA_DEVICE = re.compile(r"cuda(:\d+)?")
Engines = LoadedEngines | dict[str, Any] | Callable[[], LoadedEngines | dict[str, Any]]


class TrtRunner(Runner):
    """Run artifact variants as TensorRT engines on an NVIDIA GPU.

    Options:
        cuda_graphs: replay one CUDA graph per variant, captured at activation (default
            True); False enqueues the engine directly on every run.
        device: the CUDA device, `cuda` (the current one) or `cuda:N`.
        share_activations: one block of activation memory for every variant's execution
            context, as large as the largest needs (default True; contexts created
            USER_MANAGED). Safe because runs are serialised on the runner's one stream;
            False lets each context own its activation memory (one block per variant).
        engines: the engines to run (a `LoadedEngines`, a dict by variant id, or a loader
            returning either; default `EnginesFromArtifact(artifact)`).
    """

    name = "trt"

    def __init__(self, artifact: Artifact, *, cuda_graphs: bool = True, device: str = "cuda",
                 share_activations: bool = True, engines: Engines | None = None, **options: Any):
        super().__init__(artifact, **options)
        if not isinstance(device, str) or not _CUDA_DEVICE.fullmatch(device):
            raise TcgraphError(
                f"the 'trt' runner got device {device!r}, but TensorRT runs only on NVIDIA GPUs: pass 'cuda' or "
                "'cuda:N'; to sample on the CPU use `--backend ort` or `--backend torch`"
            )
        self.cuda_graphs = bool(cuda_graphs)
        self.share_activations = bool(share_activations)
        self.activation_bytes = 0  # device memory of the execution contexts (shared block or sum), once active
        self._activations: torch.Tensor | None = None
        self._requested_device = device
        self._load = engines if engines is not None else EnginesFromArtifact(artifact)
        self._device: torch.device | None = None
        self._engines: dict[str, Any] = {}
        self._contexts: dict[str, Any] = {}
        self._graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self._pool = None
        self._stream: torch.cuda.Stream | None = None
        self._bank: CacheBank | None = None
        self._static: dict[str, torch.Tensor] = {}  # x, t, y, out: shared by every variant
        self._scratch: dict[str, dict[str, torch.Tensor]] = {}  # vid -> aliased output name -> buffer
        self._step_inputs: dict[str, dict[str, torch.Tensor]] = {}  # vid -> plan input (forecast.w) -> buffer

    @property
    def returns_buffers(self) -> bool:
        return True

    @property
    def device(self) -> torch.device:
        """The CUDA device of the engines, the buffers and every tensor `run` returns."""
        return self._device if self._device is not None else torch.device(self._requested_device)

    # ---------------------------------------------------------------- lifecycle

    def _activate_impl(self) -> None:
        if isinstance(self._load, EnginesFromArtifact):
            import_tensorrt()  # the folder's engines need TensorRT: say so before looking for a GPU
        self._device = self._cuda_device()
        try:
            with torch.cuda.device(self._device):
                loaded = self._load() if callable(self._load) else self._load
                if not isinstance(loaded, LoadedEngines):
                    loaded = LoadedEngines(dict(loaded))
                missing = [vid for vid in self.specs if vid not in loaded.engines]
                if missing:
                    raise TcgraphError(f"the 'trt' runner got no engine for variants {missing}; it got "
                                       f"{sorted(loaded.engines)}")
                self._engines = {vid: loaded.engines[vid] for vid in self.specs}
                self._allocate()
                self._create_contexts(loaded.user_managed)
                for vid in self.specs:
                    self._bind(vid)
                self._stream = torch.cuda.Stream(self._device)
                self._warm_up_and_capture()
        except BaseException:
            self._deactivate_impl()
            raise

    def _deactivate_impl(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()  # nothing of ours may still run when its memory goes
        # Graphs before contexts, contexts before engines, engines before the runtime.
        self._graphs.clear()
        self._pool = None
        self._contexts.clear()
        self._activations = None
        self._engines = {}
        release = getattr(self._load, "release", None)
        if release is not None:
            release()
        self._scratch.clear()
        self._static.clear()
        self._bank = None
        self._stream = None

    # ---------------------------------------------------------------- activation steps

    def _cuda_device(self) -> torch.device:
        """The torch device of `self.device`; refuses clearly where torch sees no such GPU."""
        cuda_device_info()  # raises when torch sees no CUDA device at all
        device = torch.device(self._requested_device)
        index = torch.cuda.current_device() if device.index is None else device.index
        count = torch.cuda.device_count()
        if index >= count:
            raise TcgraphError(
                f"the 'trt' runner got device {self._requested_device!r}, but this machine has {count} CUDA device(s) "
                f"(cuda:0 … cuda:{count - 1})"
            )
        return torch.device("cuda", index)

    def _allocate(self) -> None:
        """Static x/t/y/out buffers, the cache bank and the scratch buffers, all zeros."""
        variants = self.specs.values()
        self._static = static_buffers(variants, self._device, lambda _name, dtype: torch_dtype(dtype))
        self._bank = CacheBank(variants, self._device)
        self._step_inputs = step_input_buffers(variants, self._device, lambda _name, dtype: torch_dtype(dtype))
        self._scratch = {v.id: {name: torch.zeros_like(self._bank[name]) for name in aliased_outputs(v)}
                         for v in variants}

    def _create_contexts(self, strategy) -> None:
        """One execution context per variant; with `share_activations` (and a USER_MANAGED
        `strategy`), all of them on one block of activation memory (runs never overlap: one
        stream, in order)."""
        shared = self.share_activations and strategy is not None
        sizes = {vid: int(device_memory_size(engine)) for vid, engine in self._engines.items()}
        if shared:
            self.activation_bytes = max(sizes.values(), default=0)
            self._activations = torch.empty(max(self.activation_bytes, 1), dtype=torch.uint8, device=self._device)
        else:
            self.activation_bytes = sum(sizes.values())
        for vid, engine in self._engines.items():
            context = engine.create_execution_context(strategy) if shared else engine.create_execution_context()
            if context is None:
                raise TcgraphError(
                    f"TensorRT could not create an execution context for variant {vid} (out of GPU memory?); free GPU "
                    "memory, or cap the number of variants (`max_variants`)"
                )
            if shared:
                set_device_memory(context, self._activations.data_ptr(), sizes[vid])
            self._contexts[vid] = context

    def _bind(self, vid: str) -> None:
        """The tensor addresses of one variant's context, set once and for all."""
        context = self._contexts[vid]
        spec = self.specs[vid]
        addresses = {}
        for io in spec.inputs:
            name = io.name
            own = self._step_inputs[vid]
            addresses[name] = (self._static[name] if name in self._static else
                               own[name] if name in own else self._bank[name])
        for io in spec.outputs:
            name = io.name
            if name == OUT:
                buffer = self._static[OUT]
            elif name in self._scratch[vid]:
                buffer = self._scratch[vid][name]  # read and written by this variant
            else:
                buffer = self._bank[name]
            addresses[io.onnx_name] = buffer
        for name, buffer in addresses.items():
            if not context.set_tensor_address(name, buffer.data_ptr()):
                raise TcgraphError(f"TensorRT refused the address of {name} in variant {vid}; {REBUILD_HINT}")

    def _warm_up_and_capture(self) -> None:
        stream = self._stream
        stream.wait_stream(torch.cuda.current_stream(self._device))
        # One enqueue per variant first: TensorRT does its lazy set-up there, which a
        # stream capture must not see. The buffers are zeros; every output is overwritten
        # by real runs before it is read (a full step writes every cache).
        with torch.cuda.stream(stream):
            for vid in self.specs:
                self._enqueue(vid)
        stream.synchronize()
        if not self.cuda_graphs:
            return
        self._pool = torch.cuda.graph_pool_handle()  # one memory pool for all the graphs
        for vid in self.specs:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                    self._enqueue(vid)
            except TcgraphError:
                raise
            except Exception as e:
                raise TcgraphError(
                    f"capturing variant {vid} into a CUDA graph failed ({type(e).__name__}: {e}); create the "
                    "runner with cuda_graphs=False to enqueue the engines directly"
                ) from e
            self._graphs[vid] = graph

    def _enqueue(self, vid: str) -> None:
        """The engine of `vid`, then its aliased outputs into the bank, on the runner's stream."""
        if not self._contexts[vid].execute_async_v3(self._stream.cuda_stream):
            raise TcgraphError(f"TensorRT failed to enqueue variant {vid} (see its log above)")
        for name, scratch in self._scratch[vid].items():
            self._bank[name].copy_(scratch)

    # ---------------------------------------------------------------- running

    def _run_impl(self, variant_id: str, feeds: dict[str, Any]) -> dict[str, Any]:
        stream = self._stream
        caller = torch.cuda.current_stream(self._device)
        stream.wait_stream(caller)  # feeds made on the caller's stream; the last `out` consumed
        with torch.cuda.stream(stream):
            own = self._step_inputs[variant_id]
            for name, value in feeds.items():
                if name in self._static:
                    load_into(self._static[name], value)
                elif name in own:
                    load_into(own[name], value)
                else:
                    self._bank.load(name, value)  # free for a tensor a previous run returned
            if self.cuda_graphs:
                self._graphs[variant_id].replay()
            else:
                self._enqueue(variant_id)
        caller.wait_stream(stream)  # whatever the caller enqueues next sees the results
        return {name: self._static[OUT] if name == OUT else self._bank[name]
                for name in self.specs[variant_id].output_names}

    def _to_torch_impl(self, value: Any) -> torch.Tensor:
        # Every value `run` returns is a torch CUDA tensor already (handled by the base class).
        raise TcgraphError(
            f"cannot convert a {type(value).__name__} to torch; pass a value returned by this runner's run()"
        )

    def _describe_impl(self, value: Any):
        return None, None  # only torch tensors and numpy arrays (handled by the base class)
