"""TensorRT engines for the variants of an artifact folder (docs/design.md, "Backends").

`build_engines` turns every `variants/<id>.onnx` into `engines/<id>.plan` with static
shapes, one precision (fp16, bf16 or fp32) and ONE tactic timing cache shared by all
variants: they are the same network with branches cut out, so the layers they share
are timed once. The cache starts empty and is saved as `engines/timing.cache`.
`write_artifact(..., engines=functools.partial(build_engines, precision=...))` calls it
on the temporary folder once the ONNX files exist and stores its return value as the
manifest's "tensorrt" section (`Artifact.tensorrt`), whose keys this module defines:
tensorrt_version, device {name, compute_capability}, precision, weight_stripped,
timing_cache, engines {id: {file, bytes}}.

Weights once (docs/design.md): a plain engine holds its own copy of every weight, so N
variants cost N copies on disk. `strip_weights=True` builds weight-stripped engines
(`STRIP_PLAN` + `REFIT_IDENTICAL`: optimised for exactly these weights, stored without
them) that the loader refits from the variant's ONNX file, i.e. from the one shared
`variants/weights.bin`. (In GPU memory each engine still holds its own refitted copy.)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tcgraph.errors import TcgraphError
from tcgraph.progress import QUIET, Progress
from tcgraph.runtime.trt.common import cuda_device_info, import_tensorrt, trt_logger

ENGINES_DIR = "engines"
TIMING_CACHE = f"{ENGINES_DIR}/timing.cache"
PRECISIONS = ("fp16", "bf16", "fp32")
_BUILDER_FLAG = {"fp16": "FP16", "bf16": "BF16", "fp32": None}  # fp32: TensorRT's default (TF32 allowed)


def build_engines(
    root: Path,
    entries: list,
    *,
    precision: str = "fp16",
    strip_weights: bool = False,
    workspace_gib: float | None = None,
    progress: Progress = QUIET,
) -> dict:
    """Build `root/engines/<id>.plan` for every variant entry; returns the manifest section.

    `entries` are the variants of `export_variants` (dicts with id and file, or
    VariantSpecs). `precision` is the layer precision TensorRT may choose (inputs and
    outputs keep the manifest dtypes); `strip_weights` builds weight-stripped engines
    that the loader refits from the ONNX files; `workspace_gib` caps the builder's scratch
    memory (default: TensorRT's, the whole GPU). `progress` gets one phase, "engines",
    with one tick per engine.
    """
    if precision not in PRECISIONS:
        raise TcgraphError(f"unknown TensorRT precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if workspace_gib is not None and not workspace_gib > 0:
        raise TcgraphError(f"workspace_gib must be a positive number of GiB, got {workspace_gib!r}")
    if not entries:
        raise TcgraphError("build_engines was given no variant entries; export the variants first")
    root = Path(root)
    entries = [_id_and_file(e) for e in entries]
    missing = [file for _, file in entries if not (root / file).is_file()]
    if missing:
        raise TcgraphError(f"cannot build TensorRT engines: {root} lacks {missing}; export the variants first")

    trt = import_tensorrt()
    device = cuda_device_info()
    flag = _BUILDER_FLAG[precision]
    if flag is not None and not hasattr(trt.BuilderFlag, flag):
        raise TcgraphError(
            f"TensorRT {trt.__version__} has no BuilderFlag.{flag} (TensorRT 11 dropped the weakly typed "
            f"precision flags); build with precision fp32, or use TensorRT 10 for {precision}"
        )
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    out_dir = root / ENGINES_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    timing_cache = None  # created by the first config, then shared by every build
    engines = {}
    with progress.phase("engines", len(entries)) as phase:
        for i, (vid, file) in enumerate(entries):
            onnx_path = root / file
            network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
            parser = trt.OnnxParser(network, logger)
            # From the path, so that the parser finds the external data (variants/weights.bin).
            if not parser.parse_from_file(str(onnx_path)):
                errors = "; ".join(str(parser.get_error(k)) for k in range(parser.num_errors)) or "no details"
                raise TcgraphError(
                    f"TensorRT {trt.__version__} cannot parse variant {vid} ({onnx_path.name}): {errors}; an op or "
                    "dtype of the ONNX graph is unsupported by this TensorRT: use `--backend ort` or `--backend torch`"
                )
            check_conditionals(trt, network, onnx_path, vid)
            config = builder.create_builder_config()
            if flag is not None and keep_sinusoids_fp32(trt, network):
                config.set_flag(trt.BuilderFlag.PREFER_PRECISION_CONSTRAINTS)
            if workspace_gib is not None:
                config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
            if flag is not None:
                config.set_flag(getattr(trt.BuilderFlag, flag))
            if strip_weights:
                # REFIT_IDENTICAL: refitted with the build-time weights, so the builder may still
                # optimise for their values; STRIP_PLAN: the plan file stores none of them.
                config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
                config.set_flag(trt.BuilderFlag.STRIP_PLAN)
            if timing_cache is None:
                timing_cache = config.create_timing_cache(b"")
            config.set_timing_cache(timing_cache, ignore_mismatch=False)
            plan = builder.build_serialized_network(network, config)
            if plan is None:
                raise TcgraphError(
                    f"TensorRT {trt.__version__} failed to build the engine of variant {vid} (see its log above); "
                    "if it ran out of memory, pass a smaller workspace or batch; else use `--backend ort`"
                )
            path = out_dir / f"{vid}.plan"
            with open(path, "wb") as f:
                f.write(plan)
            del plan, config, parser, network
            engines[vid] = {"file": f"{ENGINES_DIR}/{vid}.plan", "bytes": path.stat().st_size}
            phase.tick(f"{vid} ({i + 1}/{len(entries)}, {precision}{', weight-stripped' if strip_weights else ''})")
    with open(root / TIMING_CACHE, "wb") as f:
        f.write(timing_cache.serialize())
    return {
        "tensorrt_version": str(trt.__version__),
        "device": device,
        "precision": precision,
        "weight_stripped": bool(strip_weights),
        "timing_cache": TIMING_CACHE,
        "engines": engines,
    }


def check_conditionals(trt, network, onnx_path: Path, vid: str) -> None:
    """A gated variant (an ONNX `If`, docs/design.md "Gated steps") must become a TensorRT
    if-conditional (`IIfConditional`: its condition layer decides on the device); one clear error
    where this TensorRT has no conditional layers or its parser did not make one."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    if not any(node.op_type == "If" for node in model.graph.node):
        return
    condition = getattr(getattr(trt, "LayerType", None), "CONDITION", None)
    if condition is None:
        raise TcgraphError(f"variant {vid} is a gated step (an ONNX If) but TensorRT {trt.__version__} has no "
                           "conditional layers; sample it with `--backend ort` or `--backend torch`")
    if not any(layer.type == condition for layer in network):
        raise TcgraphError(f"TensorRT {trt.__version__} parsed the If of gated variant {vid} without a conditional "
                           "layer (it would not decide on the device); sample it with `--backend ort` or "
                           "`--backend torch`")


def _id_and_file(entry: Any) -> tuple[str, str]:
    if isinstance(entry, dict):
        return entry["id"], entry["file"]
    return entry.id, entry.file


def keep_sinusoids_fp32(trt, network, max_layers: int = 64) -> int:
    """Pin the sinusoidal timestep embedding to fp32; returns how many Sin/Cos layers were pinned.

    Its arguments are `t * freq` with t up to ~1000, where fp16 is spaced 0.5 apart (and
    the frequencies themselves lose 3 decimals), so in fp16 the sines are noise. The torch
    backend keeps this embedding in fp32 for the same reason. Pinned: each Sin/Cos and
    every layer it depends on, provided those read no network input but `t` (the small
    subgraph from `t` and constants); a Sin/Cos fed by anything else is left alone.
    """
    producer = {}
    for layer in network:
        for j in range(layer.num_outputs):
            producer[layer.get_output(j).name] = layer
    inputs = {network.get_input(k).name for k in range(network.num_inputs)}
    trig = (trt.UnaryOperation.SIN, trt.UnaryOperation.COS)
    pinned = 0
    for layer in network:
        if layer.type != trt.LayerType.UNARY:
            continue
        layer.__class__ = trt.IUnaryLayer  # the Python bindings hand out plain ILayers
        if layer.op not in trig:
            continue
        chain, todo, ok = {}, [layer], True
        while todo and ok:
            current = todo.pop()
            if id(current) in chain:
                continue
            chain[id(current)] = current
            for k in range(current.num_inputs):
                tensor = current.get_input(k)
                if tensor is None:
                    continue
                if tensor.name in inputs:
                    ok = tensor.name == "t"
                elif tensor.name in producer:
                    todo.append(producer[tensor.name])
            ok = ok and len(chain) <= max_layers
        if not ok:
            continue
        for current in chain.values():
            outputs = [current.get_output(j) for j in range(current.num_outputs)]
            # Only layers computing floats on the device: not shape tensors, not integers (t itself).
            if all(o.is_execution_tensor and o.dtype in (trt.float32, trt.float16) for o in outputs):
                current.precision = trt.float32
                for j in range(current.num_outputs):
                    current.set_output_type(j, trt.float32)
        pinned += 1
    return pinned
