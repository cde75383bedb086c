"""Backends that run the variants of an artifact folder.

`Runner` (base.py) is the one interface; `ort` (ONNX Runtime) is the embedded default,
`torch` (pytorch.py) runs the variant GraphModules on CPU or CUDA, `trt` (trt.py) runs
TensorRT engines. Backends load lazily: `make_runner("ort", artifact)` imports
onnxruntime only then, and nothing here imports TensorRT.

# dispatch.py holds the sampler loop that asks the schedule for each step's variant;
# it works over any Runner and is imported where it is used.
"""
from __future__ import annotations

import importlib
from typing import Any

from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import Artifact
from tcgraph.runtime.base import Runner

# backend name -> "module:class"
BACKENDS: dict[str, str] = {
    "ort": "tcgraph.runtime.ort:OrtRunner",
    "torch": "tcgraph.runtime.pytorch:TorchRunner",
    "trt": "tcgraph.runtime.trt:TrtRunner",
}


def make_runner(backend: str, artifact: Artifact, **options: Any) -> Runner:
    """An (inactive) runner of `backend` for `artifact`; call `activate()` or use `with`."""
    if backend not in BACKENDS:
        raise TcgraphError(f"unknown backend {backend!r}; available backends: {', '.join(BACKENDS)}")
    module, cls = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module), cls)(artifact, **options)


__all__ = ["BACKENDS", "Runner", "make_runner"]
