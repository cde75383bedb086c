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

from collections.abc import Callable, Iterable

import torch

from tcgraph.errors import TcgraphError
from tcgraph.export.specs import VariantSpec
from tcgraph.names import GATE_PARAMS, OUT, X, T, is_cache, is_gate, is_model_input

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


Variants = Iterable[VariantSpec]


def carried(name: str) -> bool:
    """Whether a graph input or output is carried from step to step in a bank buffer: a cache, or a
    gated step's state (`gate.*` but its per-step `gate.params`)."""
    return is_cache(name) or (is_gate(name) and name != GATE_PARAMS)


def cache_specs(variants: Variants) -> dict[str, tuple[list[int], str]]:
    """Every carried name (`carried`) any variant reads or writes -> (shape, manifest dtype); checked consistent."""
    specs: dict[str, tuple[list[int], str]] = {}
    for variant in variants:
        for io in (*variant.inputs, *variant.outputs):
            if not carried(io.name):
                continue
            spec = (list(io.shape), io.dtype)
            if specs.setdefault(io.name, spec) != spec:
                raise TcgraphError(
                    f"{io.name} is {specs[io.name]} in one variant and {spec} in variant {variant.id}; the manifest is "
                    "inconsistent: re-run `tcgraph transform`"
                )
    return specs


def is_static(name: str) -> bool:
    """The model's inputs (x, t, its conditioning) and `out`: the same shape in every variant of an artifact."""
    return name == OUT or is_model_input(name)


def static_buffers(variants: Variants, device: torch.device | str,
                   dtype_for: Callable[[str, str], torch.dtype]) -> dict[str, torch.Tensor]:
    """Zero buffers for the model's inputs (`x`, `t`, its conditioning) and `out`, one set for every
    variant (checked to agree).

    `dtype_for(name, manifest dtype)` picks each buffer's dtype.
    """
    specs: dict[str, tuple[list[int], str]] = {}
    first: list[str] | None = None
    for variant in variants:
        ios = [io for io in (*variant.inputs, *variant.outputs) if is_static(io.name)]
        names = sorted(io.name for io in ios)
        first = names if first is None else first
        if not {X, T, OUT} <= set(names) or names != first:
            raise TcgraphError(
                f"variant {variant.id} reads and writes {names}, not x, t, the model's conditioning and out as "
                f"every variant does ({first}; docs/design.md, 'Graph interface of a variant'); the manifest is damaged: "
                "re-run `tcgraph transform`"
            )
        for io in ios:
            spec = (list(io.shape), io.dtype)
            if specs.setdefault(io.name, spec) != spec:
                raise TcgraphError(
                    f"{io.name} is {specs[io.name]} in one variant and {spec} in variant {variant.id}; all "
                    "variants of an artifact share these shapes: re-run `tcgraph transform`"
                )
    return {name: torch.zeros(shape, dtype=dtype_for(name, dtype), device=device)
            for name, (shape, dtype) in specs.items()}


def step_input_buffers(variants: Variants, device: torch.device | str,
                       dtype_for: Callable[[str, str], torch.dtype]) -> dict[str, dict[str, torch.Tensor]]:
    """variant id -> zero buffers for its inputs that are neither model inputs nor caches: the
    plan's per-step inputs (`forecast.w`), whose shape differs from variant to variant."""
    return {variant.id: {io.name: torch.zeros(list(io.shape), dtype=dtype_for(io.name, io.dtype), device=device)
                         for io in variant.inputs if not is_static(io.name) and not carried(io.name)}
            for variant in variants}


def load_into(buffer: torch.Tensor, value) -> None:
    """Make `buffer` hold `value`: nothing to do when `value` is `buffer` itself (what a run
    returned, fed back); any other tensor or array is copied in (device to device, or from
    the host when a caller feeds values it made itself)."""
    if isinstance(value, torch.Tensor) and value.data_ptr() == buffer.data_ptr() and value.shape == buffer.shape:
        return
    buffer.copy_(value if isinstance(value, torch.Tensor) else torch.as_tensor(value))


def aliased_outputs(variant: VariantSpec) -> list[str]:
    """Cache names that `variant` both reads and writes (its outputs need a scratch buffer)."""
    return [n for n in variant.output_names if n in variant.input_names]


class CacheBank:
    """One device buffer per cache name of the variants of an artifact (zeros until a variant writes it).

    `dtype_for(manifest dtype name)` picks the buffer dtype (e.g. bf16 for float caches
    of a bf16 runner); the default keeps the manifest dtype.
    """

    def __init__(self, variants: Variants, device: torch.device | str,
                 dtype_for: Callable[[str], torch.dtype] = torch_dtype):
        self.device = torch.device(device)
        self.buffers: dict[str, torch.Tensor] = {
            name: torch.zeros(shape, dtype=dtype_for(dtype), device=self.device)
            for name, (shape, dtype) in cache_specs(variants).items()
        }

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.buffers[name]

    def __contains__(self, name: str) -> bool:
        return name in self.buffers

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def load(self, name: str, value) -> None:
        """Make the bank's buffer for `name` hold `value` (free for the bank's own tensor)."""
        load_into(self.buffers[name], value)
