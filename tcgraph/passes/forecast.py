"""Pass forecast: a forecast branch becomes a weighted sum of its history (docs/design.md, "Forecast actions").

Runs after cache_io, which gave each `forecast(n)` branch its history inputs, newest first:
`cache.<l>.<branch>` (H_0) and `cache.<l>.<branch>.h1` … `.h<n-1>`, and the variant its
weights input `forecast.w` (float32, the recipe's forecast branches in block order, n
weights each). Weights are an input rather than graph constants so that one variant serves
every step of the same recipe structure, whatever its weights (learned weights differ at
every step). The branch's call_module node is replaced by its forecast

    ŷ = w[o] · H_0 + w[o+1] · H_1 + … + w[o+n-1] · H_{n-1}        (o: the branch's offset)

and, like a reused branch, the fresh adaLN gate of this step multiplies ŷ. The ops that only
fed the branch die, and so do its weights. How the sum is emitted (`EMISSIONS`):

- `gate` (the default): the weights are folded into the gate, `g ⊙ ŷ = Σ_j (g·w_j) ⊙ H_j`:
  the products g·w_j are on the gate's [B, 1, D], so the tokens see n multiplies and n − 1
  adds, one full-size multiply fewer per branch than `sum`; where the branch output does not
  go straight into one multiply (an ungated branch), it is emitted as `sum`;
- `sum`: n multiplies and n − 1 adds over [B, N, D], then the gate's multiply;
- `stack`: the history stacked on a last axis and one matrix product with the n weights
  (ONNX: Unsqueeze, Concat, MatMul): one product per branch, but stacking copies the history.

Measured one step at a time on the demo model (benchmarks/forecast_emissions.py; the tables in
docs/benchmarks-realization.md): `gate` and `sum` within noise of each other, `stack` 20-30x
slower on ONNX Runtime and 2x on PyTorch. `gate` is the default for doing strictly less
full-size work; the others stay selectable (`EMISSION`) to measure against.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from tcgraph.errors import TcgraphError
from tcgraph.names import FORECAST_WEIGHTS, history_name
from tcgraph.passes.meta import META_BLOCK, branch_nodes, finish, graph_inputs
from tcgraph.passes.spec import RewriteSpec

EMISSIONS = ("gate", "sum", "stack")
EMISSION = "gate"  # the default; benchmarks set another to compare
_MULS = (operator.mul, torch.mul)


def forecast(gm: fx.GraphModule, spec: RewriteSpec, emission: str | None = None) -> fx.GraphModule:
    """Replace every branch `spec.recipe` forecasts by the weighted sum of its history inputs,
    emitted as `emission` (default `EMISSION`, see the module docstring)."""
    emission = EMISSION if emission is None else emission
    if emission not in EMISSIONS:
        raise TcgraphError(f"unknown forecast emission {emission!r}; choose one of {', '.join(EMISSIONS)}")
    layout = spec.recipe.forecasts()
    if not layout:
        return gm
    graph = gm.graph
    nodes = branch_nodes(gm)
    inputs = graph_inputs(gm)
    weights = inputs[FORECAST_WEIGHTS]
    offset = 0
    for (block, branch), points in layout:
        node = nodes[(block, branch)]
        history = [inputs[history_name(block, branch, j)] for j in range(points)]
        made: list[fx.Node] = []

        def call(fn, *args) -> fx.Node:
            new = graph.call_function(fn, args)
            new.meta[META_BLOCK] = block
            made.append(new)
            return new

        gate_mul = _gate_multiply(node)
        target = gate_mul if emission == "gate" and gate_mul is not None else node
        with graph.inserting_before(target):
            w = [call(operator.getitem, weights, offset + j) for j in range(points)]
            if target is gate_mul:
                gate = next(a for a in gate_mul.args if a is not node)
                scaled = [call(torch.mul, gate, wj) for wj in w]  # [B, 1, D] each: cheap
                total = _sum([call(torch.mul, h, s) for h, s in zip(history, scaled)], call)
            elif emission == "stack" and points > 1:
                stacked = call(torch.stack, history, -1)
                total = call(torch.matmul, stacked, call(operator.getitem, weights, slice(offset, offset + points)))
            else:
                total = _sum([call(torch.mul, h, wj) for h, wj in zip(history, w)], call)
        target.replace_all_uses_with(total)
        graph.erase_node(target)
        if target is gate_mul:
            graph.erase_node(node)
        offset += points
    return finish(gm)


def _gate_multiply(node: fx.Node) -> fx.Node | None:
    """The one multiply `gate * node` (or `node * gate`) that `node` feeds, if that is its only use."""
    users = list(node.users)
    if len(users) != 1:
        return None
    (user,) = users
    if user.op != "call_function" or user.target not in _MULS or user.kwargs or len(user.args) != 2:
        return None
    a, b = user.args
    other = b if a is node else a if b is node else None
    if other is None or other is node or not isinstance(other, fx.Node):
        return None
    return user


def _sum(terms: list[fx.Node], call) -> fx.Node:
    total = terms[0]
    for term in terms[1:]:
        total = call(torch.add, total, term)
    return total
