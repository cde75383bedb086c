"""ONNX Runtime backend: `SessionsFromArtifact` (loader) and `OrtRunner`.

Nothing here imports onnxruntime at import time; the loader does when it is called.
"""
from tcgraph.runtime.ort.loader import SessionsFromArtifact, import_onnxruntime
from tcgraph.runtime.ort.runner import OrtRunner

__all__ = ["OrtRunner", "SessionsFromArtifact", "import_onnxruntime"]
