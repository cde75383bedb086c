"""TensorRT engines of an artifact folder, ready to run: a loader, called when a runner activates.

`EnginesFromArtifact(artifact)()` checks that the engines were built by this TensorRT
release on this kind of GPU (`check_engines`), deserializes `engines/<id>.plan`, refits
weight-stripped engines from their ONNX file (which reads the shared
`variants/weights.bin`), and checks every engine's I/O against the manifest. It returns
`LoadedEngines`: the engines by variant id, and the allocation strategy that lets the
runner give all their contexts one block of activation memory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import Artifact
from tcgraph.runtime.trt.check import check_engine_io, check_engines
from tcgraph.runtime.trt.common import REBUILD_HINT, cuda_device_info, import_tensorrt, trt_logger


class LoadedEngines(NamedTuple):
    """Engines by variant id; `user_managed` is the `ExecutionContextAllocationStrategy`
    for contexts on memory the runner gives them (None: each context owns its memory)."""

    engines: dict[str, Any]
    user_managed: Any = None


def refit_engine(trt, engine, onnx_path: Path, vid: str) -> None:
    """Give a weight-stripped engine its weights, read from the variant's ONNX file."""
    logger = trt_logger(trt)
    refitter = trt.Refitter(engine, logger)
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    # From the path, so that the external data (variants/weights.bin) is found.
    if not parser_refitter.refit_from_file(str(onnx_path)):
        errors = "; ".join(str(parser_refitter.get_error(k)) for k in range(parser_refitter.num_errors))
        raise TcgraphError(
            f"cannot refit the weight-stripped engine of variant {vid} from {onnx_path}: "
            f"{errors or 'no details'}; {REBUILD_HINT}"
        )
    missing = list(refitter.get_missing_weights())
    if missing or not refitter.refit_cuda_engine():
        detail = f"weights missing from the ONNX file: {missing[:5]}" if missing else "refit_cuda_engine failed"
        raise TcgraphError(f"cannot refit the weight-stripped engine of variant {vid} ({detail}); {REBUILD_HINT}")


class EnginesFromArtifact:
    """Loader: `loader()` -> LoadedEngines for every variant of `artifact`, on the current CUDA device."""

    def __init__(self, artifact: Artifact):
        self.artifact = artifact
        self.runtime = None  # the trt.Runtime that deserialized the engines: it must outlive them

    def __call__(self) -> LoadedEngines:
        trt = import_tensorrt()
        info = cuda_device_info(torch.cuda.current_device())
        section = self.artifact.tensorrt
        check_engines(section, tensorrt_version=str(trt.__version__), device_name=info["name"],
                      compute_capability=info["compute_capability"])
        specs = self.artifact.variants
        files = section.get("engines") or {}
        missing = [v.id for v in specs if v.id not in files]
        if missing:
            raise TcgraphError(
                f"the 'tensorrt' section of manifest.json has no engine for variants {missing}; the artifact is "
                f"incomplete: {REBUILD_HINT}"
            )
        self.runtime = trt.Runtime(trt_logger(trt))
        if hasattr(self.runtime, "engine_host_code_allowed"):
            # Artifacts are untrusted input: a version-compatible engine may embed host code (a lean
            # runtime, plugins) that deserializing would run. TensorRT refuses it unless allowed; say so here.
            self.runtime.engine_host_code_allowed = False
        engines = {}
        for spec in specs:
            vid = spec.id
            path = self.artifact.file(files[vid]["file"])
            engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise TcgraphError(
                    f"TensorRT {trt.__version__} cannot load the engine of variant {vid} ({path}; see its log "
                    f"above); {REBUILD_HINT}"
                )
            if section.get("weight_stripped"):
                refit_engine(trt, engine, self.artifact.variant_path(vid), vid)
            check_engine_io(engine, spec, input_mode=trt.TensorIOMode.INPUT)
            engines[vid] = engine
        strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "USER_MANAGED", None)
        return LoadedEngines(engines, strategy)

    def release(self) -> None:
        self.runtime = None
