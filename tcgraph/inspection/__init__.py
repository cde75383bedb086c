"""`tcgraph inspect`: what an artifact folder holds, read from the folder alone.

- `inspect_artifact(path, variant=, step=)` -> JSON-able dict; `format_report(info)` -> text;
- `write_pictures(path, out_dir, variant=)` -> schedule heatmap, token masks, variant DOT;
- forecast plans: `cache_memory` (caches, history entries, input caches in bytes),
  `forecast_view` (a variant's `forecast.w` layout; a step's weights and history steps);
- `read_variant_graph` / `diff_graphs`: ONNX node tables and diffs by a stable node key.

The package is `inspection` because `tcgraph.inspect` is the API function.
"""
from tcgraph.inspection.graph import (
    GraphNode,
    VariantGraphInfo,
    diff_graphs,
    read_variant_graph,
)
from tcgraph.inspection.pictures import (
    action_color,
    draw_heatmap,
    draw_token_masks,
    heatmap_layout,
    legend_entries,
    mask_layout,
    variant_dot,
    write_pictures,
    write_plan_pictures,
)
from tcgraph.inspection.report import (
    action_counts,
    block_view,
    cache_memory,
    forecast_counts,
    forecast_view,
    full_variant,
    inspect_artifact,
    inspect_plan,
    step_position,
)
from tcgraph.inspection.text import format_report

__all__ = [
    "GraphNode",
    "VariantGraphInfo",
    "action_color",
    "action_counts",
    "block_view",
    "cache_memory",
    "diff_graphs",
    "draw_heatmap",
    "draw_token_masks",
    "forecast_counts",
    "forecast_view",
    "format_report",
    "full_variant",
    "heatmap_layout",
    "inspect_artifact",
    "inspect_plan",
    "legend_entries",
    "mask_layout",
    "read_variant_graph",
    "step_position",
    "variant_dot",
    "write_pictures",
    "write_plan_pictures",
]
