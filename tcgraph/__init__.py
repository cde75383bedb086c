"""tcgraph: compile-time caching for diffusion transformers.

`transform` a model into an artifact folder of static graphs (one per distinct step),
`sample` from it with a dispatching runtime, `inspect` what was rewritten. TensorRT and
GPU libraries are imported lazily, only by the backends that need them.

The API names are imported on first use (PEP 562), so that `import tcgraph` (and the CLI's
start, which installs its signal handling first) does not wait for torch.
"""
from __future__ import annotations

from tcgraph.errors import TcgraphError, UsageError
from tcgraph.version import __version__
from tcgraph.lazy import lazy_names

_LAZY = {"format_inspect": "tcgraph.api", "inspect": "tcgraph.api", "sample": "tcgraph.api",
         "sample_eager": "tcgraph.api", "transform": "tcgraph.api", "load_model": "tcgraph.models"}


__getattr__ = lazy_names('tcgraph', _LAZY, globals())


__all__ = ["__version__", "TcgraphError", "UsageError", "format_inspect", "inspect", "load_model", "sample",
           "sample_eager", "transform"]
