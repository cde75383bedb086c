"""Export variant graphs to ONNX, every variant reading ONE shared weights file.

Each variant (one static fx graph per distinct denoising recipe) becomes
`variants/<id>.onnx`. Variants differ only in structure, so their large initializers
are the same tensors: each distinct tensor is written once into `variants/weights.bin`
and every variant refers to it by the same canonical name, which lets ONNX Runtime
share one in-memory copy between sessions (see `tcgraph.runtime.ort`).

Exporter choice (torch 2.13): `torch.onnx.export(..., dynamo=False)` still exists but is
the deprecated TorchScript exporter (it warns on every call). We use the default
`dynamo=True` exporter (torch.export + onnxscript): on a traced DiT it emits a cleaner
graph (one `Gelu` op, `LayerNormalization`, no `Shape`/`Slice`/`Identity` chains:
~300 nodes vs ~700 for the digits model; opset 20 by default), keeps parameter FQNs
as initializer names, and it is the exporter torch maintains. Its costs: time (measured
on the busy 2-core machine: ~8 s per digits variant vs 0.4 s with the TorchScript
exporter, ~15 s per DiT-B/2 variant), and its optimizer folds the `Linear` weight
transposes into new initializers named `val_<n>`, numbered differently in every
variant; content hashing (`tcgraph.export.weights`) gives them one name (`<fqn>.T`) everywhere.

Why the weights file lives in `variants/` and not at the artifact root: ONNX (>= 1.17)
and ONNX Runtime refuse external data whose location leaves the model's folder
(`../weights.bin` -> "points outside the directory"), so the file sits beside the
variants it serves.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import onnx
import torch
import torch.fx

from tcgraph.errors import TcgraphError
from tcgraph.progress import QUIET, Progress
from tcgraph.export.weights import (  # noqa: F401  (re-exported: the public names of this module)
    EXTERNAL_MIN_BYTES,
    WEIGHTS_ALIGN,
    WEIGHTS_FILE,
    CanonicalNames,
    ExternalTensor,
    WeightsFile,
    externalize,
    file_sha256,
    read_external_initializers,
)

from tcgraph.export.specs import VARIANTS_DIR, WEIGHTS_PATH  # noqa: E402,F401  (re-exported)
OUTPUT_SUFFIX = ".new"  # ONNX name of an output whose name is also an input (`cache.3.mlp`)
_SCRATCH_DIR = ".export-scratch"
_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

#################################################################################
#                              Public interface                                 #
#################################################################################


@runtime_checkable
class ExportableVariant(Protocol):
    """What export reads of a variant: a static fx graph and the names of its graph I/O.

    A structural type, so that export does not import the compile layer that builds the
    variants (`tcgraph.compile`). `gm` takes its placeholders in the order of
    `input_names` and returns one tensor or a tuple in the order of `output_names`. Names
    follow docs/design.md ("Graph interface of a variant"): `x`, `t`, `y`, then
    `cache.<block>.<branch>` inputs; `out`, then cache outputs. `example_inputs` fixes the
    (static) shapes and is used to verify the export. `check_variant` checks all of it.
    """

    id: str
    gm: torch.fx.GraphModule
    input_names: Sequence[str]
    output_names: Sequence[str]
    example_inputs: Mapping[str, torch.Tensor]


def check_variant(v: ExportableVariant) -> None:
    """Refuse a variant whose id cannot name a file or whose names do not match its graph."""
    if not _ID_RE.fullmatch(v.id or ""):
        raise TcgraphError(
            f"variant id {v.id!r} cannot name a file; use letters, digits, '_', '-' or '.' (e.g. 'v0')"
        )
    graph = getattr(v.gm, "graph", None)  # a gated step is a module of several graphs (tcgraph.passes.gated)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"] if graph is not None else list(v.input_names)
    if len(placeholders) != len(v.input_names):
        raise TcgraphError(
            f"variant {v.id}: {len(v.input_names)} input names {list(v.input_names)} given, "
            f"but the graph has {len(placeholders)} placeholders {[n.name for n in placeholders]}; "
            "pass one name per placeholder, in placeholder order"
        )
    for names, what in ((v.input_names, "input"), (v.output_names, "output")):
        if len(set(names)) != len(names):
            raise TcgraphError(f"variant {v.id}: duplicate {what} names in {list(names)}; names must be unique")
    missing = [n for n in v.input_names if n not in v.example_inputs]
    unknown = [n for n in v.example_inputs if n not in v.input_names]
    if missing or unknown:
        raise TcgraphError(
            f"variant {v.id}: example_inputs must have exactly the input names {list(v.input_names)}; "
            f"missing {missing}, unknown {unknown}"
        )


def onnx_output_names(v: ExportableVariant) -> list[str]:
    """ONNX names of the outputs: a name that is also an input gets OUTPUT_SUFFIX.

    ONNX defines each value once, so a cache read and rewritten by the same variant
    (`cache.3.mlp` in and out) cannot keep its name on the output side. The manifest
    records both (`name`, `onnx_name`); runners return outputs by `name`.
    """
    taken = set(v.input_names) | set(v.output_names)
    result = []
    for name in v.output_names:
        onnx_name = name
        while onnx_name in v.input_names or (onnx_name != name and onnx_name in taken):
            onnx_name += OUTPUT_SUFFIX
        taken.add(onnx_name)
        result.append(onnx_name)
    return result


def export_variants(
    variants: Sequence[ExportableVariant],
    out_dir: Path,
    *,
    opset: int | None = None,
    verify: bool = True,
    atol: float = 1e-4,
    progress: Progress = QUIET,
) -> list[dict]:
    """Export `variants` to `out_dir/variants/<id>.onnx` sharing `out_dir/variants/weights.bin`.

    Returns one manifest entry per variant: id, file, sha256, inputs, outputs (each with
    name, shape, dtype; outputs also `onnx_name`), opset, external_initializers (the
    canonical names it reads from the weights file) and max_abs_diff (ONNX Runtime vs
    `gm`, None when `verify` is False). Raises TcgraphError when a variant cannot be
    exported or differs from its graph by more than `atol`. `progress` gets one phase,
    "export", with one tick per variant.
    """
    with progress.phase("export", len(variants)) as phase:
        return export_each(variants, out_dir, opset=opset, verify=verify, atol=atol, tick=phase.tick)


def export_each(
    variants: Sequence[ExportableVariant],
    out_dir: Path,
    *,
    opset: int | None,
    verify: bool,
    atol: float,
    tick: Callable[[str], None],
    programs: dict | None = None,
) -> list[dict]:
    """`export_variants` calling `tick(note)` once per variant, so that a caller with more
    work in the same progress phase (`write_artifact`) can share it.

    With `programs` (a dict), each variant is captured once with `torch.export` and that
    program is both what the ONNX exporter translates and what `programs[id]` keeps for the
    torch backend's program files (`tcgraph.export.programs.write_programs`): one capture
    per variant instead of two."""
    out_dir = Path(out_dir)
    ids = [v.id for v in variants]
    if not variants:
        raise TcgraphError("export_variants was given no variants; pass at least one variant graph")
    for v in variants:
        check_variant(v)
    if len(set(ids)) != len(ids):
        raise TcgraphError(f"variant ids must be unique, got {ids}")

    variants_dir = out_dir / VARIANTS_DIR
    variants_dir.mkdir(parents=True, exist_ok=True)
    scratch = out_dir / _SCRATCH_DIR
    # No initializer may be renamed to a graph input/output name of any variant.
    reserved = {n for v in variants for n in (*v.input_names, *onnx_output_names(v))}
    namer = CanonicalNames(reserved)
    entries = []
    try:
        with WeightsFile(variants_dir / WEIGHTS_FILE) as weights:
            for v in variants:
                scratch.mkdir(parents=True, exist_ok=True)
                raw_path = scratch / f"{v.id}.onnx"
                _torch_export(v, raw_path, opset, programs)
                model = onnx.load(str(raw_path), load_external_data=True)
                for graph in _graphs(v.gm):
                    namer.learn(graph)
                used = externalize(model, weights, namer)
                shutil.rmtree(scratch)
                path = variants_dir / f"{v.id}.onnx"
                onnx.save(model, str(path))
                del model
                weights.flush()
                entry = _entry(v, path, out_dir, used)
                if verify:
                    entry["max_abs_diff"] = _verify(v, path, entry, atol)
                    tick(f"verified variant {v.id}: max abs diff {entry['max_abs_diff']:.3g} (atol {atol:g})")
                else:
                    tick(f"exported variant {v.id}")
                entries.append(entry)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return entries


def _graphs(module: torch.nn.Module) -> list[torch.fx.GraphModule]:
    """The fx graphs of a variant: itself, or those a gated step is made of (each names the model's
    parameters as the model does)."""
    if isinstance(module, torch.fx.GraphModule):
        return [module]
    return [m for m in module.modules() if isinstance(m, torch.fx.GraphModule)]


#################################################################################
#                         torch -> ONNX, one variant                            #
#################################################################################


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's deprecation warnings and its torchvision notices."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    """Export in eval mode without leaving the caller's module changed."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def _torch_export(v: ExportableVariant, path: Path, opset: int | None, programs: dict | None = None) -> None:
    """ONNX of one variant at `path`; with `programs`, its `torch.export` program is kept there too."""
    args = tuple(v.example_inputs[n] for n in v.input_names)
    onnx_outputs = onnx_output_names(v)
    try:
        with _quiet_exporter(), _eval_mode(v.gm), torch.no_grad():
            model = v.gm
            if programs is not None:  # the ONNX exporter's own first step (non-strict, static shapes), done here once
                model = programs[v.id] = torch.export.export(v.gm, args, strict=False)
            torch.onnx.export(
                model,
                args,
                str(path),
                dynamo=True,  # see the module docstring for why
                input_names=list(v.input_names),
                output_names=onnx_outputs,
                opset_version=opset,
                external_data=True,
                verbose=False,
            )
    except Exception as e:  # the exporter raises many types; KeyboardInterrupt passes through
        disk = _os_error_in(e)
        if disk is not None:  # a full disk or a vanished folder, not the graph: the caller names the folder
            raise disk from e
        summary = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise TcgraphError(
            f"variant {v.id}: torch.onnx.export failed ({type(e).__name__}: {summary}); the variant graph "
            "must be exportable by torch.export with static shapes (no data-dependent control flow); "
            "run the graph eagerly on its example inputs to locate the failing node"
        ) from e
    model = onnx.load(str(path), load_external_data=False)
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != list(v.input_names) or got_out != onnx_outputs:
        raise TcgraphError(
            f"variant {v.id}: the exported ONNX graph has inputs {got_in} and outputs {got_out}, "
            f"expected {list(v.input_names)} and {onnx_outputs}; the exporter changed the graph interface: "
            "check that the graph's placeholders and returned values match the given names one to one"
        )
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            raise TcgraphError(
                f"variant {v.id}: {value.name} has a dynamic shape in the exported graph; "
                "tcgraph artifacts need static shapes: give example inputs of the final batch and size"
            )


#################################################################################
#                        Manifest entry and verification                        #
#################################################################################


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _io_entry(value: onnx.ValueInfoProto) -> tuple[list[int], str]:
    tt = value.type.tensor_type
    shape = [int(d.dim_value) for d in tt.shape.dim]
    return shape, str(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)))


def _entry(v: ExportableVariant, path: Path, out_dir: Path, used: list[str]) -> dict:
    try:
        onnx.checker.check_model(str(path))  # path form: checks the external data too
    except Exception as e:
        raise TcgraphError(f"variant {v.id}: the ONNX checker rejects {path.name}: {e}") from e
    model = onnx.load(str(path), load_external_data=False)
    inputs = []
    for value in model.graph.input:
        shape, dtype = _io_entry(value)
        inputs.append({"name": value.name, "shape": shape, "dtype": dtype})
    outputs = []
    for name, value in zip(v.output_names, model.graph.output):
        shape, dtype = _io_entry(value)
        outputs.append({"name": name, "onnx_name": value.name, "shape": shape, "dtype": dtype})
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "id": v.id,
        "file": path.relative_to(out_dir).as_posix(),
        "sha256": file_sha256(path),
        "inputs": inputs,
        "outputs": outputs,
        "opset": opset,
        "external_initializers": used,
        "max_abs_diff": None,
    }


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.contiguous().numpy()


def _verify(v: ExportableVariant, path: Path, entry: dict, atol: float) -> float:
    """Run the exported file with ONNX Runtime (CPU) and compare with the fx graph."""
    import onnxruntime as ort

    args = tuple(v.example_inputs[n] for n in v.input_names)
    with torch.no_grad(), _eval_mode(v.gm):
        ref = v.gm(*args)
    ref = list(ref) if isinstance(ref, (tuple, list)) else [ref]
    if len(ref) != len(v.output_names):
        raise TcgraphError(
            f"variant {v.id}: the graph returns {len(ref)} values but {len(v.output_names)} output names "
            f"were given ({v.output_names}); give one name per returned tensor"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # respect the caller's thread limit
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {n: _as_numpy(a) for n, a in zip(v.input_names, args)}
    got = session.run([o["onnx_name"] for o in entry["outputs"]], feeds)
    worst = 0.0
    for out, expected, actual in zip(entry["outputs"], ref, got):
        expected = _as_numpy(expected)
        if expected.shape != actual.shape:
            raise TcgraphError(
                f"variant {v.id}: output {out['name']} has shape {list(actual.shape)} in ONNX Runtime "
                f"but {list(expected.shape)} in the graph"
            )
        diff = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64)))) if expected.size else 0.0
        out["max_abs_diff"] = diff
        if not diff <= atol:  # also catches NaN
            raise TcgraphError(
                f"variant {v.id}: output {out['name']} of the ONNX export differs from the fx graph by "
                f"max abs diff {diff:.3g} > atol {atol:g}; an op translates differently to ONNX: bisect the "
                "graph, or raise atol if this is float noise"
            )
        worst = max(worst, diff)
    return worst


def _os_error_in(e: BaseException) -> OSError | None:
    """The OSError (full disk, quota, a removed folder) behind an exporter's error, if one is its cause:
    the exporter wraps it in its own types, which would blame the graph."""
    import errno

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        text = str(e)
        for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS):
            if code is not None and os.strerror(code) in text:
                return OSError(code, os.strerror(code))
        e = e.__cause__ or e.__context__
    return None
