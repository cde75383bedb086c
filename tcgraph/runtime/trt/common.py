"""What the TensorRT backend's build, loader and runner share: TensorRT itself and the CUDA device.

`tensorrt` is imported only when a function here is called: importing tcgraph never
needs TensorRT or CUDA.
"""
from __future__ import annotations

from typing import Any

from tcgraph.errors import TcgraphError

MIN_MAJOR = 10  # STRIP_PLAN, OnnxParserRefitter and int64 I/O tensors arrive in TensorRT 10
REBUILD_HINT = "re-run `tcgraph transform --backend trt --force` on this machine (engines are not portable)"
_INSTALL = (
    "install TensorRT 10 with its builder libraries on an NVIDIA GPU machine (e.g. `pip install tensorrt` "
    "where NVIDIA's package index is reachable; the `tensorrt` stubs of other indexes cannot build engines), "
    "or use another backend: `--backend torch --device cuda`, or `--backend ort`"
)
# trt.DataType member name -> manifest dtype name
TRT_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT64": "int64",
    "INT32": "int32",
    "INT8": "int8",
    "UINT8": "uint8",
    "BOOL": "bool",
}
_logger: tuple[Any, Any] | None = None  # (tensorrt module, its logger)


def import_tensorrt():
    """The `tensorrt` module, or one TcgraphError saying what is missing and what to do."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or a stub / broken install failing in its own way
        raise TcgraphError(
            f"the TensorRT backend needs the `tensorrt` Python package, which cannot be imported here "
            f"({type(e).__name__}: {e}); {_INSTALL}"
        ) from e
    if not hasattr(trt, "Builder") or not hasattr(trt, "Runtime"):
        raise TcgraphError(
            f"the installed `tensorrt` package ({getattr(trt, '__file__', '?')}) is a stub or a lean runtime "
            f"without the builder (no tensorrt.Builder); {_INSTALL}"
        )
    version = str(getattr(trt, "__version__", "0"))
    major = version.split(".")[0]
    if not major.isdigit() or int(major) < MIN_MAJOR:
        raise TcgraphError(
            f"tcgraph needs TensorRT {MIN_MAJOR} or newer (weight-stripped engines, int64 inputs); "
            f"found TensorRT {version}; {_INSTALL}"
        )
    return trt


def trt_logger(trt):
    """One TensorRT logger for the process (TensorRT expects the same one everywhere)."""
    global _logger
    if _logger is None or _logger[0] is not trt:
        _logger = (trt, trt.Logger(trt.Logger.WARNING))
    return _logger[1]


def cuda_device_info(device: Any = None) -> dict[str, str]:
    """{"name", "compute_capability"} of a CUDA device (default: the current one)."""
    import torch

    if not torch.cuda.is_available():
        raise TcgraphError(
            "TensorRT needs an NVIDIA GPU, and torch sees no CUDA device here (torch.cuda.is_available() is "
            f"False; torch {torch.__version__}); run on a machine with an NVIDIA GPU and a CUDA build of torch, "
            "or use `--backend ort` (CPU)"
        )
    major, minor = torch.cuda.get_device_capability(device)
    return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


def release(version: str) -> str:
    """major.minor.patch of a TensorRT version string ("10.3.0.26" -> "10.3.0")."""
    return ".".join(str(version).split(".")[:3])


def dtype_name(dtype) -> str:
    """The manifest dtype name of a `trt.DataType` (its member name where it has one)."""
    name = getattr(dtype, "name", str(dtype).rsplit(".", 1)[-1])
    return TRT_DTYPES.get(name, str(dtype))


def device_memory_size(engine) -> int:
    """Activation memory an engine's context needs (`device_memory_size_v2` from TensorRT 10.1)."""
    size = getattr(engine, "device_memory_size_v2", None)
    return engine.device_memory_size if size is None else size


def set_device_memory(context, address: int, size: int) -> None:
    """Give an execution context (created USER_MANAGED) its activation memory."""
    if hasattr(context, "set_device_memory"):  # TensorRT >= 10.1
        context.set_device_memory(address, size)
    else:
        context.device_memory = address
