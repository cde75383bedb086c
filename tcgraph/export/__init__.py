"""Export variant graphs to ONNX and write/read artifact folders.

`export_variants` turns variant GraphModules into ONNX files sharing one weights file;
`write_artifact` / `load_artifact` handle the whole folder (manifest, plan, hashes), and a
loaded `Artifact` is typed (`Plan`, the model config, `VariantSpec`s) so that nothing else reads
manifest keys. Reading an artifact imports no torch; the ONNX export is imported on first use
(PEP 562).
"""
from __future__ import annotations

from tcgraph.export.artifact import SCHEMA_VERSION, Artifact, config_hash, load_artifact, write_artifact
from tcgraph.export.specs import ParameterSpec, TensorSpec, VariantSpec
from tcgraph.lazy import lazy_names

# name -> the module that defines it, imported when the name is first asked for
_LAZY = dict.fromkeys(("ExportableVariant", "export_variants", "read_external_initializers"), "tcgraph.export.onnx")


__getattr__ = lazy_names('tcgraph.export', _LAZY, globals())


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
