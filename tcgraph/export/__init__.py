"""Export variant graphs to ONNX and write/read artifact folders.

`export_variants` turns variant GraphModules into ONNX files sharing one weights file;
`write_artifact` / `load_artifact` handle the whole folder (manifest, plan, hashes), and a
loaded `Artifact` is typed (`Plan`, the model config, `VariantSpec`s) so that nothing else reads
manifest keys. Reading an artifact imports no torch; the ONNX export is imported on first use
(PEP 562).
"""
from __future__ import annotations

import importlib

from tcgraph.export.artifact import SCHEMA_VERSION, Artifact, config_hash, load_artifact, write_artifact
from tcgraph.export.specs import ParameterSpec, TensorSpec, VariantSpec

# name -> the module that defines it, imported when the name is first asked for
_LAZY = dict.fromkeys(("ExportableVariant", "export_variants", "read_external_initializers"), "tcgraph.export.onnx")


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tcgraph.export' has no attribute {name!r}")


__all__ = [
    "SCHEMA_VERSION",
    "Artifact",
    "ExportableVariant",
    "ParameterSpec",
    "TensorSpec",
    "VariantSpec",
    "config_hash",
    "export_variants",
    "load_artifact",
    "read_external_initializers",
    "write_artifact",
]
