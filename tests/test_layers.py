"""The layers of tcgraph: no import cycles, and each layer imports only the layers below it.

Every `import` of a tcgraph module counts, at module level or inside a function (a lazy
import that closes a cycle is still a cycle), read from the source with `ast`. The layer
table is the one README.md ("Architecture") shows.
"""
from __future__ import annotations

import ast
from pathlib import Path

import tcgraph

ROOT = Path(tcgraph.__file__).parent

# layer -> the layers it may import (besides itself). A layer is a subpackage or a top-level module.
LAYERS: dict[str, set[str]] = {
    "errors": set(),
    "names": set(),
    "progress": set(),
    "version": set(),
    "lazy": set(),  # names a package imports on first use (PEP 562)
    "files": {"errors"},
    "images": {"errors", "files"},  # what sample writes: PNG grids, .npy arrays
    "data": {"errors"},
    "models": {"lazy", "errors", "names"},
    "text": {"errors", "models"},  # prompt embeddings and a pipeline folder's text encoder
    "demos": {"errors", "models", "text"},  # the text demo's prompt encoder
    "sampling": {"lazy", "errors", "names", "progress", "models", "text", "demos"},
    "eval": {"errors", "data", "models", "demos"},  # the judges: the digits classifier, the text demo's prompts
    "calibrate": {"errors", "names", "progress", "models", "sampling"},
    "plan": {"lazy", "errors", "names", "progress", "models", "sampling", "calibrate"},
    "passes": {"errors", "names", "models", "plan"},
    "compile": {"errors", "names", "progress", "models", "plan", "passes", "export"},
    "export": {"lazy", "errors", "names", "progress", "version", "files", "models", "sampling", "plan"},
    "runtime": {"errors", "names", "progress", "models", "sampling", "plan", "export"},
    "inspection": {"errors", "names", "files", "models", "sampling", "plan", "export"},
    "api": {"errors", "names", "progress", "version", "files", "images", "models", "sampling", "calibrate", "plan", "passes", "compile",
            "export", "runtime", "inspection", "eval"},
    # serving on Triton: the artifact, the runtime and the sampling functions of the public API
    "serve": {"errors", "progress", "version", "files", "export", "runtime", "text", "api"},
    "diffusers": {"errors", "models", "sampling", "export", "runtime", "api"},
    "suggest": {"errors"},  # "did you mean", torch-free
    "cli_table": {"errors", "files", "models", "plan"},  # the CLI's plan options and model names, cached
    # the argument parser, torch-free; the text demo's vocabulary (tcgraph.demos.vocabulary, torch-free) for --help
    "cli_parser": {"errors", "version", "suggest", "cli_table", "serve", "demos"},
    "compare": {"errors", "progress", "version", "files", "models", "eval", "export", "sampling", "suggest", "api",
                "inspection"},
    "cli": {"errors", "names", "progress", "version", "files", "models", "sampling", "plan", "runtime", "inspection", "api", "serve",
            "cli_parser", "cli_table", "suggest", "compare"},
    "__init__": {"lazy", "errors", "version", "models", "api"},  # api and models on first use (PEP 562)
    "__main__": {"cli"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def tcgraph_imports(path: Path, modules: set[str]) -> set[str]:
    """The tcgraph modules `path` imports (a `from a import b` names module a.b where that is one)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "tcgraph")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "tcgraph":
                continue
            submodules = {f"{base}.{a.name}" for a in node.names} & modules
            found.update(submodules)
            if len(submodules) < len(node.names):  # names defined in `base` itself
                found.add(base)
    found.discard(me)
    return {m for m in found if m in modules}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(files)
    return {m: tcgraph_imports(p, modules) for m, p in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles among tcgraph modules: " + "; ".join(" <-> ".join(c) for c in found)


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]


def test_each_layer_imports_only_layers_below():
    bad = []
    for module, imports in sorted(import_graph().items()):
        layer = layer_of(module)
        assert layer in LAYERS, f"{module} is in layer {layer!r}, which the layer table does not know: add it"
        for target in sorted(imports):
            other = layer_of(target)
            if other != layer and other not in LAYERS[layer]:
                bad.append(f"{module} -> {target}")
    assert not bad, "imports across layers that the table does not allow:\n" + "\n".join(bad)


def test_the_layer_table_itself_has_no_cycle():
    graph = {layer: set(allowed) for layer, allowed in LAYERS.items()}
    assert cycles(graph) == []


def test_runtime_never_imports_passes_compile_or_calibrate():
    for module, imports in import_graph().items():
        if layer_of(module) == "runtime":
            assert not {layer_of(t) for t in imports} & {"passes", "compile", "calibrate"}, module
