"""Node-emitting helpers that the token passes share (token_prune, token_dynamic).

`Emitter` creates nodes before one branch node, named `<block path>_<branch>_<pass>_<op>`
(`blocks_0_attn_prune_q`) and marked with the branch's block and branch, so that
inspection and the tests can tell which branch a new node belongs to. `attention_rows`
writes attention with queries from a subset of the token rows and keys/values from all
rows, reading the attention's weights where the model adapter says they are; `module_rows`
calls the branch module's own rows method instead, for an attention whose adapter names one
(`AttentionSpec.rows`: a joint attention with per-stream projections, q/k norms, RoPE): the
graph reads the module (get_attr) and calls the method on it with the branch input, the chosen
image rows and the branch's context arguments, so the ops are the model's, traced when exported.

Splitting the fused q/k/v weight W ([3D, D], `split_in_proj`): the graph reads W with get_attr, transposes
it and takes column slices of W.T ([D, 3D]): Wq = W.T[:, :D], Wkv = W.T[:, D:] (biases
likewise). Nothing is added to the module, and the exported ONNX keeps W.T, the same
initializer (same content, so the same canonical name in the shared weights file) that a
variant computing the branch reads, plus two Slice ops: on disk every weight stays once.
Two consequences, measured (torch 2.13, onnxscript 0.7, onnxruntime 1.31):
- the ONNX exporter's optimizer folds a Slice whose input has at most 8192 elements
  (D <= 52, test-sized models): there the slices become their own small initializers;
- ONNX Runtime's own constant folding (session load, default optimization level) turns
  the two Slices into session-private tensors, so a session holds one extra copy of the
  q/k/v weight of each block whose attention it prunes (3·D² floats) even when weights are
  shared between sessions; no slicing is left at run time.
The alternative that never slices, one q/k/v product over all tokens and then a gather of
the query rows, keeps memory fully shared but spends (N - k)·D² more multiply-adds on
queries nobody reads (and departs from `branch_flops`).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from tcgraph.models.adapter import AttentionSpec
from tcgraph.passes.meta import META_BLOCK, META_BRANCH


class Emitter:
    """Creates nodes before `anchor` (a branch node), marked with its block and branch."""

    def __init__(self, gm: fx.GraphModule, block: int, branch: str, anchor: fx.Node, prefix: str):
        self.gm, self.block, self.branch, self.anchor = gm, block, branch, anchor
        self.prefix = prefix

    def __call__(self, op: str, target, *args, name: str = "op", **kwargs) -> fx.Node:
        with self.gm.graph.inserting_before(self.anchor):
            node = self.gm.graph.create_node(op, target, args, kwargs, name=f"{self.prefix}_{name}")
        node.meta[META_BLOCK] = self.block
        node.meta[META_BRANCH] = self.branch
        return node

    def fn(self, target, *args, name: str = "op", **kwargs) -> fx.Node:
        return self("call_function", target, *args, name=name, **kwargs)

    def constant_index(self, indices, what: str = "") -> fx.Node:
        """The kept-token ids as an int64 buffer of the module (an ONNX initializer); `what` tells
        apart a branch's second such buffer (`_tcgraph_<what>_idx_<l>_<branch>`: a suffix could be
        another branch's name, `attn` + `_image`)."""
        attr = f"_tcgraph_{what}_idx_{self.block}_{self.branch}" if what else f"_tcgraph_idx_{self.block}_{self.branch}"
        self.gm.register_buffer(attr, torch.tensor(indices, dtype=torch.long))
        return self("get_attr", attr, name="idx")

    def batch(self, like: fx.Node) -> fx.Node:
        """The (static) batch size of `like`, as a graph value."""
        return self("call_method", "size", like, 0, name="batch")

    def gather(self, u: fx.Node, idx: fx.Node) -> fx.Node:
        return self.fn(torch.index_select, u, 1, idx, name="gather")  # [B, k, D]

    def batch_ids(self, like: fx.Node) -> fx.Node:
        """[B, 1]: the sample index of each row of `like`, broadcasting with row ids [k] or [B, k]."""
        device = self.fn(getattr, like, "device", name="device")
        b = self.fn(torch.arange, self.batch(like), device=device, name="batch_ids")
        return self("call_method", "unsqueeze", b, 1, name="batch_ids")

    def gather_rows(self, u: fx.Node, b: fx.Node, idx: fx.Node) -> fx.Node:
        """u[b, idx]: rows `idx` ([B, k], one set per sample) of u, [B, k, D]: one GatherND in ONNX
        ([B, k, 2] indices, whole rows copied; a gather along dim 1 with the ids expanded to
        [B, k, D] exports as GatherElements, which reads an index per element: 2-4x slower on CPU)."""
        return self.fn(operator.getitem, u, (b, idx), name="gather")

    def scatter(self, cache: fx.Node, idx: fx.Node, rows: fx.Node, b: fx.Node | None = None,
                name: str = "scatter") -> fx.Node:
        """`cache` with rows `idx` (dim 1; [k], or [B, k] per sample) replaced by `rows`: one ScatterND
        in ONNX. `b`: the batch ids (`batch_ids`), made here when not given.

        Inserted after `rows` (for a row-wise branch, `rows` is the branch node itself)."""
        self.anchor = rows.next
        if b is None:
            b = self.batch_ids(cache)
        return self.fn(torch.index_put, cache, (b, idx), rows, name=name)  # [B, N, D]


def attention_rows(emit: Emitter, node: fx.Node, kept: fx.Node, k: int, spec: AttentionSpec) -> fx.Node:
    """Attention with queries from the kept rows `kept` ([B, k, D], taken from the branch
    input u) and keys/values from all tokens of u; the rows of the branch output, [B, k, D].

    `node` is the attention branch's call_module node; `spec` says where its q/k/v
    projections (one fused layer, or three) and output projection are. The ops follow the
    branch's own forward."""
    attn = emit.gm.get_submodule(node.target)
    proj = f"{node.target}.{spec.out_proj}"
    d = emit.gm.get_submodule(proj).in_features
    heads = getattr(attn, spec.num_heads)
    head_dim = getattr(attn, spec.head_dim) if spec.head_dim is not None else d // heads
    (u,) = node.args
    batch = emit.batch(u)
    if spec.fused:
        wq, bq, wkv, bkv = split_in_proj(emit, f"{node.target}.{spec.in_proj}", d)
        q = emit.fn(operator.add, emit.fn(torch.matmul, kept, wq, name="q"), bq, name="q")
        kv = emit.fn(operator.add, emit.fn(torch.matmul, u, wkv, name="kv"), bkv, name="kv")  # [B, N, 2D]
        kv = emit("call_method", "reshape", kv, batch, -1, 2, heads, head_dim, name="kv")
        kv = emit("call_method", "permute", kv, 2, 0, 3, 1, 4, name="kv")  # [2, B, h, N, d]
        key, value = (emit.fn(operator.getitem, kv, i, name=n) for i, n in ((0, "k"), (1, "v")))
    else:  # three projections: queries of the kept rows, keys and values of all rows, no weight slicing
        q = emit("call_module", f"{node.target}.{spec.q_proj}", kept, name="q")
        key, value = (emit("call_method", "transpose", emit(
            "call_method", "reshape", emit("call_module", f"{node.target}.{path}", u, name=n),
            batch, -1, heads, head_dim, name=n), 1, 2, name=n)
            for path, n in ((spec.k_proj, "k"), (spec.v_proj, "v")))  # [B, h, N, d]
    q = emit("call_method", "reshape", q, batch, k, heads, head_dim, name="q")
    q = emit("call_method", "transpose", q, 1, 2, name="q")  # [B, h, k, d]
    out = emit.fn(F.scaled_dot_product_attention, q, key, value, name="sdpa")  # [B, h, k, d]
    out = emit("call_method", "transpose", out, 1, 2, name="mix")
    out = emit("call_method", "reshape", out, batch, k, d, name="mix")  # [B, k, D]
    return emit("call_module", proj, out, name="proj")  # [B, k, D]


def module_rows(emit: Emitter, node: fx.Node, image_idx: fx.Node, spec: AttentionSpec) -> fx.Node:
    """The branch module's `spec.rows` method on the branch input u: the output rows of every row of
    the other streams, then of the image rows `image_idx` ([k] or [B, k]), [B, R, D].

    `node` is the attention branch's call_module node (u, then its context arguments)."""
    module = emit("get_attr", node.target, name="module")
    u, *context = node.args
    return emit("call_method", spec.rows, module, u, image_idx, *context, name="rows")


# Ops that act on each token row alone, with operands broadcast over the token axis.
_ROW_WISE = {operator.add, operator.mul, operator.sub, operator.truediv, torch.add, torch.mul, torch.sub}


def kept_input_rows(emit: Emitter, u: fx.Node, block_path: str, norm: str | None, idx: fx.Node) -> fx.Node | None:
    """u's rows `idx`, formed from the kept rows of the hidden state h: `norm` and the adaLN
    modulation of those rows only, [B, k, D]; None where that is not safe.

    u = modulate(norm(h), shift, scale) is row-wise in h: the norm module (at `block_path`.`norm`)
    acts on each row, and every other operand broadcasts over the token axis (an
    `unsqueeze(…, 1)` of the modulation, or a number). The nodes from the norm to u are
    emitted again on `index_select(h, 1, idx)`. None when u has readers besides the branch,
    the branch has no norm, or any node between h and u is not of that form."""
    if norm is None or len(u.users) != 1:
        return None
    target = f"{block_path}.{norm}"
    chain: list[fx.Node] = []  # nodes from the norm to u, in graph order

    def depends(n) -> bool:
        if not isinstance(n, fx.Node):
            return False
        if n.op == "call_module" and n.target == target:
            return True
        return n.op != "placeholder" and any(depends(a) for a in n.all_input_nodes)

    def broadcasts_over_tokens(n) -> bool:
        if not isinstance(n, fx.Node):
            return isinstance(n, (int, float))
        if n.op == "call_method" and n.target == "unsqueeze" and n.args[1:] == (1,):
            return True
        return n.op == "call_function" and n.target in _ROW_WISE and all(map(broadcasts_over_tokens, n.args))

    def collect(n: fx.Node) -> bool:
        if n in chain:
            return True
        if n.op == "call_module" and n.target == target:
            chain.append(n)
            return True
        if n.op != "call_function" or n.target not in _ROW_WISE or n.kwargs:
            return False
        inner = [a for a in n.args if depends(a)]
        if len(inner) != 1 or not all(broadcasts_over_tokens(a) for a in n.args if a is not inner[0]):
            return False
        if not collect(inner[0]):
            return False
        chain.append(n)
        return True

    if not collect(u) or chain[0].op != "call_module":
        return None
    (h,) = chain[0].args
    env = {chain[0]: emit("call_module", target, emit.gather(h, idx), name="norm")}
    for n in chain[1:]:
        env[n] = emit.fn(n.target, *fx.map_arg(n.args, lambda a: env.get(a, a)), name="modulate")
    return env[chain[-1]]


def split_in_proj(emit: Emitter, in_proj: str, d: int) -> tuple[fx.Node, ...]:
    """Wq [D, D], bq [D], Wkv [D, 2D], bkv [2D]: column slices of the fused q/k/v weight's
    transpose and of the bias of the linear layer at module path `in_proj`. (The node names
    `qkv_weight`, … are the graph's own, unchanged since the first version of this pass.)"""
    weight = emit("get_attr", f"{in_proj}.weight", name="qkv_weight")
    bias = emit("get_attr", f"{in_proj}.bias", name="qkv_bias")
    wt = emit.fn(torch.t, weight, name="qkv_weight_t")  # [D, 3D]
    return (
        emit.fn(torch.narrow, wt, 1, 0, d, name="wq"),
        emit.fn(torch.narrow, bias, 0, 0, d, name="bq"),
        emit.fn(torch.narrow, wt, 1, d, 2 * d, name="wkv"),
        emit.fn(torch.narrow, bias, 0, d, 2 * d, name="bkv"),
    )


def branch_prefix(block_path: str, branch: str, what: str) -> str:
    """Name prefix of the nodes a token pass adds to one branch: `blocks_0_attn_prune`."""
    return f"{block_path.replace('.', '_')}_{branch}_{what}"
