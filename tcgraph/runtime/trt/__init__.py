"""TensorRT backend: engines built at transform time (build.py), checked (check.py), loaded
(loader.py) and run with one CUDA graph per variant (runner.py); common.py holds what they
share (TensorRT itself, the CUDA device).

Nothing here imports `tensorrt` at import time: every function that needs it imports it
when called, so importing tcgraph never needs TensorRT or a GPU.
"""
from tcgraph.runtime.trt.build import ENGINES_DIR, PRECISIONS, TIMING_CACHE, build_engines, keep_sinusoids_fp32
from tcgraph.runtime.trt.check import check_engine_io, check_engines
from tcgraph.runtime.trt.common import REBUILD_HINT, cuda_device_info, import_tensorrt, release, trt_logger
from tcgraph.runtime.trt.loader import EnginesFromArtifact, LoadedEngines, refit_engine
from tcgraph.runtime.trt.runner import TrtRunner

__all__ = ["ENGINES_DIR", "PRECISIONS", "REBUILD_HINT", "TIMING_CACHE", "EnginesFromArtifact", "LoadedEngines",
           "TrtRunner", "build_engines", "check_engine_io", "check_engines", "cuda_device_info", "import_tensorrt",
           "keep_sinusoids_fp32", "refit_engine", "release", "trt_logger"]
