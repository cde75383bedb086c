"""Torch programs: one graph of ATen operators per variant, for the `torch` backend, with no pickle.

The `torch` backend samples from the artifact folder alone: at transform time every
variant GraphModule is exported with `torch.export.export` (static shapes: the example
inputs fix them) and its lifted graph is written as `variants/<id>.program.safetensors`.

Artifacts are untrusted input (README, "Trust"): a program file is data, never code.
`torch.export.save`/`load` would unpickle what the archive asks for, and even torch's
JSON form resolves operator names by attribute lookup from `torch` (reaching `torch.os`)
and parses shape expressions with sympy's `eval`. So tcgraph writes its own small form:

- the safetensors header's metadata holds the graph as JSON: placeholders, then
  `call_function` nodes whose target is named as `aten.<op>.<overload>` (or
  `operator.getitem`), with arguments made of node references, numbers, strings, dtypes,
  devices and layouts, then the output;
- the safetensors tensors are the graph's own tensors (token indices of partial actions).

Reading resolves each target only among ATen's functional operators (`torch.ops.aten`,
no mutating or file-reading overload) and `operator.getitem`; anything else refuses the
file. The result is a plain `fx.GraphModule` built from those parts: nothing in the file
is imported, evaluated or unpickled.

Weights once (docs/design.md): a program file holds the graph, not the weights. The model's
tensors are read by name from the shared `variants/weights.bin` through the parameter map
(`map_parameters`), once for all variants.
"""
from __future__ import annotations

import json
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tcgraph.errors import TcgraphError

PROGRAMS_DIR = "variants"  # beside the ONNX files and the weights file they map
PROGRAM_SUFFIX = ".program.safetensors"
META_KEY = "tcgraph.program"  # the safetensors metadata entry that holds the graph
FORMAT = 2  # 1 was a torch.export (.pt2) archive: pickled, and no longer read
REDO = "re-run `tcgraph transform` with this tcgraph, or sample with --backend ort"
# Lifted inputs of an exported graph, as the reader names them.
KINDS = ("parameter", "buffer", "constant", "user")
# ATen overloads that a program may never call although they are functional: they read files.
_REFUSED_OPS = frozenset({"from_file"})
COND = "higher_order.cond"  # the one higher-order operator a program may call: a gated step's decision


def program_file(vid: str) -> str:
    """Relative path of the torch program of variant `vid` inside an artifact folder."""
    return f"{PROGRAMS_DIR}/{vid}{PROGRAM_SUFFIX}"


@dataclass
class Program:
    """A read program: the graph (`gm(*lifted, *user inputs)`), what it lifts, its own tensors, its info.

    `inputs`: (kind, name) per placeholder, in order; kinds as in `KINDS`, names the state
    dict key (parameter, buffer), the constant's key, or the tcgraph input name (user).
    `tensors`: the graph's own tensors by name (not in the parameter map).
    """

    gm: torch.fx.GraphModule
    inputs: list[tuple[str, str]]
    tensors: dict[str, torch.Tensor]
    info: dict[str, Any]


def _parameter_shapes(parameters) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of a parameter map: the manifest's dict `{fqn: {shape, dtype, ...}}`
    or an iterable of ParameterSpec-like objects (`.name`, `.shape`, `.dtype`)."""
    if isinstance(parameters, Mapping):
        items = [(name, e["shape"], e["dtype"]) for name, e in parameters.items()]
    else:
        items = [(p.name, p.shape, p.dtype) for p in parameters]
    return {name: (tuple(int(d) for d in shape), str(dtype)) for name, shape, dtype in items}


def export_program(variant) -> torch.export.ExportedProgram:
    """`torch.export` of one variant graph on its example inputs (static shapes)."""
    args = tuple(variant.example_inputs[n] for n in variant.input_names)
    try:
        with torch.no_grad():
            return torch.export.export(variant.gm, args, strict=False)
    except Exception as e:
        raise TcgraphError(
            f"torch.export cannot export variant {variant.id} ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "the torch backend needs it: report this graph, or sample with --backend ort"
        ) from e


#################################################################################
#                                    Writing                                    #
#################################################################################


def _encode(value, where: str):
    """A node argument as JSON: lists stay lists, everything typed is a one-key dict."""
    if isinstance(value, torch.fx.Node):
        return {"node": value.name}
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else {"float": repr(value)}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, where) for v in value]
        return items if isinstance(value, list) else {"tuple": items}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    raise TcgraphError(f"{where} has an argument of type {type(value).__name__} ({value!r}) that tcgraph's "
                       "program files cannot store; report this graph, or sample with --backend ort")


def _target_name(target, where: str) -> str:
    if target is operator.getitem:
        return "operator.getitem"
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten":
        return f"aten.{target._schema.name.split('::')[1]}.{target._overloadname}"
    if target is torch.ops.higher_order.cond:
        return COND
    raise TcgraphError(f"{where} calls {target!r}, which is not an ATen operator; tcgraph's program files store "
                       "ATen graphs only: report this graph, or sample with --backend ort")


def _model_name(name: str, shapes: dict) -> str:
    """The parameter map's name of a lifted tensor: a gated step's graphs read the model's weights as
    `head.<name>`, `compute.tail.<name>`, …; the longest dotted suffix the map has, else `name`."""
    parts = name.split(".")
    return next((".".join(parts[i:]) for i in range(len(parts)) if ".".join(parts[i:]) in shapes), name)


def _graph_json(ep: torch.export.ExportedProgram, vid: str, input_names: list[str], rename: dict) -> dict:
    kind_of = {"PARAMETER": "parameter", "BUFFER": "buffer", "CONSTANT_TENSOR": "constant", "USER_INPUT": "user"}
    inputs, users = [], iter(input_names)
    for spec in ep.graph_signature.input_specs:
        if spec.kind.name not in kind_of:
            raise TcgraphError(f"variant {vid} exports a {spec.kind.name} input, which tcgraph programs never have")
        kind = kind_of[spec.kind.name]
        inputs.append([kind, spec.arg.name, next(users) if kind == "user" else rename.get(spec.target, spec.target)])
    if any(spec.kind.name != "USER_OUTPUT" for spec in ep.graph_signature.output_specs):
        raise TcgraphError(f"variant {vid} mutates its inputs or buffers; tcgraph programs are functional")
    return {"inputs": inputs, "nodes": _nodes_json(ep.graph_module, vid)}


def _nodes_json(gm: torch.fx.GraphModule, vid: str) -> list:
    """The nodes of `gm` after its placeholders; a branch of a `cond` (a gated step) is a `subgraph`
    entry: its placeholders' names and its own nodes."""
    nodes = []
    for node in gm.graph.nodes:
        where = f"variant {vid}, node {node.name}"
        if node.op == "placeholder":
            continue
        if node.op == "call_function":
            nodes.append({"name": node.name, "target": _target_name(node.target, where),
                          "args": _encode(list(node.args), where),
                          "kwargs": {k: _encode(v, where) for k, v in node.kwargs.items()}})
        elif node.op == "output":
            nodes.append({"name": node.name, "output": _encode(node.args[0], where)})
        elif node.op == "get_attr" and isinstance(getattr(gm, str(node.target), None), torch.fx.GraphModule):
            sub = getattr(gm, node.target)
            nodes.append({"name": node.name, "subgraph": {
                "inputs": [n.name for n in sub.graph.nodes if n.op == "placeholder"], "nodes": _nodes_json(sub, vid)}})
        else:
            raise TcgraphError(f"{where} is a {node.op} node; tcgraph's program files store lifted ATen graphs only")
    return nodes


def write_programs(folder: Path, variants: Iterable, parameters, exported: Mapping | None = None) -> dict[str, str]:
    """Export and save the torch program of every variant into `folder`; returns id -> relative file.

    `variants`: objects with `.id`, `.gm`, `.input_names`, `.output_names`, `.example_inputs`
    (`VariantGraph`). `parameters`: the parameter map of the folder's weights file (what
    `map_parameters` returned, or `Artifact.parameters`); the tensors in it are not saved
    (the program names them, `info["weights"]` lists them), the graph's own tensors are.
    `exported`: id -> the variant's `torch.export` program where one was made already (the ONNX
    export's, `tcgraph.export.onnx.export_each`); the others are exported here.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    shapes = _parameter_shapes(parameters)
    (folder / PROGRAMS_DIR).mkdir(parents=True, exist_ok=True)
    files = {}
    for variant in variants:
        ep = (exported or {}).get(variant.id) or export_program(variant)
        mapped, own = [], {}
        rename = {name: _model_name(name, shapes) for name in ep.state_dict}
        for name, tensor in ep.state_dict.items():
            name = rename[name]
            if name in mapped:  # one weight that several graphs of a gated step read
                continue
            if name not in shapes:  # graph-own tensors (token indices of partial actions): kept in the file
                own[name] = tensor.detach().contiguous()
                continue
            got = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
            if shapes[name] != got:
                raise TcgraphError(
                    f"variant {variant.id} reads the tensor {name} {got}, but the parameter map has {shapes[name]}; "
                    "program files do not store the model's weights, so they must be those of the mapped model: "
                    "map the state dict of the model the variants come from"
                )
            mapped.append(name)
        own.update({name: t.detach().contiguous() for name, t in ep.constants.items()})
        info = {"format": FORMAT, "id": variant.id, "inputs": list(variant.input_names),
                "outputs": list(variant.output_names), "weights": mapped, "graph": _graph_json(ep, variant.id, list(variant.input_names), rename)}
        rel = program_file(variant.id)
        save_file(own, str(folder / rel), metadata={META_KEY: json.dumps(info)})
        files[variant.id] = rel
    return files


#################################################################################
#                                    Reading                                    #
#################################################################################


class _Refused(ValueError):
    """A program file that is not what tcgraph writes: named in the one error `read_program` raises."""


def _resolve(name: str):
    """The callable a stored target names: ATen's functional operators, `operator.getitem` and `cond`
    (a gated step's decision), nothing else."""
    if name == "operator.getitem":
        return operator.getitem
    if name == COND:
        return torch.ops.higher_order.cond
    parts = name.split(".")
    if len(parts) != 3 or parts[0] != "aten" or not all(p.isidentifier() for p in parts[1:]):
        raise _Refused(f"a node calls {name!r}, which is not an ATen operator")
    _, op, overload = parts
    if op in _REFUSED_OPS:
        raise _Refused(f"a node calls {name!r}, an operator that reads files")
    try:
        packet = getattr(torch.ops.aten, op)
        target = getattr(packet, overload)
    except (AttributeError, RuntimeError) as e:
        raise _Refused(f"a node calls {name!r}, which this torch does not have") from e
    # only an overload object passes (an attribute such as `__class__` is not one), and only a functional one
    if not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable:
        raise _Refused(f"a node calls {name!r}, which is not a functional ATen operator")
    return target


def _decode(value, env: dict[str, torch.fx.Node], device: torch.device | None):
    if isinstance(value, list):
        return [_decode(v, env, device) for v in value]
    if not isinstance(value, dict):
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        raise _Refused(f"an argument is {type(value).__name__}")
    if len(value) != 1:
        raise _Refused(f"an argument is the object {sorted(value)[:4]}")
    (kind, raw), = value.items()
    if kind == "node":
        if raw not in env:
            raise _Refused(f"an argument names the node {raw!r} before it is defined")
        return env[raw]
    if kind == "tuple" and isinstance(raw, list):
        return tuple(_decode(v, env, device) for v in raw)
    if kind == "float" and raw in ("inf", "-inf", "nan"):
        return float(raw)
    if kind in ("dtype", "layout", "memory_format") and isinstance(raw, str) and raw.isidentifier():
        got = getattr(torch, raw, None)
        wanted = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}[kind]
        if isinstance(got, wanted):
            return got
    if kind == "device" and isinstance(raw, str):
        try:
            dev = torch.device(raw)
        except (RuntimeError, TypeError):
            raise _Refused(f"an argument names the device {raw!r}") from None
        return device if device is not None and dev.type == "cpu" else dev
    raise _Refused(f"an argument is {{{kind!r}: {raw!r}}}"[:120])


def _build_graph(graph_json, device: torch.device | None) -> tuple[torch.fx.GraphModule, list[tuple[str, str]]]:
    if not isinstance(graph_json, dict) or not isinstance(graph_json.get("inputs"), list) \
            or not isinstance(graph_json.get("nodes"), list):
        raise _Refused("it has no graph")
    graph = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    inputs = []
    for entry in graph_json["inputs"]:
        if not (isinstance(entry, list) and len(entry) == 3 and entry[0] in KINDS
                and all(isinstance(s, str) and s for s in entry)) or entry[1] in env:
            raise _Refused(f"an input is {entry!r}"[:120])
        kind, name, target = entry
        env[name] = graph.placeholder(name)
        inputs.append((kind, target))
    root = torch.nn.Module()
    _build_nodes(graph, env, graph_json["nodes"], root, device)
    try:
        graph.lint()
    except Exception as e:  # noqa: BLE001 - fx's own checks, whatever they raise
        raise _Refused(f"its graph is not well formed ({e})") from None
    return torch.fx.GraphModule(root, graph), inputs


def _build_subgraph(entry, device: torch.device | None, depth: int) -> torch.fx.GraphModule:
    """A `cond` branch: placeholders by name, then its nodes (nested at most a few levels)."""
    if depth > 4 or not isinstance(entry, dict) or not isinstance(entry.get("inputs"), list) \
            or not isinstance(entry.get("nodes"), list) or not all(isinstance(n, str) and n for n in entry["inputs"]) \
            or len(set(entry["inputs"])) != len(entry["inputs"]):
        raise _Refused("a subgraph is not a graph")
    graph, env, root = torch.fx.Graph(), {}, torch.nn.Module()
    for name in entry["inputs"]:
        env[name] = graph.placeholder(name)
    _build_nodes(graph, env, entry["nodes"], root, device, depth + 1)
    return torch.fx.GraphModule(root, graph)


def _build_nodes(graph: torch.fx.Graph, env: dict, entries, root: torch.nn.Module, device, depth: int = 0) -> None:
    done = False
    for entry in entries:
        if done or not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or entry["name"] in env:
            raise _Refused("its nodes are not a graph (a node after the output, or a repeated or missing name)")
        if "output" in entry:
            graph.output(_decode(entry["output"], env, device))
            done = True
            continue
        if "subgraph" in entry:
            attr = f"subgraph_{len(root._modules)}"
            root.add_module(attr, _build_subgraph(entry["subgraph"], device, depth))
            env[entry["name"]] = graph.get_attr(attr)
            continue
        args, kwargs = entry.get("args"), entry.get("kwargs")
        if not isinstance(args, list) or not isinstance(kwargs, dict) or not isinstance(entry.get("target"), str):
            raise _Refused(f"node {entry['name']!r} is not a call")
        node = graph.call_function(_resolve(entry["target"]), tuple(_decode(args, env, device)),
                                   {str(k): _decode(v, env, device) for k, v in kwargs.items()})
        env[entry["name"]] = node
    if not done:
        raise _Refused("its graph has no output")


def read_program(path: Path, device: torch.device | str | None = None) -> Program:
    """A saved program: its graph (devices in it moved to `device`), lifted inputs, own tensors, info.

    Nothing is unpickled, imported or evaluated; a file that is not a tcgraph program of
    this format (a `.pt2` archive of older versions too) is refused with one TcgraphError.
    """
    from safetensors import safe_open

    path = Path(path)
    if path.suffix == ".pt2":
        raise TcgraphError(
            f"{path} is a torch.export archive, which tcgraph no longer loads: loading one unpickles what the "
            f"archive asks for, so an artifact could run code; {REDO}"
        )
    device = None if device is None else torch.device(device)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get(META_KEY)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        info = json.loads(meta) if meta else {}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own errors on damaged files
        raise TcgraphError(f"cannot read the torch program {path} ({type(e).__name__}: {e}); the folder is "
                           f"damaged; {REDO}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else None
        raise TcgraphError(f"{path} is not a tcgraph torch program of format {FORMAT} (found {found}); {REDO}")
    try:
        gm, inputs = _build_graph(info.get("graph"), device)
    except _Refused as e:
        raise TcgraphError(f"the torch program {path} is refused: {e}; tcgraph programs are graphs of ATen "
                           f"operators only, so the file was not written by tcgraph or was edited; {REDO}") from None
    return Program(gm, inputs, tensors, info)
