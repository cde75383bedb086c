"""Backends that run the variants of an artifact folder.

`Runner` (base.py) is the one interface; one folder per backend, each with its loaders
(cheap callables that load sessions, programs or engines when called) and its runner:
`ort/` (ONNX Runtime, the embedded default), `torch/` (the variants' torch programs on
CPU or CUDA), `trt/` (TensorRT engines; also where they are built). bank.py keeps
device-resident caches, dispatch.py the schedule dispatcher. Backends load lazily:
`make_runner("ort", artifact)` imports onnxruntime only when the runner activates, and
importing tcgraph never imports TensorRT.
"""
from __future__ import annotations

import importlib
from typing import Any

from tcgraph.errors import UsageError
from tcgraph.export.artifact import Artifact
from tcgraph.runtime.base import Runner

# backend name -> "module:class"
BACKENDS: dict[str, str] = {
    "ort": "tcgraph.runtime.ort.runner:OrtRunner",
    "torch": "tcgraph.runtime.torch.runner:TorchRunner",
    "trt": "tcgraph.runtime.trt.runner:TrtRunner",
}


def make_runner(backend: str, artifact: Artifact, **options: Any) -> Runner:
    """An (inactive) runner of `backend` for `artifact`; call `activate()` or use `with`."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; available backends: {', '.join(BACKENDS)}")
    module, cls = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module), cls)(artifact, **options)


__all__ = ["BACKENDS", "Runner", "make_runner"]
