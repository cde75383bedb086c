"""Typed entries of an artifact manifest: a variant's graph I/O, its files, the parameter map.

`manifest.json` stores plain JSON (docs/design.md, "Artifact folder"); the runners, inspection
and the benchmarks read these frozen records instead, so that a key or a type is checked
once, when the folder is loaded (`tcgraph.export.artifact.load_artifact`), and a damaged
entry is refused there with the file it came from, not deep inside a backend.

Dtypes stay the manifest's names (`"float32"`, `"int64"`, ...): each backend maps them to
its own types.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tcgraph.errors import TcgraphError

REDO = "re-run `tcgraph transform` to rebuild it"
VARIANTS_DIR = "variants"
WEIGHTS_FILE = "weights.bin"  # inside the variants folder, beside the .onnx files that read it
WEIGHTS_PATH = f"{VARIANTS_DIR}/{WEIGHTS_FILE}"  # relative to the artifact root


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its logical name (docs/design.md, "Graph interface of a variant"),
    static shape and dtype.

    `onnx_name` is the name inside the ONNX file; it differs from `name` only for an output
    that is also an input (`cache.3.mlp` -> `cache.3.mlp.new`, see
    `tcgraph.export.onnx.onnx_output_names`). `max_abs_diff` is the export check's worst
    difference for an output (None for inputs and unchecked exports).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    onnx_name: str = ""
    max_abs_diff: float | None = None

    def __post_init__(self) -> None:
        if not self.onnx_name:
            object.__setattr__(self, "onnx_name", self.name)


@dataclass(frozen=True)
class VariantSpec:
    """One variant of an artifact: its ONNX file (relative to the folder) and graph I/O.

    `sha256`, `opset`, `external_initializers` (canonical names it reads from the shared
    weights file) and `max_abs_diff` are what the export recorded.
    """

    id: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sha256: str = ""
    opset: int | None = None
    external_initializers: tuple[str, ...] = ()
    max_abs_diff: float | None = None

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)

    @property
    def onnx_output_names(self) -> tuple[str, ...]:
        return tuple(o.onnx_name for o in self.outputs)

    def input(self, name: str) -> TensorSpec:
        return self._find(self.inputs, name, "input")

    def output(self, name: str) -> TensorSpec:
        return self._find(self.outputs, name, "output")

    def _find(self, specs: tuple[TensorSpec, ...], name: str, what: str) -> TensorSpec:
        for spec in specs:
            if spec.name == name:
                return spec
        raise TcgraphError(
            f"variant {self.id} has no {what} {name!r}; its {what}s are: {', '.join(s.name for s in specs)}"
        )


@dataclass(frozen=True)
class ParameterSpec:
    """Where one tensor of the model's state dict lives in the shared weights file.

    `shape` is the tensor's own shape; `transposed` says the bytes hold its transpose (the
    exporter folds `Linear` weight transposes, and the tensor is found there by content).
    """

    name: str
    offset: int
    length: int
    dtype: str
    shape: tuple[int, ...]
    transposed: bool

    def to_entry(self) -> dict:
        """The manifest form (`manifest.json` "parameters" maps the name to this dict)."""
        return {"offset": self.offset, "length": self.length, "dtype": self.dtype, "shape": list(self.shape),
                "transposed": self.transposed}


#################################################################################
#                         From manifest JSON, checked                           #
#################################################################################


def _damaged(where: str, what: str) -> TcgraphError:
    return TcgraphError(f"{where}: {what}; the manifest is damaged; {REDO}")


def _int(value, where: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _damaged(where, f"{what} is {value!r}, not an integer")
    return value


def _str(value, where: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise _damaged(where, f"{what} is {value!r}, not a name")
    return value


def _shape(value, where: str, what: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise _damaged(where, f"{what} shape is {value!r}, not a list of sizes")
    return tuple(_int(d, where, f"{what} shape") for d in value)


def tensor_spec(entry, where: str, what: str) -> TensorSpec:
    if not isinstance(entry, Mapping):
        raise _damaged(where, f"{what} is {entry!r}, not an object")
    name = _str(entry.get("name"), where, f"{what} name")
    diff = entry.get("max_abs_diff")
    return TensorSpec(
        name=name,
        shape=_shape(entry.get("shape"), where, f"{what} {name}"),
        dtype=_str(entry.get("dtype"), where, f"{what} {name} dtype"),
        onnx_name=_str(entry.get("onnx_name", name), where, f"{what} {name} onnx_name"),
        max_abs_diff=float(diff) if isinstance(diff, (int, float)) and not isinstance(diff, bool) else None,
    )


def variant_spec(entry, where: str, index: int) -> VariantSpec:
    """A `manifest["variants"]` entry as a VariantSpec; `where` names the manifest file."""
    if not isinstance(entry, Mapping):
        raise _damaged(where, f"variant entry {index} is {entry!r}, not an object")
    vid = _str(entry.get("id"), where, f"variant entry {index} id")
    for key in ("inputs", "outputs"):
        if not isinstance(entry.get(key), list):
            raise _damaged(where, f"variant {vid} has no list of {key}")
    opset = entry.get("opset")
    diff = entry.get("max_abs_diff")
    used = entry.get("external_initializers", [])
    return VariantSpec(
        id=vid,
        file=_str(entry.get("file"), where, f"variant {vid} file"),
        inputs=tuple(tensor_spec(e, where, f"variant {vid} input") for e in entry["inputs"]),
        outputs=tuple(tensor_spec(e, where, f"variant {vid} output") for e in entry["outputs"]),
        sha256=str(entry.get("sha256", "")),
        opset=None if opset is None else _int(opset, where, f"variant {vid} opset"),
        external_initializers=tuple(str(n) for n in used) if isinstance(used, list) else (),
        max_abs_diff=float(diff) if isinstance(diff, (int, float)) and not isinstance(diff, bool) else None,
    )


def parameter_spec(name: str, entry, where: str) -> ParameterSpec:
    """One `manifest["parameters"]` entry (`{offset, length, dtype, shape, transposed}`)."""
    what = f"parameter {name}"
    if not isinstance(entry, Mapping):
        raise _damaged(where, f"{what} is {entry!r}, not an object")
    transposed = entry.get("transposed")
    if not isinstance(transposed, bool):
        raise _damaged(where, f"{what} has transposed={transposed!r}, not true or false")
    return ParameterSpec(
        name=name,
        offset=_int(entry.get("offset"), where, f"{what} offset"),
        length=_int(entry.get("length"), where, f"{what} length"),
        dtype=_str(entry.get("dtype"), where, f"{what} dtype"),
        shape=_shape(entry.get("shape"), where, what),
        transposed=transposed,
    )


def parameter_specs(entries, where: str) -> tuple[ParameterSpec, ...]:
    """The whole `manifest["parameters"]` map, in its order (the state dict's order)."""
    if not isinstance(entries, Mapping):
        raise _damaged(where, f"'parameters' is {type(entries).__name__}, not a map from names to entries")
    return tuple(parameter_spec(str(name), e, where) for name, e in entries.items())
