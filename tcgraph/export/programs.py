"""Torch programs: one `torch.export` program per variant, for the `torch` backend.

The `torch` backend samples from the artifact folder alone: at transform time every
variant GraphModule is exported with `torch.export.export` (static shapes: the example
inputs fix them) and saved as `variants/<id>.pt2` with `torch.export.save`.

Weights once (DESIGN.md): a program file holds the graph, not the weights. Before saving,
every parameter and buffer of the program is replaced by a meta tensor of the same
shape and dtype (0 bytes in the archive); the runner maps the real tensors in from the
shared `variants/weights.bin` through the parameter map (`map_parameters`), once for
all variants. Every parameter of a variant must therefore be in that map (they are:
the variants are graphs of the model whose state dict was mapped). The graphs' own
tensors (the token indices of partial actions: small) stay in the program file.

The example inputs are not saved either (caches are `[B, N, D]` tensors: large for big
models); the tcgraph I/O names travel in the archive as `tcgraph.json`.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from tcgraph.errors import TcgraphError

PROGRAMS_DIR = "variants"  # beside the ONNX files and the weights file they map
PROGRAM_SUFFIX = ".pt2"
INFO = "tcgraph.json"  # extra file in every program archive: I/O names, format
FORMAT = 1


def program_file(vid: str) -> str:
    """Relative path of the torch program of variant `vid` inside an artifact folder."""
    return f"{PROGRAMS_DIR}/{vid}{PROGRAM_SUFFIX}"


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


def write_programs(folder: Path, variants: Iterable, parameters) -> dict[str, str]:
    """Export and save the torch program of every variant into `folder`; returns id -> relative file.

    `variants`: objects with `.id`, `.gm`, `.input_names`, `.output_names`, `.example_inputs`
    (`VariantGraph`). `parameters`: the parameter map of the folder's weights file (what
    `map_parameters` returned, or `Artifact.parameters`); the tensors in it are not
    saved (meta tensors in the file; `tcgraph.json` lists them as `weights`), the graph's own
    tensors (token indices) are.
    """
    folder = Path(folder)
    shapes = _parameter_shapes(parameters)
    (folder / PROGRAMS_DIR).mkdir(parents=True, exist_ok=True)
    files = {}
    for variant in variants:
        ep = export_program(variant)
        mapped = []
        for name, tensor in ep.state_dict.items():
            if name not in shapes:  # graph-own tensors (token indices of partial actions): kept in the file
                continue
            got = (tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
            if shapes[name] != got:
                raise TcgraphError(
                    f"variant {variant.id} reads the tensor {name} {got}, but the parameter map has {shapes[name]}; "
                    "program files do not store the model's weights, so they must be those of the mapped model: "
                    "map the state dict of the model the variants come from"
                )
            meta = tensor.detach().to("meta")
            ep.state_dict[name] = torch.nn.Parameter(meta, tensor.requires_grad) \
                if isinstance(tensor, torch.nn.Parameter) else meta
            mapped.append(name)
        try:
            ep.example_inputs = None  # not saved: caches are large (settable in recent torch only)
        except AttributeError:
            pass
        info = {"format": FORMAT, "id": variant.id, "inputs": list(variant.input_names),
                "outputs": list(variant.output_names), "weights": mapped}
        rel = program_file(variant.id)
        torch.export.save(ep, folder / rel, extra_files={INFO: json.dumps(info)})
        files[variant.id] = rel
    return files


def read_program(path: Path) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """A saved program (its weights are meta tensors) and its `tcgraph.json` info."""
    extra = {INFO: ""}
    try:
        ep = torch.export.load(Path(path), extra_files=extra)
        info = json.loads(extra[INFO] or "{}")
    except Exception as e:
        raise TcgraphError(
            f"torch {torch.__version__} cannot load the torch program {path} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); programs written by another torch may not load: "
            "re-run `tcgraph transform` with this torch, or sample with --backend ort"
        ) from e
    if info.get("format") != FORMAT:
        raise TcgraphError(f"{path} is not a tcgraph torch program of format {FORMAT} (found {info.get('format')}); "
                           "re-run `tcgraph transform`")
    return ep, info
