"""Sessions for the variants of an artifact folder: a loader, called when a runner activates.

One session for all variants (default, `one_session=True`): the variants behind `If` nodes
in one model (combined.py), so one thread pool, one arena and one pre-packed copy of the
weights serve every variant. `one_session=False` gives one session per variant:

Weight sharing (docs/design.md, "Weights once"): every variant reads the same tensors from
`variants/weights.bin`. With `share_weights=True` each of them is wrapped ONCE as an
`OrtValue` over a read-only memory map of that file and handed to every session with
`SessionOptions.add_initializer`, and pre-packing is disabled: otherwise each session
keeps its own pre-packed copy of every matrix and the sharing saves nothing (measured:
neither setting alone shares; see benchmarks/memory_sharing.py). The price is slower
matrix products, so `share_weights=False` (plain sessions) stays available.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import Artifact
from tcgraph.export.onnx import read_external_initializers
from tcgraph.names import GATE_PARAMS
from tcgraph.runtime.ort.combined import SELECTOR, CombinedModel, combine_variants, output_name

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

# Graph fusions ONNX Runtime would apply that make the CPU slower. SkipLayerNormFusion folds a
# residual Add into the LayerNormalization after it (in a DiT: the last block's residual and the
# final layer's norm); on the CPU that contrib kernel takes 3-4x the time of the Add and the
# LayerNormalization it replaces (ONNX Runtime 1.32, measured by benchmarks/ort_profile.py at
# [16, 64, 128], [4, 256, 384] and [16, 256, 384]): 0.85 ms of a demo reuse step's 2.1 ms.
SLOW_CPU_FUSIONS = ("SkipLayerNormFusion",)


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as e:
        raise TcgraphError(
            "the 'ort' runner needs onnxruntime, which is not installed; `pip install onnxruntime` "
            "(or onnxruntime-gpu on a CUDA machine), or choose another backend"
        ) from e
    return onnxruntime


def provider_name(provider) -> str:
    return provider[0] if isinstance(provider, tuple) else provider


PREPACK_MODES = ("once", "all", "none")


def prepack_mode(prepack: bool | str) -> str:
    """The one-session pre-packing mode: "once" (default: only the weights one kernel reads, so
    that each weight is held once), "all" (or True: every kernel packs its own copy), "none" (or
    False: no kernel packs)."""
    mode = {True: "all", False: "none"}.get(prepack, prepack) if isinstance(prepack, bool) else prepack
    if mode not in PREPACK_MODES:
        raise TcgraphError(f"prepack={prepack!r}: choose one of {', '.join(PREPACK_MODES)} (or True / False)")
    return mode


class SessionsFromArtifact:
    """Loader: `loader()` -> {variant id: InferenceSession} for every variant of `artifact`.

    Cheap to make; the sessions are created when it is called. The loader keeps the
    shared OrtValues and the memory map of the weights file they view: keep it alive as
    long as its sessions (the runner does), and call `release()` after them.
    Options: see `OrtRunner`.
    """

    def __init__(self, artifact: Artifact, *, providers: list | None = None, share_weights: bool = True,
                 intra_op_threads: int | None = None, allow_spinning: bool = False, cpu_arena: bool = True,
                 one_session: bool = True, prepack: bool | str = "once",
                 disabled_optimizers: tuple[str, ...] | None = None):
        self.artifact = artifact
        self.one_session = one_session
        self.prepack = prepack_mode(prepack)
        self.providers = list(providers) if providers is not None else None
        self.share_weights = share_weights
        self.intra_op_threads = intra_op_threads
        self.allow_spinning = allow_spinning
        self.cpu_arena = cpu_arena
        self.disabled_optimizers = disabled_optimizers
        self._ort = None
        self._shared: dict[str, Any] = {}  # canonical initializer name -> OrtValue, shared by all sessions
        self._weights_map: np.memmap | None = None

    def __call__(self) -> dict[str, Any]:
        ort = self._ort = import_onnxruntime()
        providers = self.choose_providers(ort)
        # a gated variant holds an If, which the combined session cannot nest: one session per variant
        gated = any(GATE_PARAMS in v.input_names for v in self.artifact.variants)
        if self.one_session and not gated:
            return self._one_session(ort, providers)
        sessions: dict[str, Any] = {}
        for vid in self.artifact.variant_ids():
            options = self._options(ort)
            if self.share_weights:
                for name, value in self._shared_initializers(vid).items():
                    options.add_initializer(name, value)
                # Pre-packing copies every matrix into a session-private layout: disable it or
                # each session holds its own copy of the weights despite the shared OrtValues.
                options.add_session_config_entry("session.disable_prepacking", "1")
            path = self.artifact.variant_path(vid)
            try:
                sessions[vid] = ort.InferenceSession(str(path), options, providers=providers,
                                                     **self._disabled(providers))
            except Exception as e:
                sessions.clear()
                self.release()
                raise TcgraphError(
                    f"ONNX Runtime cannot load variant {vid} ({path}): {e}; check that the artifact is complete "
                    "(load_artifact verifies hashes) and that this onnxruntime supports its opset"
                ) from e
            self._check_provider(sessions[vid], providers, sessions)
        return sessions

    def _options(self, ort):
        options = ort.SessionOptions()
        if self.intra_op_threads is not None:
            options.intra_op_num_threads = int(self.intra_op_threads)
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        options.enable_cpu_mem_arena = self.cpu_arena
        return options

    def _disabled(self, providers) -> dict:
        """InferenceSession's `disabled_optimizers`: the given ones, else SLOW_CPU_FUSIONS on the CPU."""
        names = self.disabled_optimizers
        if names is None:
            names = SLOW_CPU_FUSIONS if provider_name(providers[0]) == CPU else ()
        return {"disabled_optimizers": list(names)} if names else {}

    def _one_session(self, ort, providers) -> dict[str, Any]:
        """Every variant a view of one session over the combined model (weights read by ONNX
        Runtime from weights.bin once, pre-packed once)."""
        combined = combine_variants(self.artifact, pack_once=self.prepack == "once")
        options = self._options(ort)
        if self.prepack == "none":
            options.add_session_config_entry("session.disable_prepacking", "1")
        if self.prepack == "once":  # ONNX Runtime warns of every weight that is a graph input too: by design here
            options.log_severity_level = max(options.log_severity_level, 3)
        # The model is handed over as bytes: its external data is found through this folder.
        folder = self.artifact.weights_path.parent
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        try:
            session = ort.InferenceSession(combined.model.SerializeToString(), options, providers=providers,
                                           **self._disabled(providers))
        except Exception as e:
            raise TcgraphError(
                f"ONNX Runtime cannot load the variants of {self.artifact.root} as one session: {e}; check that "
                "the artifact is complete (load_artifact verifies hashes) and that this onnxruntime supports its "
                "opset, or load one session per variant (one_session=False)"
            ) from e
        self._check_provider(session, providers, {})
        return {vid: VariantOfSession(session, combined, vid, ort) for vid in combined.variant_ids}

    def _check_provider(self, session, providers, sessions: dict) -> None:
        used = session.get_providers()
        if provider_name(providers[0]) == CUDA and CUDA not in used:  # ONNX Runtime only warns, runs on the CPU
            sessions.clear()
            self.release()
            raise TcgraphError(
                f"onnxruntime's CUDA provider did not load (the session runs on {used}); check that "
                "onnxruntime-gpu matches this machine's CUDA and cuDNN versions, or use device 'cpu'"
            )

    def release(self) -> None:
        """Drop the shared OrtValues and the memory map (after the sessions that use them)."""
        self._shared.clear()
        self._weights_map = None

    def choose_providers(self, ort) -> list:
        available = ort.get_available_providers()
        if self.providers is None:  # CUDA only where torch can hold its outputs there too
            return [CUDA, CPU] if CUDA in available and torch.cuda.is_available() else [CPU]
        missing = [p for p in self.providers if provider_name(p) not in available]
        if missing:
            raise TcgraphError(
                f"ONNX Runtime providers {missing} are not available in this onnxruntime; available: "
                f"{available}; install onnxruntime-gpu for CUDA, or leave providers unset"
            )
        if provider_name(self.providers[0]) == CUDA and not torch.cuda.is_available():
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


class VariantOfSession:
    """One variant of the combined session, with the part of InferenceSession's API the runner
    uses: `io_binding()` comes with the variant's selector and its 0-element feeds bound, and
    `output_name` maps a manifest output to the combined graph's."""

    def __init__(self, session, combined: CombinedModel, vid: str, ort):
        self.session = session
        self.vid = vid
        # Fixed for the variant: made once, bound at every run (OrtValues keep their buffers alive).
        self._fixed = {SELECTOR: ort.OrtValue.ortvalue_from_numpy(np.array(combined.index(vid), dtype=np.int64))}
        self._fixed.update({name: ort.OrtValue.ortvalue_from_numpy(zero)
                            for name, zero in combined.zero_feeds(vid).items()})

    def io_binding(self):
        binding = self.session.io_binding()
        for name, value in self._fixed.items():
            binding.bind_ortvalue_input(name, value)
        return binding

    def run_with_iobinding(self, binding) -> None:
        self.session.run_with_iobinding(binding)

    def get_providers(self) -> list[str]:
        return self.session.get_providers()

    @staticmethod
    def output_name(spec) -> str:
        return output_name(spec.name)
