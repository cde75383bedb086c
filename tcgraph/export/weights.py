"""The shared weights file: every distinct tensor stored once, named the same in every variant.

Variants differ only in structure, so their large initializers are the same tensors.
Each distinct content (dtype + shape + bytes) is written once into `variants/weights.bin`
and every variant refers to it by one canonical name, which lets ONNX Runtime share one
in-memory copy between sessions (see `tcgraph.runtime.ort`). Names are not trusted: the
exporter folds transposes and numbers new constants differently in every variant.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import torch

from tcgraph.errors import TcgraphError
from tcgraph.export.specs import WEIGHTS_FILE, parameter_specs  # noqa: F401  (re-exported)
from tcgraph.files import file_sha256  # noqa: F401  (re-exported)


EXTERNAL_MIN_BYTES = 1024  # initializers at least this large go to the shared file
WEIGHTS_ALIGN = 64  # byte alignment of every tensor in the shared file (cache lines, mmap)
REDO = "re-run `tcgraph transform` to rebuild it"

# torch dtype -> ONNX TensorProto data type, for hashing parameters the way ONNX stores them.
_ONNX_DTYPE = {
    torch.float32: onnx.TensorProto.FLOAT,
    torch.float16: onnx.TensorProto.FLOAT16,
    torch.bfloat16: onnx.TensorProto.BFLOAT16,
    torch.float64: onnx.TensorProto.DOUBLE,
    torch.int64: onnx.TensorProto.INT64,
    torch.int32: onnx.TensorProto.INT32,
    torch.int16: onnx.TensorProto.INT16,
    torch.int8: onnx.TensorProto.INT8,
    torch.uint8: onnx.TensorProto.UINT8,
    torch.bool: onnx.TensorProto.BOOL,
}


_TORCH_DTYPE = {str(d).removeprefix("torch."): d for d in _ONNX_DTYPE}
_DTYPE_NAMES = tuple(_TORCH_DTYPE)


class ExternalTensor(NamedTuple):
    """Where one initializer lives in the shared weights file."""

    name: str
    offset: int
    length: int
    dtype: np.dtype
    shape: tuple[int, ...]


def read_external_initializers(onnx_path: Path) -> dict[str, ExternalTensor]:
    """The initializers of one exported variant that live in the shared weights file.

    Reads only the (small) graph proto, never the weights.
    """
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError, OSError: a truncated or foreign file
        raise TcgraphError(f"cannot read the ONNX file {onnx_path}: {type(e).__name__}: {e}; the artifact folder "
                           f"is damaged; {REDO}") from e
    result = {}
    for init in model.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in init.external_data}
        if info.get("location") != WEIGHTS_FILE:
            continue
        try:
            result[init.name] = ExternalTensor(
                name=init.name,
                offset=int(info.get("offset", 0)),
                length=int(info["length"]),
                dtype=np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)),
                shape=tuple(int(d) for d in init.dims),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise TcgraphError(
                f"{onnx_path}: initializer {init.name} points into {WEIGHTS_FILE} without a valid offset and length "
                f"({type(e).__name__}: {e}); the artifact folder is damaged; {REDO}"
            ) from e
    return result



def _content_key(data_type: int, dims, data: bytes | memoryview) -> str:
    h = hashlib.sha256(f"{data_type}|{','.join(str(int(d)) for d in dims)}|".encode())
    h.update(data)
    return h.hexdigest()


def _tensor_key(t: torch.Tensor) -> str | None:
    dtype = _ONNX_DTYPE.get(t.dtype)
    if dtype is None:
        return None
    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return _content_key(dtype, t.shape, data.data)


class CanonicalNames:
    """One name per distinct tensor content, the same in every variant.

    A tensor that equals a parameter, buffer or constant of a variant graph is named by
    its FQN (`blocks.0.attn.qkv.weight`), one that equals its transpose by `<fqn>.T` (the
    exporter folds `Linear` weight transposes), anything else `const.<sha256 prefix>`.
    The first variant to use a content fixes its name.
    """

    def __init__(self, reserved: set[str]):
        self.reserved = set(reserved)
        self.by_key: dict[str, str] = {}  # content key -> canonical name
        self.used: set[str] = set()
        self.hints: dict[str, str] = {}  # content key -> readable name
        self._seen: dict[tuple, None] = {}  # tensors already hashed (same storage in many variants)

    def learn(self, gm: torch.fx.GraphModule) -> None:
        named: dict[str, torch.Tensor] = {}
        for name, t in (*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)):
            named.setdefault(name, t)
        for node in gm.graph.nodes:  # constants fx stored as plain attributes (`_tensor_constant0`)
            if node.op == "get_attr" and node.target not in named:
                value = _get_attr(gm, node.target)
                if isinstance(value, torch.Tensor):
                    named[node.target] = value
        for name, t in named.items():
            if t.numel() * t.element_size() < EXTERNAL_MIN_BYTES:
                continue
            seen = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t._version)
            if seen in self._seen:
                continue
            self._seen[seen] = None
            forms = [(t, name)]
            if t.dim() == 2:
                forms.append((t.t(), f"{name}.T"))
            for form, label in forms:
                key = _tensor_key(form)
                if key is not None:
                    self.hints.setdefault(key, label)

    def name_for(self, key: str) -> str:
        if key in self.by_key:
            return self.by_key[key]
        name = self.hints.get(key)
        if name is None or name in self.used or name in self.reserved:
            name = f"const.{key[:16]}"
            while name in self.used or name in self.reserved:
                name += "_"
        self.by_key[key] = name
        self.used.add(name)
        return name


def _get_attr(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


class WeightsFile:
    """Append-only shared weights file, each distinct content stored once, aligned."""

    def __init__(self, path: Path):
        self.path = path
        self.where: dict[str, tuple[int, int]] = {}  # content key -> (offset, length)
        self._f = None
        self._size = 0

    def __enter__(self) -> "WeightsFile":
        self._f = open(self.path, "wb")
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def add(self, key: str, data: bytes) -> tuple[int, int]:
        if key not in self.where:
            pad = -self._size % WEIGHTS_ALIGN
            self._f.write(b"\0" * pad)
            self._f.write(data)
            self.where[key] = (self._size + pad, len(data))
            self._size += pad + len(data)
        return self.where[key]

    def flush(self) -> None:
        self._f.flush()


def _tensor_bytes(init: onnx.TensorProto) -> bytes:
    if init.HasField("raw_data"):
        return init.raw_data
    return onnx.numpy_helper.to_array(init).tobytes()


def externalize(model: onnx.ModelProto, weights: WeightsFile, namer: CanonicalNames) -> list[str]:
    """Move large initializers to the shared file under canonical names; inline the rest.

    Returns the canonical names this model reads from the shared file.
    """
    graph = model.graph
    rename: dict[str, str] = {}  # old initializer name -> canonical name
    keep = []
    kept_names: set[str] = set()
    for init in graph.initializer:
        if init.data_type == onnx.TensorProto.STRING:  # never large in a DiT; keep as is
            keep.append(init)
            continue
        data = _tensor_bytes(init)
        if len(data) < EXTERNAL_MIN_BYTES:
            _set_data(init, raw=data)
            keep.append(init)
            continue
        key = _content_key(init.data_type, init.dims, data)
        name = namer.name_for(key)
        offset, length = weights.add(key, data)
        rename[init.name] = name
        if name in kept_names:  # same content twice in one graph: one initializer is enough
            continue
        kept_names.add(name)
        _set_data(init, external=(offset, length))
        keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep)

    # A canonical name may clash with a value the exporter named (`val_25` here is another
    # tensor than `val_25` in the first variant): move such values aside first.
    others = _value_names(graph) - set(rename)
    clashes = {}
    for name in sorted(kept_names & others):
        new = f"{name}__tcgraph"
        while new in others or new in kept_names or new in rename:
            new += "_"
        clashes[name] = new
    _rename_values(graph, clashes)
    _rename_values(graph, {old: new for old, new in rename.items() if old != new})
    return sorted(kept_names)


def _set_data(init: onnx.TensorProto, *, raw: bytes | None = None, external: tuple[int, int] | None = None) -> None:
    """Store `init` inline as `raw` bytes, or as a reference into the shared weights file."""
    for fld in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        init.ClearField(fld)
    del init.external_data[:]
    if external is None:
        init.data_location = onnx.TensorProto.DEFAULT
        init.raw_data = raw
        return
    init.data_location = onnx.TensorProto.EXTERNAL
    offset, length = external
    for k, val in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
        entry = init.external_data.add()
        entry.key, entry.value = k, val


def _value_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in graph.input} | {i.name for i in graph.initializer}
    for node in graph.node:
        names.update(node.output)
        for attr in node.attribute:
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                names |= _value_names(sub)
    return names


def _rename_values(graph: onnx.GraphProto, mapping: dict[str, str]) -> None:
    """Rename values everywhere in `graph` and its subgraphs (graph inputs never change)."""
    if not mapping:
        return
    for seq in (graph.initializer, graph.output, graph.value_info):
        for item in seq:
            if item.name in mapping:
                item.name = mapping[item.name]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
        for i, name in enumerate(node.output):
            if name in mapping:
                node.output[i] = mapping[name]
        for attr in node.attribute:
            if attr.HasField("g"):
                _rename_values(attr.g, mapping)
            for sub in attr.graphs:
                _rename_values(sub, mapping)


#################################################################################
#                  Parameters: the model, read back from the file               #
#################################################################################


def map_parameters(weights_path: Path, onnx_paths: list[Path], state: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Where every tensor of the model's `state` lives in the shared weights file.

    Backends that run the model's own graphs (the `torch` backend) rebuild the model from
    the artifact alone. Most tensors are already in the file, as themselves or as their
    transpose (the exporter folds `Linear` transposes); they are found by content, so
    equal tensors (adaLN-Zero weights of an untrained model) need no extra bytes.
    Tensors no variant stores (small ones live inside the ONNX files) are appended.
    Returns `{fqn: {offset, length, dtype, shape, transposed}}` for manifest.json.
    """
    stored: dict[str, tuple[int, int]] = {}  # content key -> (offset, length)
    with open(weights_path, "rb") as f:
        for path in onnx_paths:
            for t in read_external_initializers(path).values():
                f.seek(t.offset)
                data = f.read(t.length)
                onnx_type = onnx.helper.np_dtype_to_tensor_dtype(t.dtype)
                stored.setdefault(_content_key(onnx_type, t.shape, data), (t.offset, t.length))
    result = {}
    size = weights_path.stat().st_size
    with open(weights_path, "ab") as f:
        for name, tensor in state.items():
            forms = [(tensor, False)] + ([(tensor.t(), True)] if tensor.dim() == 2 else [])
            found = None
            for form, transposed in forms:
                key = _tensor_key(form)
                if key is None:
                    raise TcgraphError(
                        f"cannot store the model tensor {name} in {weights_path.name}: its dtype "
                        f"{str(tensor.dtype).removeprefix('torch.')} has no ONNX equivalent (supported: "
                        f"{', '.join(_DTYPE_NAMES)}); convert the model first (e.g. `model.float()`)"
                    )
                if key in stored:
                    found = (*stored[key], transposed)
                    break
            if found is None:
                data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                pad = -size % WEIGHTS_ALIGN
                f.write(b"\0" * pad + data)
                stored[_tensor_key(tensor)] = (size + pad, len(data))
                found = (size + pad, len(data), False)
                size += pad + len(data)
            offset, length, transposed = found
            result[name] = {"offset": offset, "length": length, "dtype": str(tensor.dtype).removeprefix("torch."),
                            "shape": list(tensor.shape), "transposed": transposed}
    return result


def load_parameters(weights_path: Path, entries) -> dict[str, torch.Tensor]:
    """The model tensors `map_parameters` recorded, read from the weights file (CPU, own memory).

    `entries` are the `ParameterSpec`s of a loaded artifact (`Artifact.parameters`), or the
    manifest's raw `{name: {offset, length, dtype, shape, transposed}}` map. A tensor that
    does not fit the file (a truncated or foreign weights file) is refused by name.
    """
    specs = parameter_specs(entries, str(weights_path)) if isinstance(entries, Mapping) else tuple(entries)
    file_size = weights_path.stat().st_size
    data = np.memmap(weights_path, dtype=np.uint8, mode="r") if file_size else np.zeros(0, np.uint8)
    state = {}
    for spec in specs:
        end = spec.offset + spec.length
        if spec.offset < 0 or end > file_size:
            raise TcgraphError(
                f"the model tensor {spec.name} lies at bytes {spec.offset}..{end} but {weights_path} has {file_size} "
                f"bytes; the folder is damaged (a truncated weights file, or one from another folder); {REDO}"
            )
        dtype = _TORCH_DTYPE.get(spec.dtype)
        if dtype is None:
            raise TcgraphError(
                f"the model tensor {spec.name} has dtype {spec.dtype!r}, which this tcgraph cannot read (supported: "
                f"{', '.join(_DTYPE_NAMES)}); the folder is damaged or from a newer tcgraph; {REDO}"
            )
        shape = list(spec.shape)[::-1] if spec.transposed else list(spec.shape)
        raw = torch.from_numpy(np.array(data[spec.offset:end]))
        try:
            t = raw.view(dtype).reshape(shape)
        except RuntimeError as e:
            raise TcgraphError(
                f"the model tensor {spec.name} ({spec.length} bytes of {spec.dtype}) does not have the shape "
                f"{list(spec.shape)}: {e}; the folder is damaged; {REDO}"
            ) from e
        state[spec.name] = t.t().contiguous() if spec.transposed else t
    return state
