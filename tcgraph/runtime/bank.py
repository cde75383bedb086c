"""Device-resident caches: one buffer per cache name, shared by every variant.

GPU runners that replay CUDA graphs need fixed addresses. The schedule decides at
compile time which variant reads and writes which cache, so every cache name gets ONE
buffer on the device (`CacheBank`), every variant's graph reads its cache inputs from
those buffers and writes its cache outputs into them, and the dispatcher passes the
same tensors from step to step: no host copy, no device copy between steps.

A variant that reads and writes the same name (token-pruning variants update rows of a
cache) cannot write its output over its own input while it still reads it, so such
outputs go to a scratch buffer first and are copied into the bank at the end of the
variant (one device-to-device copy, inside the captured graph). `aliased_outputs` names them.
"""
from __future__ import annotations

from typing import Callable

import torch

from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import Artifact

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a manifest dtype name (`float32`, `int64`, ...)."""
    if name not in TORCH_DTYPES:
        raise TcgraphError(f"unsupported tensor dtype {name!r} in the manifest; supported: {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def cache_specs(artifact: Artifact) -> dict[str, tuple[list[int], str]]:
    """Every cache name any variant reads or writes -> (shape, manifest dtype); checked consistent."""
    specs: dict[str, tuple[list[int], str]] = {}
    for entry in artifact.manifest["variants"]:
        for io in (*entry["inputs"], *entry["outputs"]):
            name = io["name"]
            if not name.startswith("cache."):
                continue
            spec = (list(io["shape"]), io["dtype"])
            if specs.setdefault(name, spec) != spec:
                raise TcgraphError(
                    f"{name} is {specs[name]} in one variant and {spec} in variant {entry['id']}; the manifest is "
                    "inconsistent: re-run `tcgraph transform`"
                )
    return specs


def aliased_outputs(artifact: Artifact, vid: str) -> list[str]:
    """Cache names that variant `vid` both reads and writes (its outputs need a scratch buffer)."""
    inputs, outputs = artifact.io_names()[vid]
    return [n for n in outputs if n in inputs]


class CacheBank:
    """One device buffer per cache name of an artifact (zeros until a variant writes it).

    `dtype_for(manifest dtype name)` picks the buffer dtype (e.g. bf16 for float caches
    of a bf16 runner); the default keeps the manifest dtype.
    """

    def __init__(self, artifact: Artifact, device: torch.device | str,
                 dtype_for: Callable[[str], torch.dtype] = torch_dtype):
        self.device = torch.device(device)
        self.buffers: dict[str, torch.Tensor] = {
            name: torch.zeros(shape, dtype=dtype_for(dtype), device=self.device)
            for name, (shape, dtype) in cache_specs(artifact).items()
        }

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.buffers[name]

    def __contains__(self, name: str) -> bool:
        return name in self.buffers

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def load(self, name: str, value) -> None:
        """Make the bank's buffer for `name` hold `value`.

        Passing back the bank's own tensor (what a run returned) costs nothing; any other
        tensor or array is copied in (a device copy, or a host copy for host values:
        that happens only when a caller feeds caches it made itself).
        """
        buf = self.buffers[name]
        if isinstance(value, torch.Tensor) and value.data_ptr() == buf.data_ptr() and value.shape == buf.shape:
            return
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value)
        buf.copy_(value)
