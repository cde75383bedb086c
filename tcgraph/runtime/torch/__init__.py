"""PyTorch backend: the variants' `torch.export` programs on CPU or CUDA.

`ProgramsFromArtifact` (loader.py) reads the programs and maps the shared weights in;
`lower_precision` (precision.py) casts them to bf16/fp16; `TorchRunner` (runner.py) runs
them eagerly, under `torch.compile`, or as one CUDA graph per variant.
"""
from tcgraph.runtime.torch.loader import ProgramsFromArtifact, TorchProgram, load_weights
from tcgraph.runtime.torch.precision import PRECISIONS, lower_precision, precision_dtype
from tcgraph.runtime.torch.runner import TorchRunner

__all__ = ["PRECISIONS", "ProgramsFromArtifact", "TorchProgram", "TorchRunner", "load_weights", "lower_precision",
           "precision_dtype"]
