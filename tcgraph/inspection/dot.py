"""A block-level drawing of one variant as Graphviz DOT text, coloured as the schedule heatmap
(`tcgraph.inspection.pictures`), rendered where `dot` is installed."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tcgraph.errors import TcgraphError
from tcgraph.files import atomic_output
from tcgraph.inspection.colors import CHOOSE, action_color
from tcgraph.names import FORECAST_WEIGHTS, cache_name, history_name, input_cache_name
from tcgraph.plan.plan import Action, Plan, Recipe


_DOT_FILL = {"compute": "#2166ac", "reuse": "#dedede"}


def _hex(rgb: tuple[int, int, int]) -> str:
    return "#" + "".join(f"{c:02x}" for c in rgb)


def _dot_label(action: Action) -> str:
    if action.kind == "forecast":
        return f"forecast F{action.points}"
    return action.kind if action.k is None else f"{action.kind} k={action.k}"


def variant_dot(plan: Plan, recipe: Recipe, vid: str) -> str:
    """Block-level Graphviz drawing of one variant: blocks with their branches; cache inputs
    (read) and outputs (written) as distinct nodes. A forecast branch reads its history
    entries (`cache.<l>.<br>`, `….h1`, …) and its weights from the `forecast.w` input."""
    writes = set(plan.writes(recipe))
    in_writes = set(plan.input_writes(recipe))
    lines = [f'digraph "{vid}" {{', "  rankdir=TB;", '  node [fontname="Helvetica", fontsize=10];',
             f'  label="{vid}: {recipe.short()}"; labelloc=t;',
             f'  inputs [shape=box, label="{", ".join(plan.settings.model_inputs)}"];',
             '  embed [shape=box, label="'
             + ("patch + t embed, text projection" if plan.settings.text_length else "patch + t/y embed") + '"];',
             "  inputs -> embed;"]
    layout = recipe.forecasts()
    if layout:
        size = sum(p for _, p in layout)
        lines.append(f'  "in:{FORECAST_WEIGHTS}" [shape=note, style=filled, fillcolor="#e7d4e8", '
                     f'label="{FORECAST_WEIGHTS} ({size} floats, per step)"];')
    prev = "embed"
    for block, acts in enumerate(recipe.actions):
        branches = recipe.block_branches(block)
        lines.append(f"  subgraph cluster_b{block} {{ label=\"block {block}\"; style=rounded;")
        for branch, action in zip(branches, acts):
            node = f"b{block}_{branch}"
            label = f"{branch}\\n{_dot_label(action)}"
            fill = _DOT_FILL.get(action.kind) or (_hex(action_color(action, plan.num_tokens))
                                                  if action.kind == "forecast" else "#f4a259")
            font = "white" if action.kind == "compute" or (action.kind == "forecast" and action.points > 2) \
                else "black"
            lines.append(f'    {node} [shape=box, style=filled, fillcolor="{fill}", fontcolor="{font}", '
                         f'label="{label}"];')
        for a, b in zip(branches, branches[1:]):  # the branches in residual order
            lines.append(f'    b{block}_{a} -> b{block}_{b};')
        lines.append("  }")
        lines.append(f"  {prev} -> b{block}_{branches[0]};")
        prev = f"b{block}_{branches[-1]}"
        for branch, action in zip(branches, acts):
            name = cache_name(block, branch)
            node = f"b{block}_{branch}"
            names = (name, input_cache_name(block, branch))
            if action.kind == "forecast":
                reads = [history_name(block, branch, j) for j in range(action.points)]
            else:
                reads = names[:2 if action.kind == "dynamic" else 1] if action.reads_cache else ()
            for n in reads:
                lines.append(f'  "in:{n}" [shape=cylinder, style=filled, fillcolor="#fde0b6", label="{n}"];')
                lines.append(f'  "in:{n}" -> {node} [style=dashed];')
            if action.kind == "forecast":
                lines.append(f'  "in:{FORECAST_WEIGHTS}" -> {node} [style=dotted];')
            for n in names[:2 if (block, branch) in in_writes else 1] if (block, branch) in writes else ():
                lines.append(f'  "out:{n}" [shape=cylinder, style=filled, fillcolor="#b8e186", '
                             f'label="{n} (write)"];')
                lines.append(f'  {node} -> "out:{n}" [style=dashed];')
    lines += ['  final [shape=box, label="final layer"];', f"  {prev} -> final;",
              '  out [shape=box, label="out"];', "  final -> out;", "}"]
    return "\n".join(lines) + "\n"


def render_dot(dot_path: Path, fmt: str = "svg") -> Path | None:
    """Render with Graphviz `dot` where it is installed; None where it is not."""
    exe = shutil.which("dot")
    if exe is None:
        return None
    out = dot_path.with_suffix(f".{fmt}")
    with atomic_output(out, choose=CHOOSE) as tmp:  # never a half SVG
        try:
            subprocess.run([exe, f"-T{fmt}", str(dot_path), "-o", str(tmp)], check=True, capture_output=True,
                           timeout=60)
        except (subprocess.SubprocessError, OSError) as e:
            raise TcgraphError(f"graphviz could not render {dot_path} ({e}); the DOT text is still there") from e
    return out


#################################################################################
#                                  Entry                                        #
#################################################################################
