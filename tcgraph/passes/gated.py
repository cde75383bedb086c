"""Gated step: one graph that decides on the device whether its later blocks compute (docs/design.md,
"Gated steps"; the gate and its indicators: `tcgraph.plan.gate`).

Built from two rewritten graphs of the same model, each split where block `first` begins:
- the *computing path* (the recipe's actions: every branch computes, or a base plan's recipe whose later
  branches also reuse or forecast; the computed later branch outputs are outputs), and
- the *skipping path* (the later blocks reuse or forecast: `Recipe.cheap`).
The part before the split is the same in both (the embeddings and the first blocks: the *head*); it
runs once, outside the decision. The head's output h of block `first - 1` gives the indicator, a
scalar for the whole batch; `torch.cond` then runs one of the two tails. In ONNX that is one `If`
whose branches read the weights from the outer graph, so each weight is there once.

Both tails return the same values: `out`, every history entry of every later branch (the computing
tail shifts the fresh output of each later branch it computes into that branch's history; a branch its
path reuses or forecasts, read or extrapolated from its history, hands its history on unchanged, as the
skipping tail hands on every branch's) and the gate state (`tcgraph.names.GATE_STATE`): the reference h,
the indicator sum, the skips in a row, the computed steps and block work of the run (each path adds its
share from `gate.params`) and `gate.times`, one row per later branch: the steps its history holds (a
branch's row takes the step where its history takes a value). Every forecast's weights (the skipping
tail's, the computing path's) are the Lagrange weights of the branch's own row for the current step,
computed in the graph.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from tcgraph.errors import TcgraphError
from tcgraph.names import (FORECAST_WEIGHTS, GATE_PARAMS, GATE_STATE, IMAGE, OUT, cache_name, history_name,
                           is_model_input)
from tcgraph.passes.meta import META_BLOCK, META_IO_NAME, META_STREAM, io_names
from tcgraph.plan.plan import REUSE, Recipe

EPS = 1e-12  # floor of the reference's mean magnitude (the first step's reference is 0)


def split_at_block(gm: fx.GraphModule, first: int):
    """(head, tail, boundary names, tail input names): `head(*model inputs)` returns the values the
    tail reads of it (`boundary names`, node names; a model input passes as itself), `tail(*boundary,
    *other inputs)` returns what `gm` returns. The tail is every node of block >= `first` and every
    node after one."""
    graph = gm.graph
    tail: set[fx.Node] = set()
    for n in graph.nodes:
        if n.op in ("placeholder", "output"):
            continue
        block = n.meta.get(META_BLOCK)
        if (block is not None and block >= first) or any(a in tail for a in n.all_input_nodes):
            tail.add(n)
    out = next(n for n in graph.nodes if n.op == "output")
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    model_inputs = [n for n in inputs if is_model_input(n.meta.get(META_IO_NAME, n.target))]
    users = [n for n in graph.nodes if n in tail] + [out]
    boundary: list[fx.Node] = []
    for n in users:
        for a in n.all_input_nodes:
            if a not in tail and a not in boundary and (a.op != "placeholder" or a in model_inputs):
                boundary.append(a)
    head_graph, env = fx.Graph(), {}
    for n in model_inputs:
        env[n] = head_graph.placeholder(n.name)
    for n in graph.nodes:
        if n.op not in ("placeholder", "output") and n not in tail:
            env[n] = head_graph.node_copy(n, lambda a: env[a])
    head_graph.output(tuple(env[n] for n in boundary))
    tail_graph, tenv = fx.Graph(), {}
    for n in boundary:
        tenv[n] = tail_graph.placeholder(f"b_{n.name}")
    others = [n for n in inputs if n not in model_inputs and n.users]
    for n in others:
        tenv[n] = tail_graph.placeholder(n.name)
    for n in graph.nodes:
        if n in tail:
            tenv[n] = tail_graph.node_copy(n, lambda a: tenv[a])
    tail_graph.output(fx.map_arg(out.args[0], lambda a: tenv[a]))
    head, tail_gm = fx.GraphModule(gm, head_graph), fx.GraphModule(gm, tail_graph)
    return head, tail_gm, [n.name for n in boundary], [n.meta.get(META_IO_NAME, n.target) for n in others]


def lagrange(times: torch.Tensor, step: torch.Tensor, points: int) -> torch.Tensor:
    """Weights extrapolating history at steps `times` (newest first, along the last dim: [points], or one row
    per branch [keys, points]) to `step`, in the graph (`tcgraph.plan.gate.lagrange_weights` is the host
    form); the same shape as `times[..., :points]`."""
    weights = []
    for j in range(points):
        w = torch.ones_like(step)
        for m in range(points):
            if m != j:
                w = w * (step - times[..., m:m + 1]) / (times[..., j:j + 1] - times[..., m:m + 1])
        weights.append(w)
    return torch.cat(weights, dim=-1)


class _Compute(nn.Module):
    """The computing tail. `paths[k]` is what later branch k does here: ("compute", its index among the
    tail's fresh outputs), ("reuse", 1) or ("forecast", n): a base plan's recipe. A reused branch's value
    is its newest history entry, a forecast one's the Lagrange extrapolation of its newest n over its own row
    of `gate.times`; the tail reads them as its cache inputs (`reads`: the branch of each, in the tail's
    input order). A computed branch shifts its fresh output into its history and the step into its times
    row; a reused or forecast one hands both on unchanged."""

    def __init__(self, tail: fx.GraphModule, n_boundary: int, h_index: int, paths: list[tuple[str, int]],
                 reads: list[int], points: int):
        super().__init__()
        self.tail, self.nb, self.h, self.paths, self.reads, self.points = tail, n_boundary, h_index, paths, reads, points
        # runs of consecutive branches that all compute or all hand on: (start, end, computes)
        self.runs = []
        for k, (kind, _) in enumerate(paths):
            if self.runs and self.runs[-1][2] == (kind == "compute"):
                self.runs[-1] = (self.runs[-1][0], k + 1, kind == "compute")
            else:
                self.runs.append((k, k + 1, kind == "compute"))

    def forward(self, *ops):
        nb, r, keys = self.nb, self.points, len(self.paths)
        boundary, history = ops[:nb], ops[nb:nb + keys * r]
        ref, acc, skips, count, times, params = ops[nb + keys * r:]
        held = {}
        for k, (kind, n) in enumerate(self.paths):
            if kind == "reuse":
                held[k] = history[k * r]
            elif kind == "forecast":
                w = lagrange(times[k], params[0:1], n)
                value = w[0:1] * history[k * r]
                for j in range(1, n):
                    value = value + w[j:j + 1] * history[k * r + j]
                held[k] = value
        result = self.tail(*boundary, *(held[k] for k in self.reads))
        result = tuple(result) if isinstance(result, (tuple, list)) else (result,)
        fresh = result[1:]
        shifted = []
        for k, (kind, i) in enumerate(self.paths):
            if kind == "compute":
                shifted.append(fresh[i])
                shifted.extend(history[k * r + j].clone() for j in range(r - 1))
            else:
                shifted.extend(history[k * r + j].clone() for j in range(r))
        moved = torch.cat([params[0:1].reshape(1, 1).expand(keys, 1), times[:, :r - 1]], dim=1)
        rows = [(moved if computes else times)[a:b] for a, b, computes in self.runs]
        new_times = rows[0].clone() if len(rows) == 1 else torch.cat(rows)
        done = torch.cat([torch.ones_like(params[0:1]), params[3:4]])  # one more computed step, and its work
        return _contiguous(result[0], *shifted, boundary[self.h].clone(), torch.zeros_like(acc),
                           torch.zeros_like(skips), count + done, new_times)


class _Skip(nn.Module):
    def __init__(self, tail: fx.GraphModule, args: list[tuple[str, int]], n_boundary: int, h_index: int,
                 n_history: int, points: int, anchor: bool):
        super().__init__()
        self.tail, self.args, self.nb, self.h = tail, args, n_boundary, h_index
        self.n_history, self.points, self.anchor = n_history, points, anchor

    def forward(self, *ops):
        nb, nh = self.nb, self.n_history
        boundary, history = ops[:nb], ops[nb:nb + nh]
        ref, acc, skips, count, times, params = ops[nb + nh:]
        values = {"b": boundary, "h": history}
        if any(kind == "w" for kind, _ in self.args):
            # each branch's weights from its own times row, [keys, points] at once; flat, in history order
            values["w"] = (lagrange(times, params[0:1], self.points).reshape(-1),)
        out = self.tail(*[values[kind][i] for kind, i in self.args])
        out = out[0] if isinstance(out, (tuple, list)) else out
        return _contiguous(out, *(h.clone() for h in history), (ref if self.anchor else boundary[self.h]).clone(),
                           acc.clone(), skips + 1, count + torch.cat([torch.zeros_like(params[0:1]), params[4:5]]),
                           times.clone())


def _contiguous(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Both paths return the same layouts, flat: torch.cond requires equal strides, and where export traces
    a path with symbolic sizes it cannot prove that of an n-d tensor simple (its contiguous strides read
    Max(1, ...)); a 1-d tensor's stride is 1. `GatedStep.forward` gives them their shapes back."""
    return tuple(v.contiguous().reshape(-1) for v in values)


class GatedStep(nn.Module):
    """One gated step: `forward(*inputs)` in the order of `Plan.variant_io` of a gated recipe."""

    def __init__(self, head: fx.GraphModule, compute: _Compute, skip: _Skip, n_model: int, h_index: int,
                 anchor: bool, source: fx.GraphModule | None = None):
        super().__init__()
        self.head, self.compute, self.skip = head, compute, skip
        self.n_model, self.h, self.anchor = n_model, h_index, anchor
        # what the computing path's graph recorded (its adapter and block table) and its top-level modules in
        # call order: the artifact's block table is read from them (tcgraph.export.blocks.graph_block_table)
        self.meta = dict(source.meta) if source is not None else {}
        self.source_children = tuple(name for name, _ in source.named_children()) if source is not None else ()

    def forward(self, *inputs):
        model_inputs, rest = inputs[:self.n_model], inputs[self.n_model:]
        ref, acc, skips, count, times, params = rest[-6:]
        boundary = self.head(*model_inputs)
        h = boundary[self.h]
        change = ((h - ref).abs().mean() / ref.abs().mean().clamp_min(EPS)).reshape(1)
        indicator = change if self.anchor else acc + change
        skip = torch.logical_and(indicator < params[1:2], skips < params[2:3]).reshape(())
        ops = (*boundary, *rest[:-6], ref, indicator, skips, count, times, params)
        flat = torch.cond(skip, self.skip, self.compute, ops)
        # the paths return their outputs flat (see `_contiguous`); their shapes: the output's is the latent's
        # but for its channels, every other one is its input's (the history entries, then the gate state)
        x = model_inputs[0]
        shapes = [(x.shape[0], -1, *x.shape[2:])] + [v.shape for v in rest[:-1]]
        return tuple(v.reshape(shape) for v, shape in zip(flat, shapes))


def gated_step(rewrite, recipe: Recipe) -> tuple[GatedStep, list[str], list[str]]:
    """The gated step of `recipe` (gated), with its input and output names. `rewrite(recipe, writes)`
    rewrites the model for an ungated recipe writing the caches `writes` (compile's pipeline)."""
    gate = recipe.gate
    keys = recipe.gated_keys()
    path = recipe.computing()
    computed = [k for k in keys if path.action(*k).computes]
    # the computing path's forecasts are formed here, from the gate's history: the rewritten tail reuses them
    reads = Recipe(tuple(tuple(REUSE if a.kind == "forecast" else a for a in acts) for acts in path.actions),
                   path.branches, path.constants)
    compute_gm = rewrite(reads, tuple(computed))
    skip_gm = rewrite(recipe.cheap(), ())
    head, compute_tail, boundary, compute_inputs = split_at_block(compute_gm, gate.first)
    _, skip_tail, skip_boundary, skip_inputs = split_at_block(skip_gm, gate.first)
    held = {cache_name(*k): i for i, k in enumerate(keys) if not path.action(*k).computes}
    if any(name not in held for name in compute_inputs):
        raise TcgraphError(f"the computing path of a gated step reads {compute_inputs}; it reads the caches of the "
                           f"later branches it does not compute alone ({sorted(held)})")
    paths = [("compute", computed.index(k)) if k in computed else (path.action(*k).kind, path.action(*k).points)
             for k in keys]
    missing = [n for n in skip_boundary if n not in boundary]
    if missing:
        raise TcgraphError(f"the skipping path of a gated step reads values {missing} of the first {gate.first} "
                           "blocks that the computing path does not; this is a bug in the gated pass, please report it")
    last = [i for i, name in enumerate(boundary) if _block_of(compute_gm, name) == gate.first - 1]
    if len(last) > 1:  # a block of several streams: the indicator is formed from the image stream
        last = [i for i in last if _node(compute_gm, boundary[i]).meta.get(META_STREAM) == IMAGE]
    if len(last) != 1:
        raise TcgraphError(f"a gate needs one image hidden state out of block {gate.first - 1} to form its "
                           f"indicator; the graph passes {len(last)} on: this is a bug in the gated pass, please "
                           "report it")
    history = [history_name(b, br, j) for b, br in keys for j in range(gate.points)]
    args = [("b", boundary.index(n)) for n in skip_boundary]
    for name in skip_inputs:
        if name == FORECAST_WEIGHTS:
            args.append(("w", 0))
        elif name in history:
            args.append(("h", history.index(name)))
        else:
            raise TcgraphError(f"the skipping path of a gated step reads {name!r}, which a gated step does not carry")
    n_model = len([n for n in io_names(compute_gm)[0] if is_model_input(n)])
    anchor = gate.indicator == "anchor"
    step = GatedStep(head, _Compute(compute_tail, len(boundary), last[0], paths, [held[n] for n in compute_inputs],
                                    gate.points),
                     _Skip(skip_tail, args, len(boundary), last[0], len(history), gate.points, anchor),
                     n_model, last[0], anchor, source=compute_gm)
    model_names = io_names(compute_gm)[0][:n_model]
    return step, model_names + history + list(GATE_STATE) + [GATE_PARAMS], [OUT] + history + list(GATE_STATE)


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def _block_of(gm: fx.GraphModule, name: str):
    return _node(gm, name).meta.get(META_BLOCK)
