"""ONNX Runtime backend: one InferenceSession per variant, weights shared between them.

Weight sharing (DESIGN.md, "Weights once"): every variant reads the same tensors from
`variants/weights.bin`. With `share_weights=True` each of them is wrapped ONCE as an
`OrtValue` over a read-only memory map of that file and handed to every session with
`SessionOptions.add_initializer`, and pre-packing is disabled: otherwise each session
keeps its own pre-packed copy of every matrix and the sharing saves nothing (measured:
neither setting alone shares; see benchmarks/memory_sharing.py). The price is slower
matrix products, so `share_weights=False` (plain sessions) stays available.

Inputs and outputs go through IOBinding: numpy / CPU torch feeds are bound without a
copy, outputs stay `OrtValue`s on the session's device, and an `OrtValue` returned by one
run can be fed to the next as is (caches never make a numpy round trip between steps).

`onnxruntime` is imported on `activate`, so importing tcgraph never needs it.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import Artifact
from tcgraph.export.onnx import read_external_initializers
from tcgraph.runtime.bank import torch_dtype
from tcgraph.runtime.base import Runner

# OrtValue.data_type() -> numpy dtype name, as the manifest writes dtypes.
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


def _import_ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise TcgraphError(
            "the 'ort' runner needs onnxruntime, which is not installed; `pip install onnxruntime` "
            "(or onnxruntime-gpu on a CUDA machine), or choose another backend"
        ) from e
    return onnxruntime


class OrtRunner(Runner):
    """Run artifact variants with ONNX Runtime.

    Options:
        providers: execution providers in priority order; default CUDA if onnxruntime
            offers it, else CPU.
        share_weights: one in-memory copy of the weights for all sessions (default True);
            False gives plain sessions (each with its own, pre-packed copy: faster
            matrix products, one copy of the weights per variant).
        intra_op_threads: threads per session (default: ONNX Runtime's choice).
        allow_spinning: whether idle intra-op threads spin-wait for work (default False).
            Every session owns a thread pool; when steps alternate between sessions, the
            pool that just ran keeps spinning and steals the cores the next session needs.
            Measured on 2 cores, demo model, whole sampling runs
            (`benchmarks/bench_plans.py --repeats 3 [--allow-spinning]`): fora:2 took
            8.8 s without spinning vs 14.3 s with it, and `full` gained nothing from it
            (15.2 s vs 15.5 s).
        cpu_arena: ONNX Runtime's CPU memory arena (default True). Each session owns one,
            so every extra variant keeps its own pool of activation buffers; False trades
            some allocation speed for memory (`benchmarks/bench_plans.py --no-cpu-arena`).
        device: "cpu" or "cuda" instead of `providers` (cuda needs onnxruntime-gpu).

    On CUDA, outputs are bound into torch CUDA tensors (IOBinding by address): `out` and
    the caches stay on the GPU, caches are fed back by address, and the sampler runs on
    the GPU with them.
    """

    name = "ort"

    def __init__(
        self,
        artifact: Artifact,
        *,
        providers: list[str] | None = None,
        share_weights: bool = True,
        intra_op_threads: int | None = None,
        allow_spinning: bool = False,
        cpu_arena: bool = True,
        device: str | None = None,
        **options: Any,
    ):
        super().__init__(artifact, **options)
        if device is not None and providers is not None:
            raise TcgraphError("pass either providers or device to the 'ort' runner, not both")
        if device is not None:
            kind = str(device).split(":")[0]
            if kind not in ("cpu", "cuda"):
                raise TcgraphError(f"the 'ort' runner runs on 'cpu' or 'cuda', not {device!r}")
            providers = [_CUDA, _CPU] if kind == "cuda" else [_CPU]
        self.providers = list(providers) if providers is not None else None
        self.share_weights = share_weights
        self.intra_op_threads = intra_op_threads
        self.allow_spinning = allow_spinning
        self.cpu_arena = cpu_arena
        self._ort = None
        self._sessions: dict[str, Any] = {}
        self._outputs: dict[str, list[dict]] = {e["id"]: e["outputs"] for e in artifact.manifest["variants"]}
        self._shared: dict[str, Any] = {}  # canonical initializer name -> OrtValue, shared by all sessions
        self._weights_map: np.memmap | None = None
        self._device = "cpu"

    # ---------------------------------------------------------------- lifecycle

    def _activate_impl(self) -> None:
        ort = self._ort = _import_ort()
        providers = self._choose_providers(ort)
        self._device = "cuda" if _provider_name(providers[0]) == _CUDA else "cpu"
        variant_ids = self.artifact.variant_ids()
        spinning = self.allow_spinning
        for vid in variant_ids:
            options = ort.SessionOptions()
            if self.intra_op_threads is not None:
                options.intra_op_num_threads = int(self.intra_op_threads)
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
            options.enable_cpu_mem_arena = self.cpu_arena
            if self.share_weights:
                for name, value in self._shared_initializers(vid).items():
                    options.add_initializer(name, value)
                # Pre-packing copies every matrix into a session-private layout: disable it or
                # each session holds its own copy of the weights despite the shared OrtValues.
                options.add_session_config_entry("session.disable_prepacking", "1")
            path = self.artifact.variant_path(vid)
            try:
                self._sessions[vid] = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as e:
                self._deactivate_impl()
                raise TcgraphError(
                    f"ONNX Runtime cannot load variant {vid} ({path}): {e}; check that the artifact is complete "
                    "(load_artifact verifies hashes) and that this onnxruntime supports its opset"
                ) from e
            used = self._sessions[vid].get_providers()
            if self._device == "cuda" and _CUDA not in used:  # ONNX Runtime only warns and runs on the CPU
                self._deactivate_impl()
                raise TcgraphError(
                    f"onnxruntime's CUDA provider did not load (the session runs on {used}); check that "
                    "onnxruntime-gpu matches this machine's CUDA and cuDNN versions, or use device 'cpu'"
                )

    def _deactivate_impl(self) -> None:
        # Sessions first: they reference the shared OrtValues, which reference the memory map.
        self._sessions.clear()
        self._shared.clear()
        self._weights_map = None

    def _choose_providers(self, ort) -> list:
        available = ort.get_available_providers()
        if self.providers is None:  # CUDA only where torch can hold its outputs there too
            return [_CUDA, _CPU] if _CUDA in available and torch.cuda.is_available() else [_CPU]
        missing = [p for p in self.providers if _provider_name(p) not in available]
        if missing:
            raise TcgraphError(
                f"ONNX Runtime providers {missing} are not available in this onnxruntime; available: "
                f"{available}; install onnxruntime-gpu for CUDA, or leave providers unset"
            )
        if _provider_name(self.providers[0]) == _CUDA and not torch.cuda.is_available():
            raise TcgraphError(
                "the 'ort' runner on CUDA binds its outputs into torch CUDA tensors, but this PyTorch sees no CUDA "
                "GPU; install a CUDA build of PyTorch, or use device 'cpu'"
            )
        return self.providers

    def _shared_initializers(self, vid: str) -> dict[str, Any]:
        """The OrtValues of the weights one variant reads, created once for all variants."""
        tensors = read_external_initializers(self.artifact.variant_path(vid))
        if tensors and self._weights_map is None:
            self._weights_map = np.memmap(self.artifact.weights_path, dtype=np.uint8, mode="r")
        result = {}
        for name, t in tensors.items():
            if name not in self._shared:
                end = t.offset + t.length
                if end > self._weights_map.size:
                    raise TcgraphError(
                        f"{self.artifact.weights_path} is {self._weights_map.size} bytes but variant {vid} reads "
                        f"{name} up to byte {end}; the folder is damaged, re-run `tcgraph transform`"
                    )
                array = self._weights_map[t.offset:end].view(t.dtype).reshape(t.shape)
                # CPU OrtValue over the mapped file, no copy. (With the CUDA provider each
                # session still copies it to the device.)
                self._shared[name] = self._ort.OrtValue.ortvalue_from_numpy(array)
            result[name] = self._shared[name]
        return result

    # ---------------------------------------------------------------- running

    def _run_impl(self, variant_id: str, feeds: dict[str, Any]) -> dict[str, Any]:
        ort = self._ort
        session = self._sessions[variant_id]
        binding = session.io_binding()
        keep_alive = []  # host buffers bound without a copy must outlive the run
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            elif isinstance(value, torch.Tensor) and value.is_cuda:
                value = value.detach().contiguous()
                keep_alive.append(value)
                binding.bind_input(
                    name, "cuda", value.device.index or 0, _numpy_dtype(value), tuple(value.shape), value.data_ptr()
                )
            else:
                array = value.detach().cpu().contiguous().numpy() if isinstance(value, torch.Tensor) else value
                array = np.ascontiguousarray(array)
                ort_value = ort.OrtValue.ortvalue_from_numpy(array)
                keep_alive.append((array, ort_value))
                binding.bind_ortvalue_input(name, ort_value)
        outputs = self._outputs[variant_id]
        if self._device == "cuda":  # into torch tensors: they stay on the GPU for the sampler and the next step
            values = {}
            for out in outputs:
                value = torch.empty(out["shape"], dtype=torch_dtype(out["dtype"]), device="cuda")
                binding.bind_output(out["onnx_name"], "cuda", value.device.index or 0, _numpy_dtype(value),
                                    tuple(value.shape), value.data_ptr())
                values[out["name"]] = value
            # ONNX Runtime works on its own CUDA stream: the inputs torch just computed on
            # its stream must be finished first (a host wait, no copy).
            torch.cuda.current_stream().synchronize()
            session.run_with_iobinding(binding)
            return values
        for out in outputs:
            binding.bind_output(out["onnx_name"], self._device)
        session.run_with_iobinding(binding)
        return {out["name"]: value for out, value in zip(outputs, binding.get_outputs())}

    @property
    def device(self) -> torch.device:
        return torch.device(self._device)

    def _describe_impl(self, value: Any):
        if self._ort is not None and isinstance(value, self._ort.OrtValue) and value.is_tensor():
            return tuple(value.shape()), _ORT_DTYPES.get(value.data_type(), value.data_type())
        return None, None

    def _to_torch_impl(self, value: Any) -> torch.Tensor:
        if self._ort is None or not isinstance(value, self._ort.OrtValue):
            raise TcgraphError(
                f"cannot convert a {type(value).__name__} to torch; pass a value returned by this runner's run()"
            )
        # On CPU, numpy() views the OrtValue's buffer (and keeps it alive): no copy.
        # On CUDA it copies to the host.
        return torch.from_numpy(value.numpy())


def _provider_name(provider) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


def _numpy_dtype(t: torch.Tensor):
    return torch.empty((), dtype=t.dtype).numpy().dtype
