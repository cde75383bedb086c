"""One ONNX Runtime session for every variant of an artifact: the variants behind `If` nodes.

Why (issue 15, measured in benchmarks/bench_runtime.py): one InferenceSession per variant
means one intra-op thread pool per variant and, for the weights to exist once, shared
initializers without pre-packing (slower matrix products). A single model whose graph
holds every variant as a branch of a chain of `If` nodes, chosen by one int64 input,
has one thread pool, one memory arena and each weight once by construction, so ONNX
Runtime may pre-pack it.

The combined model is assembled in memory when the runner activates, from the variant
files as they are written (nothing new in the artifact folder, and folders written
before it work unchanged):

    inputs   tcgraph.variant (int64 scalar: the variant's index in the manifest), then the
             union of the variants' inputs by name
    weights  the variants' external initializers (canonical names, `weights.bin`), once,
             in the top graph, where every branch reads them as outer-scope values
    body     If(variant == 0, then=v0, else=If(variant == 1, then=v1, else=...))
    outputs  `next/<name>` for the union of the variants' outputs; a variant's branch
             gives a 0-element tensor for the outputs it does not have

An input that every variant reads with the same shape keeps its static shape; any other
input gets named free dimensions, and a variant that does not read it is fed a 0-element
tensor (`CombinedModel.zero_feeds`). Inside a branch, node outputs and local initializers
are prefixed with the variant id, so no name of one branch can shadow another's or the top
graph's.

Work on weights alone is hoisted (`ConstantWork`): a node of a branch whose inputs are all
weights, constants or such nodes' outputs (the Transpose and Slices of a token-pruned
attention's q/k/v weight, emit.split_in_proj) moves to the top graph, once for all
branches that do the same. ONNX Runtime folds such nodes into tensors when it loads the
model; left in the branches, every variant that prunes a block's attention would hold its
own copy of that block's q/k/v weight.
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import Artifact

SELECTOR = "tcgraph.variant"  # int64 scalar input: which variant runs
OUTPUT_PREFIX = "next/"


@dataclass
class CombinedModel:
    """The combined ModelProto and how a variant's feeds and outputs map onto it."""

    model: object  # onnx.ModelProto, external data still referring to weights.bin
    variant_ids: list[str]
    inputs: dict[str, tuple[tuple[int, ...], str]]  # union of inputs: name -> (shape of a reader, dtype)
    outputs: list[str]  # union of outputs (manifest names), in graph output order
    readers: dict[str, set[str]] = field(default_factory=dict)  # input name -> variant ids reading it

    def index(self, vid: str) -> int:
        return self.variant_ids.index(vid)

    def zero_feeds(self, vid: str) -> dict[str, np.ndarray]:
        """0-element tensors for the inputs variant `vid` does not read (shape (0, ..., 0))."""
        return {name: np.zeros((0,) * len(shape), dtype=dtype)
                for name, (shape, dtype) in self.inputs.items() if vid not in self.readers[name]}


def output_name(name: str) -> str:
    """The combined graph's output for a variant output `name` (manifest name)."""
    return OUTPUT_PREFIX + name


def combine_variants(artifact: Artifact, *, pack_once: bool = False) -> CombinedModel:
    """Assemble the combined model of `artifact`'s variants (see the module docstring). With
    `pack_once`, every weight that more than one node reads is also a graph input (never fed:
    its initializer is its value), which ONNX Runtime does not pre-pack: each kernel that
    pre-packs a weight keeps its own packed copy, so only the weights one kernel reads are
    packed, and the model holds each weight once."""
    import onnx
    from onnx import TensorProto, helper

    variants = list(artifact.variants)
    if not variants:
        raise TcgraphError(f"{artifact.root} has no variants to combine")
    models = []
    for v in variants:
        path = artifact.variant_path(v.id)
        try:
            models.append(onnx.load(str(path), load_external_data=False))
        except Exception as e:  # a damaged file; load_artifact's hashes usually catch it first
            raise TcgraphError(f"cannot read variant {v.id} ({path}): {e}; re-run `tcgraph transform`") from e

    inputs: dict[str, tuple[tuple[int, ...], str]] = {}
    shapes: dict[str, set[tuple[int, ...]]] = {}
    readers: dict[str, set[str]] = {}
    out_dtypes: dict[str, str] = {}
    out_ranks: dict[str, int] = {}
    for v in variants:
        for spec in v.inputs:
            inputs.setdefault(spec.name, (tuple(spec.shape), spec.dtype))
            shapes.setdefault(spec.name, set()).add(tuple(spec.shape))
            readers.setdefault(spec.name, set()).add(v.id)
            if inputs[spec.name][1] != spec.dtype:
                raise TcgraphError(f"variants disagree on the dtype of input {spec.name} ({inputs[spec.name][1]} "
                                   f"vs {spec.dtype} in {v.id}); re-run `tcgraph transform`")
        for spec in v.outputs:
            out_dtypes.setdefault(spec.name, spec.dtype)
            out_ranks.setdefault(spec.name, len(spec.shape))
    if SELECTOR in inputs:
        raise TcgraphError(f"a variant has an input named {SELECTOR!r}, which the combined session reserves")
    outputs = list(out_dtypes)

    def elem(dtype: str) -> int:
        return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))

    def output_info(value: str, name: str):
        """An output of a chain graph or branch: its dtype, its rank, every dimension free."""
        return helper.make_tensor_value_info(value, elem(out_dtypes[name]),
                                             [f"{name}/d{i}" for i in range(out_ranks[name])])

    shared: dict[str, object] = {}  # external initializers, once for all branches
    hoisted = ConstantWork()
    common_inputs = {name for name in inputs if len(shapes[name]) == 1 and len(readers[name]) == len(variants)}
    common = common_work([m.graph for m in models], common_inputs) if len(models) > 1 else set()
    branches = []
    for v, m in zip(variants, models):
        branches.append(_branch(v, m.graph, outputs, output_info, shared, hoisted, common, common_inputs))

    def chain(k: int):
        """The graph choosing among variants k, k+1, ...; the last is its own branch."""
        if k == len(branches) - 1:
            return branches[k]
        const, cond = f"select/{k}", f"select/{k}/is"
        result = [f"select/{k}/{name}" for name in outputs]
        nodes = [
            helper.make_node("Constant", [], [const], name=const,
                             value=helper.make_tensor(const, TensorProto.INT64, [], [k])),
            helper.make_node("Equal", [SELECTOR, const], [cond], name=cond),
            helper.make_node("If", [cond], result, name=f"select/{k}/if",
                             then_branch=branches[k], else_branch=chain(k + 1)),
        ]
        return helper.make_graph(nodes, f"select_{k}", [], [output_info(r, n) for r, n in zip(result, outputs)])

    top = chain(0)  # with one variant, its branch itself (its own constants then move to the top graph)
    graph_inputs = [helper.make_tensor_value_info(SELECTOR, TensorProto.INT64, [])]
    for name, (shape, dtype) in inputs.items():
        static = len(shapes[name]) == 1 and len(readers[name]) == len(variants)
        dims = list(shape) if static else [f"{name}/d{i}" for i in range(len(shape))]
        graph_inputs.append(helper.make_tensor_value_info(name, elem(dtype), dims))
    nodes = hoisted.nodes + list(top.node)
    graph_outputs = []
    for produced, name in zip(top.output, outputs):
        nodes.append(helper.make_node("Identity", [produced.name], [output_name(name)], name=f"result/{name}"))
        graph_outputs.append(output_info(output_name(name), name))
    initializers = list(shared.values()) + hoisted.initializers + list(top.initializer)
    if pack_once:
        reads = _reads(nodes)
        graph_inputs += [helper.make_tensor_value_info(w.name, w.data_type, list(w.dims))
                         for w in shared.values() if reads[w.name] > 1]
    graph = helper.make_graph(nodes, "tcgraph_variants", graph_inputs, graph_outputs, initializer=initializers)
    first = models[0]
    opsets = {o.domain: o.version for m in models for o in m.opset_import}
    model = helper.make_model(graph, ir_version=first.ir_version,
                              opset_imports=[helper.make_opsetid(d, n) for d, n in opsets.items()])
    return CombinedModel(model, [v.id for v in variants], inputs, outputs, readers)


def _reads(nodes, counts: Counter | None = None) -> Counter:
    """Value name -> how many node inputs read it, in `nodes` and the subgraphs of their attributes."""
    counts = Counter() if counts is None else counts
    for node in nodes:
        counts.update(i for i in node.input if i)
        for a in node.attribute:
            if a.type == a.GRAPH:
                _reads(a.g.node, counts)
    return counts


# Ops that ONNX Runtime folds when every input is constant, and that are safe to compute once
# in the top graph for every branch that asks for the same (no randomness, no subgraphs).
HOISTABLE = frozenset({"Constant", "Transpose", "Slice", "Reshape", "Unsqueeze", "Squeeze", "Concat", "Cast",
                       "Identity", "Split", "Gather"})


def tensor_key(init) -> tuple:
    """What an embedded constant tensor is, by content (two branches' equal constants: one key)."""
    data = init.raw_data if init.raw_data else init.SerializePartialToString()
    return ("tensor", init.data_type, tuple(init.dims), hashlib.sha256(data).hexdigest())


def node_key(node, input_keys: list) -> tuple | None:
    """What a node computes, by op, attributes and what its inputs are (a digest, so that keys stay
    small along a deep graph); None if an input is unknown."""
    if any(k is None for k in input_keys):
        return None
    text = repr((node.domain, node.op_type, [a.SerializeToString() for a in node.attribute], input_keys))
    return ("node", hashlib.sha256(text.encode()).hexdigest())


class ConstantWork:
    """Top-graph nodes computed once for every branch that computes the same, deduplicated.

    Two kinds: work on weights and constants alone (any branch; ONNX Runtime folds it when it
    loads the model), and work that every variant does alike on the model's inputs (the
    embeddings and the adaLN modulations of a DiT: every step computes them), which then runs
    once per step in the top graph, its weights read by one kernel (pre-packed once).
    A value is keyed by what it is: a weight by its canonical name, a branch's own constant
    tensor by its content, a common input by its name, a node's output by (op, domain,
    attributes, input keys, index), so two branches asking for the same get one top-graph value."""

    def __init__(self):
        self.nodes: list = []
        self.initializers: list = []
        self._names: dict[tuple, str] = {}  # value key -> top-graph name

    def constant(self, init) -> tuple[tuple, str]:
        """(key, top-graph name) of a branch's own (embedded) constant tensor."""
        key = tensor_key(init)
        if key not in self._names:
            copy = type(init)()
            copy.CopyFrom(init)
            copy.name = self._names[key] = f"shared/c{len(self.initializers)}"
            self.initializers.append(copy)
        return key, self._names[key]

    def node(self, node, input_keys: list[tuple], input_names: list[str]) -> list[tuple[tuple, str]]:
        """(key, top-graph name) of each output of `node`, added once per distinct key."""
        base = node_key(node, input_keys)
        keys = [base + (j,) for j in range(len(node.output))]
        if keys[0] not in self._names:
            k = len(self.nodes)
            outs = [f"shared/n{k}/{j}" if o else "" for j, o in enumerate(node.output)]
            copy = type(node)()
            copy.CopyFrom(node)
            del copy.input[:]
            copy.input.extend(input_names)
            del copy.output[:]
            copy.output.extend(outs)
            copy.name = f"shared/n{k}"
            self.nodes.append(copy)
            self._names.update(zip(keys, outs))
        return [(key, self._names[key]) for key in keys]


def common_work(graphs: list, common_inputs: set[str]) -> set[tuple]:
    """Keys of the nodes that every one of `graphs` computes from `common_inputs` (inputs every
    variant reads with one static shape), weights and constants alone."""
    seen = None
    for graph in graphs:
        keys = set()
        for key in _keys(graph, common_inputs).values():
            if key is not None and key[0] == "node":
                keys.add(key[:-1])  # the node, not one of its outputs
        seen = keys if seen is None else seen & keys
    return seen or set()


def _keys(graph, common_inputs: set[str]) -> dict[str, tuple | None]:
    """Value name -> its key (see ConstantWork) for every value of `graph` that has one."""
    from onnx import TensorProto

    keys: dict[str, tuple | None] = {name: ("input", name) for name in common_inputs}
    keys[""] = ("none",)
    for init in graph.initializer:
        keys[init.name] = ("weight", init.name) if init.data_location == TensorProto.EXTERNAL else tensor_key(init)
    for node in graph.node:
        base = node_key(node, [keys.get(i) for i in node.input])
        for j, out in enumerate(node.output):
            if out:
                keys[out] = None if base is None else base + (j,)
    return keys


def _branch(variant, graph, outputs: list[str], output_info, shared: dict, hoisted: ConstantWork,
            common: set[tuple], common_inputs: set[str]):
    """One variant's graph as an `If` branch: no inputs (it reads the top graph's by name), its
    external initializers moved to `shared`, its work on weights alone and the work in `common`
    (node keys every variant computes) moved to `hoisted`, every union output produced (0
    elements, the same rank, if absent)."""
    from onnx import TensorProto, helper

    vid = variant.id
    prefix = f"{vid}/"
    if any(a.type in (a.GRAPH, a.GRAPHS) for n in graph.node for a in n.attribute):
        raise TcgraphError(f"variant {vid} already holds a subgraph; the combined session cannot nest it")
    rename: dict[str, str] = {}
    local = []
    constant: dict[str, tuple] = {}  # branch value -> its key in `hoisted`, for values known at load time
    top: dict[str, str] = {name: name for name in common_inputs}  # branch value -> its top-graph name
    known: dict[str, tuple] = {name: ("input", name) for name in common_inputs}  # values the top graph has
    embedded = {}
    for init in graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            shared.setdefault(init.name, init)  # canonical names: the same tensor in every variant
            constant[init.name], top[init.name] = ("weight", init.name), init.name
            known[init.name] = constant[init.name]
        else:
            embedded[init.name] = init
            copy = type(init)()
            copy.CopyFrom(init)
            rename[init.name] = copy.name = prefix + init.name
            local.append(copy)
            constant[init.name] = ("local", init.name)  # a real key once a hoisted node reads it
            known[init.name] = constant[init.name]
    for node in graph.node:
        for out in node.output:
            if out:
                rename[out] = prefix + out
    nodes = []
    for node in graph.node:
        inputs = [i for i in node.input if i]
        on_constants = node.op_type in HOISTABLE and all(i in constant for i in inputs) and all(node.input)
        key = None
        if not on_constants and all(i in known for i in inputs):
            for i in inputs:  # the branch's own constants by content, as common_work keyed them
                if known[i][0] == "local":
                    known[i] = tensor_key(embedded[i])
            key = node_key(node, [known[i] if i else ("none",) for i in node.input])
        if not on_constants and (key is None or key not in common):
            copy = type(node)()
            copy.CopyFrom(node)
            del copy.input[:]
            copy.input.extend(rename.get(i, i) for i in node.input)
            del copy.output[:]
            copy.output.extend(rename.get(o, o) for o in node.output)
            copy.name = prefix + (node.name or node.op_type)
            nodes.append(copy)
            continue
        for i in inputs:
            if i in embedded and i not in top:  # a branch's own constant: into the top graph by content
                key_i, top[i] = hoisted.constant(embedded[i])
                known[i] = constant[i] = key_i
        keys = [known[i] if i else ("none",) for i in node.input]
        names = [top[i] if i else "" for i in node.input]
        for out, (key, name) in zip(node.output, hoisted.node(node, keys, names)):
            if out:
                known[out], rename[out], top[out] = key, name, name
                if on_constants:  # known when the model loads: later work on it may be hoisted too
                    constant[out] = key
    graph_outputs = {o.name for o in graph.output}
    missing = [spec.onnx_name for spec in variant.outputs if spec.onnx_name not in graph_outputs]
    if missing:
        raise TcgraphError(f"variant {vid}'s ONNX file has no outputs {missing}, which its manifest lists; "
                           "re-run `tcgraph transform`")
    produced = {spec.name: rename.get(spec.onnx_name, spec.onnx_name) for spec in variant.outputs}
    results = []
    for name in outputs:
        result = f"{prefix}result/{name}"
        if name in produced:  # Identity: a branch output must be a value of its own
            nodes.append(helper.make_node("Identity", [produced[name]], [result], name=result))
        else:
            info = output_info(result, name)
            rank = len(info.type.tensor_type.shape.dim)
            nodes.append(helper.make_node("Constant", [], [result], name=result, value=helper.make_tensor(
                result, info.type.tensor_type.elem_type, [0] * rank, [])))
        results.append(output_info(result, name))
    used = {i for node in nodes for i in node.input}
    local = [init for init in local if init.name in used]  # those only hoisted nodes read went with them
    return helper.make_graph(nodes, f"variant_{vid}", [], results, initializer=local)
