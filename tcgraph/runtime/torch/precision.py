"""Precision of the torch backend: the words of TensorRT's engine precision, and the cast pass.

`fp32` (default on the CPU), `bf16` (default on CUDA), `fp16`. A lower precision casts the
model's weights once (all variants share them, see loader.py) and casts the input of
every matrix product with a weight (`aten.linear`, `aten.conv2d`) to the weight's dtype;
everything downstream then computes in the low precision. The sinusoidal timestep
embedding is computed from the integer `t` in float32 (the graph says so) and only its
projection is cast. Caches stay in the low precision; `out` is returned in float32 for
the sampler's update.
"""
from __future__ import annotations

import torch

from tcgraph.errors import TcgraphError

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# ops whose second argument is a weight the input is cast to (the aten form of Linear and Conv2d)
_WEIGHTED = (torch.ops.aten.linear.default, torch.ops.aten.conv2d.default)


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a precision word; refuses anything else with the choices."""
    if precision not in PRECISIONS:
        raise TcgraphError(
            f"unknown precision {precision!r} for the torch backend; use one of {', '.join(PRECISIONS)} "
            "(the same words as the TensorRT engine precision)"
        )
    return PRECISIONS[precision]


def lower_precision(gm: torch.fx.GraphModule, dtype: torch.dtype) -> torch.fx.GraphModule:
    """Cast the input of every `aten.linear` / `aten.conv2d` of an exported graph to `dtype`.

    The weights themselves are cast by the caller (they are graph inputs of an exported
    program, shared by every variant). Type checks that `torch.export` recorded for
    floating inputs (`aten._assert_tensor_metadata` with dtype float32) no longer hold in
    the low precision and are dropped; integer ones stay.
    """
    if dtype == torch.float32:
        return gm
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _WEIGHTED:
            with graph.inserting_before(node):
                cast = graph.call_function(torch.ops.aten.to.dtype, (node.args[0], dtype))
            node.args = (cast, *node.args[1:])
        elif node.target is torch.ops.aten._assert_tensor_metadata.default:
            checked = node.kwargs.get("dtype")
            if isinstance(checked, torch.dtype) and checked.is_floating_point:
                graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm
