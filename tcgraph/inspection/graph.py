"""Read one exported variant back from its ONNX file: a node table with FLOPs, and a
diff between two variants by a key that survives re-export.

Raw ONNX node names (`node_MatMul_25`) are numbered per export, so two variants of the
same model name the same matrix product differently. The dynamo exporter records the
torch module scope of every node (`pkg.torch.onnx.name_scopes`), but the blocks were
inlined before export, so that scope is the module's path inside its block (the branch
module, say), not from the model. The block comes from data flow instead: the canonical
initializer names (a block's weights lie under `<container>.<i>.`, see `tcgraph.export.onnx`)
and cache inputs (`cache.<l>.<branch>`) anchor nodes to a block, and the anchor propagates
forward. Where the blocks are, and each branch's module and norms inside a block of its kind,
the artifact's block table says (`tcgraph.export.blocks.BlockTable`, from the manifest); this
module names no model's modules. A node whose every consumer lies in one branch (the norm
and modulation feeding it) belongs to that branch. The key of a node is then
`(unit, scope, op_type, occurrence)`: unit `unit_name(l, branch)`, `unit_name(l)` (adaLN,
gates, residual), a top-level module of the table, or `model`.

Unit names keep the labels earlier versions showed, `blocks.3.attn` and `blocks.3` (the README's
inspect example shows them): a block's global index and the recipe's branch name, whatever the
model calls its modules (a diffusers DiT's `transformer_blocks.3.attn1` is `blocks.3.attn` too).

Forecast branches (`forecast.w` among the inputs) run no module: their weighted sum
(`Gather` of a weight, the weight times the gate where the weights are folded into the gate's
multiply, `Mul` by a history input `cache.<l>.<br>[.h<j>]`, `Add`s) gets the branch's unit and
scope `forecast`, so that a diff shows it where the branch was.

Only the graph proto is read (`load_external_data=False`); initializer shapes are in it.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import onnx

from tcgraph.errors import TcgraphError
from tcgraph.names import BRANCH_ORDER, FORECAST_WEIGHTS, INPUT_SUFFIX, history_index, is_cache

if TYPE_CHECKING:
    from tcgraph.export.blocks import BlockTable  # only its methods are used here: no import of the export package

_SCOPE_KEY = "pkg.torch.onnx.name_scopes"
FLOP_OPS = ("MatMul", "Gemm", "Conv")
UNIT_WORD = "blocks"  # the label of block units (see the module docstring): a display word, not a module path
MODEL_UNIT = "model"  # nodes outside every block and top-level module (e.g. a SiLU all blocks share)
NodeKey = tuple[str, str, str, int]  # (unit, scope, op_type, occurrence)


def unit_name(block: int, branch: str | None = None) -> str:
    """Display name of a block's unit: `blocks.3.attn` for a branch, `blocks.3` for the rest of the block."""
    return f"{UNIT_WORD}.{block}" + (f".{branch}" if branch else "")


@dataclass
class GraphNode:
    name: str  # raw ONNX name, for reading the file by hand
    op_type: str
    scope: str  # the module scopes that ran it, joined by "/" (inside a block: paths in the block)
    block: int | None
    branch: str | None  # the recipe's branch name ("attn", "mlp", …) for nodes of a branch, else None
    flops: int
    inputs: list[str]
    outputs: list[str]
    key: NodeKey = ("", "", "", 0)

    @property
    def unit(self) -> str:
        return self.key[0]

    def to_json(self) -> dict:
        return {"name": self.name, "op": self.op_type, "unit": self.unit, "scope": self.scope,
                "block": self.block, "branch": self.branch, "flops": self.flops,
                "key": "/".join(str(k) for k in self.key)}


@dataclass
class VariantGraphInfo:
    inputs: dict[str, list[int]]  # graph input name -> shape
    outputs: dict[str, list[int]]
    nodes: list[GraphNode] = field(default_factory=list)
    blocks: BlockTable | None = None  # the block table the nodes were attributed with

    @property
    def flops(self) -> int:
        return sum(n.flops for n in self.nodes)

    def by_key(self) -> dict[NodeKey, GraphNode]:
        return {n.key: n for n in self.nodes}


def _shape(value) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]


def read_variant_graph(path: Path, blocks: BlockTable) -> VariantGraphInfo:
    """Node table of one variant ONNX file (graph proto only, weights not read), its nodes
    attributed to units with `blocks`, the artifact's block table (`Artifact.blocks`)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, OSError, …
        raise TcgraphError(f"cannot read {path}: {type(e).__name__}: {e}; the artifact folder is damaged; "
                           "re-run `tcgraph transform` to rebuild it") from e
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError, RuntimeError):
        inferred = model  # keep going without shapes: FLOPs of unknown shapes count 0
    g = inferred.graph
    shapes: dict[str, list[int]] = {}
    for v in (*g.input, *g.value_info, *g.output):
        shapes[v.name] = _shape(v)
    init_names = set()
    for init in g.initializer:
        shapes[init.name] = [int(d) for d in init.dims]
        init_names.add(init.name)
    nodes = list(g.node)
    info = VariantGraphInfo(inputs={i.name: _shape(i) for i in g.input if i.name not in init_names},
                            outputs={o.name: _shape(o) for o in g.output}, blocks=blocks)

    scopes = []
    for n in nodes:
        md = {p.key: p.value for p in n.metadata_props}
        raw = md.get(_SCOPE_KEY)
        parts = _parse_scopes(raw)
        scopes.append(parts[:-1] if parts else [])  # the last part is the aten node name: per-export

    # 1. Block anchors: a block's weights and caches, propagated forward (max block among a node's ancestors).
    producer: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            producer[o] = i
    anc = [-1] * len(nodes)
    for i, n in enumerate(nodes):
        best = -1
        for name in n.input:
            if name in init_names or name in info.inputs:
                b = blocks.block_of(name)
                best = best if b is None else max(best, b)
            elif name in producer:
                best = max(best, anc[producer[name]])
        anc[i] = best
    consumers: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(nodes):
        for name in n.input:
            if name in producer:
                consumers[producer[name]].append(i)
    outputs = set(info.outputs)

    # 2. Units: branch core by scope, branch preparation by consumers (reverse order).
    top = [s[0] if s else "" for s in scopes]  # the outermost module that ran the node
    module = [blocks.top_module(t) if t else None for t in top]  # a top-level module outside the blocks
    unit: list[str | None] = [None] * len(nodes)
    block: list[int | None] = [None] * len(nodes)
    branch: list[str | None] = [None] * len(nodes)
    for i in reversed(range(len(nodes))):
        cons = consumers.get(i, [])
        core = blocks.kind_at(anc[i]).branch_at(top[i]) if anc[i] >= 0 and top[i] else None
        if core is not None:
            block[i], branch[i] = anc[i], core
        elif module[i] is not None:
            pass
        elif cons and not any(o in outputs for o in nodes[i].output):
            labels = {(block[c], branch[c]) for c in cons}
            if len(labels) == 1:
                b, br = labels.pop()
                if br is not None and b is not None and (not top[i] or blocks.kind_at(b).is_norm(top[i])):
                    block[i], branch[i] = b, br
        if block[i] is None and module[i] is None:
            if anc[i] >= 0:
                block[i] = anc[i]
            elif top[i] and cons and len({block[c] for c in cons}) == 1:
                block[i] = block[cons[0]]  # e.g. the SiLU of one block's adaLN input
        unit[i] = unit_name(block[i], branch[i]) if block[i] is not None else module[i] or MODEL_UNIT

    for i, (b, br) in _forecast_nodes(nodes, info.inputs, producer, consumers).items():
        block[i], branch[i], unit[i], scopes[i] = b, br, unit_name(b, br), ["forecast"]

    counts: Counter = Counter()
    for i, n in enumerate(nodes):
        scope = "/".join(scopes[i])
        base = (unit[i], scope, n.op_type)
        key = (*base, counts[base])
        counts[base] += 1
        info.nodes.append(GraphNode(name=n.name, op_type=n.op_type, scope=scope, block=block[i], branch=branch[i],
                                    flops=_node_flops(n, shapes), inputs=list(n.input), outputs=list(n.output),
                                    key=key))
    return info


def _forecast_nodes(nodes, inputs: dict, producer: dict[str, int], consumers: dict[int, list[int]]) -> dict:
    """{node index: (block, branch)} of the forecast weighted sums; empty without `forecast.w`.

    A *weight* node reads `forecast.w` (or another weight node) and only initializers else; a
    *scaled* weight is a weight times another computed value (the gate, where the weights are
    folded into the gate's multiply); a *term* multiplies a history input by a weight or a scaled
    weight; a *sum* adds terms or sums of one branch. Weight and scaled-weight nodes take the branch
    of their consumers where those are one branch's terms."""
    if FORECAST_WEIGHTS not in inputs:
        return {}
    weight: set[int] = set()
    scaled: set[int] = set()
    found: dict[int, tuple[int, str]] = {}

    def history_key(name: str):
        if name not in inputs or not is_cache(name) or name.endswith(INPUT_SUFFIX):
            return None
        parts = history_index(name)[0].split(".")  # cache.<l>.<br>
        return (int(parts[1]), parts[2]) if len(parts) == 3 and parts[1].isdigit() and parts[2] in BRANCH_ORDER \
            else None

    for i, n in enumerate(nodes):
        computed = [producer[x] for x in n.input if x in producer]
        other_inputs = [x for x in n.input if x in inputs and x != FORECAST_WEIGHTS]
        if (FORECAST_WEIGHTS in n.input or any(j in weight for j in computed)) and not other_inputs \
                and all(j in weight for j in computed):
            weight.add(i)
            continue
        if n.op_type == "Mul" and len(n.input) == 2:
            keys = [history_key(x) for x in n.input]
            others = [producer.get(x) for x, k in zip(n.input, keys) if k is None]
            key = next((k for k in keys if k is not None), None)
            if key is not None and len(others) == 1 and (others[0] in weight or others[0] in scaled):
                found[i] = key
            elif key is None and sum(j in weight for j in computed) == 1 and len(computed) == 2:
                scaled.add(i)  # a weight times the gate (the weights folded into the gate's multiply)
        elif n.op_type == "Add" and len(computed) == len(n.input) == 2:
            labels = {found.get(j) for j in computed}
            if len(labels) == 1 and None not in labels:
                found[i] = labels.pop()
    for i in sorted(weight | scaled, reverse=True):
        labels = {found.get(c) for c in consumers.get(i, [])}
        if len(labels) == 1 and None not in labels:
            found[i] = labels.pop()
    return found


def _parse_scopes(raw: str | None) -> list[str]:
    if not raw:
        return []
    try:
        import ast

        value = ast.literal_eval(raw)
        return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    except (ValueError, SyntaxError):
        return [raw]


def _node_flops(node, shapes: dict[str, list[int]]) -> int:
    """Multiply-adds x 2 of a matrix product or convolution; 0 for every other op."""
    if node.op_type not in FLOP_OPS or not node.output:
        return 0
    out = shapes.get(node.output[0])
    if not out or any(d < 0 for d in out):
        return 0
    out_elems = 1
    for d in out:
        out_elems *= d
    if node.op_type == "MatMul":
        a = shapes.get(node.input[0])
        return 2 * out_elems * a[-1] if a and a[-1] > 0 else 0
    if node.op_type == "Gemm":
        a = shapes.get(node.input[0])
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        if not a or len(a) != 2:
            return 0
        return 2 * out_elems * (a[0] if trans_a else a[1])
    w = shapes.get(node.input[1])  # Conv: [C_out, C_in/group, k...]
    if not w:
        return 0
    per_out = 1
    for d in w[1:]:
        per_out *= d
    return 2 * out_elems * per_out


#################################################################################
#                                     Diff                                      #
#################################################################################


def diff_graphs(base: VariantGraphInfo, other: VariantGraphInfo) -> dict:
    """What `other` adds to and removes from `base`: I/O names, nodes, FLOPs, per unit."""
    b, o = base.by_key(), other.by_key()
    removed = [n for k, n in b.items() if k not in o]
    added = [n for k, n in o.items() if k not in b]

    table = other.blocks or base.blocks

    def per_unit(nodes: list[GraphNode]) -> dict:
        units: dict[str, dict] = {}
        for n in nodes:
            u = units.setdefault(n.unit, {"nodes": 0, "flops": 0, "ops": {}, "block": n.block, "branch": n.branch})
            u["nodes"] += 1
            u["flops"] += n.flops
            u["ops"][n.op_type] = u["ops"].get(n.op_type, 0) + 1
        return dict(sorted(units.items(), key=lambda kv: _unit_order(kv[0], kv[1], table)))

    return {
        "inputs_added": [n for n in other.inputs if n not in base.inputs],
        "inputs_removed": [n for n in base.inputs if n not in other.inputs],
        "outputs_added": [n for n in other.outputs if n not in base.outputs],
        "outputs_removed": [n for n in base.outputs if n not in other.outputs],
        "nodes_added": len(added),
        "nodes_removed": len(removed),
        "flops_added": sum(n.flops for n in added),
        "flops_removed": sum(n.flops for n in removed),
        "added_by_unit": per_unit(added),
        "removed_by_unit": per_unit(removed),
        "added": [n.to_json() for n in added],
        "removed": [n.to_json() for n in removed],
    }


def _unit_order(unit: str, u: dict, blocks: BlockTable | None) -> tuple:
    """Units in the order the forward runs them: the top-level modules before the blocks (and
    `model`), the blocks by index (the block's own unit, then its branches by name), the rest."""
    if u["block"] is not None:
        return (1, u["block"], u["branch"] or "")
    rank = 0 if unit == MODEL_UNIT or blocks is None else blocks.top_rank(unit)
    return (rank, 0, unit)
