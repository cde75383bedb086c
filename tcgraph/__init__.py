"""tcgraph: compile-time caching for diffusion transformers.

`transform` a model into an artifact folder of static graphs (one per distinct step),
`sample` from it with a dispatching runtime, `inspect` what was rewritten. TensorRT and
GPU libraries are imported lazily, only by the backends that need them.
"""
from __future__ import annotations

from tcgraph.api import format_inspect, inspect, sample, sample_eager, transform
from tcgraph.errors import TcgraphError
from tcgraph.models import load_model
from tcgraph.version import __version__

__all__ = ["__version__", "TcgraphError", "format_inspect", "inspect", "load_model", "sample", "sample_eager",
           "transform"]
