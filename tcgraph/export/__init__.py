"""Export variant graphs to ONNX and write/read artifact folders.

`export_variants` turns variant GraphModules into ONNX files sharing one weights file;
`write_artifact` / `load_artifact` handle the whole folder (manifest, plan, hashes), and a
loaded `Artifact` is typed (`Plan`, the model config, `VariantSpec`s) so that nothing else reads
manifest keys.
"""
from tcgraph.export.artifact import SCHEMA_VERSION, Artifact, config_hash, load_artifact, write_artifact
from tcgraph.export.onnx import ExportableVariant, export_variants, read_external_initializers
from tcgraph.export.specs import ParameterSpec, TensorSpec, VariantSpec

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
