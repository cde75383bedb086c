"""ONNX Runtime runner: one InferenceSession for all variants (or one per variant), weights once.

The sessions come from a loader (`SessionsFromArtifact`, see loader.py for the one-session
model and for weight sharing between per-variant sessions), called on `activate`; pass `sessions=` (a loader, or a dict of ready sessions)
to run others. Inputs and outputs go through IOBinding: numpy / CPU torch feeds are bound
without a copy, outputs stay `OrtValue`s on the session's device, and an `OrtValue`
returned by one run can be fed to the next as is (caches never make a numpy round trip
between steps).

`onnxruntime` is imported on `activate`, so importing tcgraph never needs it.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import Artifact
from tcgraph.runtime.bank import torch_dtype
from tcgraph.runtime.base import Runner
from tcgraph.runtime.ort.loader import CPU, CUDA, SessionsFromArtifact, import_onnxruntime, provider_name

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
Sessions = dict[str, Any] | Callable[[], dict[str, Any]]


class OrtRunner(Runner):
    """Run artifact variants with ONNX Runtime.

    Options:
        providers: execution providers in priority order; default CUDA if onnxruntime
            offers it, else CPU.
        one_session: one session runs every variant (default True): the variants behind
            `If` nodes in one model (runtime/ort/combined.py), so one thread pool, one
            memory arena and one pre-packed copy of the weights; False: one session per
            variant (see share_weights).
        prepack: with one session, which weights ONNX Runtime pre-packs for its matrix
            products. Each kernel packs its own copy, so a weight that several variants
            multiply by would be packed once per variant that does. "once" (default): only
            the weights one kernel reads (work every variant does alike, such as the
            embeddings and adaLN modulations, runs once in the top graph, so its weights are
            among them): one copy of every weight; "all" (or True): every kernel packs, one
            packed copy per kernel; "none" (or False): no kernel packs (slower products).
            Measured in benchmarks/memory_sharing.py and benchmarks/bench_realization.py.
        share_weights: with one session per variant, one in-memory copy of the weights for
            all sessions (default True); False gives plain sessions (each with its own,
            pre-packed copy: faster matrix products, one copy of the weights per variant).
        intra_op_threads: threads per session (default: ONNX Runtime's choice).
        allow_spinning: whether idle intra-op threads spin-wait for work (default False).
            Every session owns a thread pool; when steps alternate between sessions, the
            pool that just ran keeps spinning and steals the cores the next session needs.
            Measured on 2 cores, demo model, whole sampling runs
            (`benchmarks/bench_plans.py --repeats 3 [--allow-spinning]`): fora:2 took
            8.8 s without spinning vs 14.3 s with it, and `full` gained nothing from it
            (15.2 s vs 15.5 s).
        disabled_optimizers: ONNX Runtime graph optimizers not to run (default: on the CPU,
            the fusions that make it slower, `loader.SLOW_CPU_FUSIONS`; () runs them all).
        cpu_arena: ONNX Runtime's CPU memory arena (default True). Each session owns one,
            so every extra variant keeps its own pool of activation buffers; False trades
            some allocation speed for memory (`benchmarks/bench_plans.py --no-cpu-arena`).
        device: "cpu" or "cuda" instead of `providers` (cuda needs onnxruntime-gpu).
        sessions: the sessions to run, by variant id, or a loader returning them (default:
            `SessionsFromArtifact` with the options above, which then must not be given).

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
        one_session: bool = True,
        prepack: bool | str = "once",
        disabled_optimizers: tuple[str, ...] | None = None,
        device: str | None = None,
        sessions: Sessions | None = None,
        **options: Any,
    ):
        super().__init__(artifact, **options)
        if device is not None and providers is not None:
            raise TcgraphError("pass either providers or device to the 'ort' runner, not both")
        if device is not None:
            kind = str(device).split(":")[0]
            if kind not in ("cpu", "cuda"):
                raise TcgraphError(f"the 'ort' runner runs on 'cpu' or 'cuda', not {device!r}")
            providers = [CUDA, CPU] if kind == "cuda" else [CPU]
        loader_options = dict(providers=providers, share_weights=share_weights, intra_op_threads=intra_op_threads,
                              allow_spinning=allow_spinning, cpu_arena=cpu_arena, one_session=one_session,
                              prepack=prepack, disabled_optimizers=disabled_optimizers)
        if sessions is not None:
            given = [k for k, v in loader_options.items() if v != SESSION_DEFAULTS[k]]
            if given:
                raise TcgraphError(f"the 'ort' runner got sessions and the session options {given}; the options "
                                   "are those of the default loader: pass them to SessionsFromArtifact instead")
        self.providers = list(providers) if providers is not None else None
        self.share_weights = share_weights
        self._load = sessions if sessions is not None else SessionsFromArtifact(artifact, **loader_options)
        self._ort = None
        self._sessions: dict[str, Any] = {}
        self._device = "cpu"

    # ---------------------------------------------------------------- lifecycle

    def _activate_impl(self) -> None:
        self._ort = import_onnxruntime()
        sessions = self._load() if callable(self._load) else dict(self._load)
        missing = [vid for vid in self.specs if vid not in sessions]
        if missing:
            raise TcgraphError(f"the 'ort' runner got no session for variants {missing}; it got {sorted(sessions)}")
        self._sessions = sessions
        first = sessions[next(iter(self.specs))].get_providers()
        self._device = "cuda" if first and provider_name(first[0]) == CUDA else "cpu"

    def _deactivate_impl(self) -> None:
        # Sessions first: they reference the shared OrtValues, which reference the memory map.
        self._sessions = {}
        release = getattr(self._load, "release", None)
        if release is not None:
            release()

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
        outputs = self.specs[variant_id].outputs
        if self._device == "cuda":  # into torch tensors: they stay on the GPU for the sampler and the next step
            values = {}
            for out in outputs:
                value = torch.empty(out.shape, dtype=torch_dtype(out.dtype), device="cuda")
                binding.bind_output(_onnx_output(session, out), "cuda", value.device.index or 0, _numpy_dtype(value),
                                    tuple(value.shape), value.data_ptr())
                values[out.name] = value
            # ONNX Runtime works on its own CUDA stream: the inputs torch just computed on
            # its stream must be finished first (a host wait, no copy).
            torch.cuda.current_stream().synchronize()
            session.run_with_iobinding(binding)
            return values
        for out in outputs:
            binding.bind_output(_onnx_output(session, out), self._device)
        session.run_with_iobinding(binding)
        return {out.name: value for out, value in zip(outputs, binding.get_outputs())}

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


def _onnx_output(session, spec) -> str:
    """The name to bind output `spec` to: the variant file's, or the combined session's."""
    name_of = getattr(session, "output_name", None)
    return name_of(spec) if name_of is not None else spec.onnx_name


def _numpy_dtype(t: torch.Tensor):
    return torch.empty((), dtype=t.dtype).numpy().dtype


SESSION_DEFAULTS = {"providers": None, "share_weights": True, "intra_op_threads": None, "allow_spinning": False,
                    "cpu_arena": True, "one_session": True, "prepack": "once",
                    "disabled_optimizers": None}
