"""What bench_gpu.py runs: the model, its plans and artifact folders, and one session per backend."""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
import re
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tcgraph import api
from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import Artifact, load_artifact
from tcgraph.models.official.dit import CONFIGS, DiT, build_model, randomize_weights
from tcgraph.plan import Plan, make_plan
from tcgraph.runtime.dispatch import ScheduleDispatcher
from tcgraph.sampling import SamplerSettings

DEFAULT_MODEL = "DiT-XL/2"
DEFAULT_PLANS = "full,fora:2,fora:3,l2c:2,tokencache:2"
DEFAULT_BACKENDS = "eager,torch,torch-nograph,ort,trt"
BACKENDS = ("eager", "torch", "torch-nograph", "torch-compile", "ort", "trt")
STRUCTURAL = ("tokencache", "dynamic", "l2c", "tokencache+l2c")  # learned planners: their shapes, untrained
PIXELS_PER_LATENT = 8  # the SD VAE of the DiT checkpoints: 256x256 images <-> 32x32 latents
# PixArt-alpha 256px's transformer (random weights, speed only): 28 blocks of hidden 1152, 16 heads,
# 32x32 latents in patches of 2 (256 tokens), cross-attention to T5-XXL's 4096-wide text of 120 tokens.
PIXART = "PixArt-alpha"
PIXART_SHAPES = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                     sample_size=32, patch_size=2, caption_channels=4096, cross_attention_dim=1152,
                     use_additional_conditions=False)
PIXART_TEXT_LENGTH = 120
PIXART_PLANS = "full,fora:2,fora:3,taylor:3:1"  # the structural (untrained) learned plans are DiT's two-branch shapes
# --dtype -> the precision words of the torch runner and the TensorRT engines
PRECISION = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
TRT_PRECISION = PRECISION
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench_gpu {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


#################################################################################
#                         Model, plans, artifact folders                        #
#################################################################################


def build_dit(name: str, resolution: int | None, seed: int, depth: int | None = None) -> DiT:
    """The demo model (trained), or a registered config (or PixArt-alpha's shapes) with random weights
    (speed only), `depth` blocks where given."""
    if name == "digits":
        model = api.load_dit("digits")
        if resolution not in (None, model.config.input_size):
            raise TcgraphError(f"the digits model samples {model.config.input_size}x{model.config.input_size} "
                               f"pixels only; omit --resolution")
        return model
    if name == PIXART:
        return pixart_model(resolution, seed, depth)
    if name not in CONFIGS:
        raise TcgraphError(f"unknown model {name!r}; use 'digits', {PIXART!r} or one of {', '.join(CONFIGS)}")
    overrides = {}
    if resolution is not None:
        if resolution % PIXELS_PER_LATENT:
            raise TcgraphError(f"--resolution {resolution} is not a multiple of {PIXELS_PER_LATENT} "
                               "(image side; the latent is 1/8 of it)")
        overrides["input_size"] = resolution // PIXELS_PER_LATENT
    if depth is not None:
        overrides["depth"] = depth
    return randomize_weights(build_model(name, **overrides), seed=seed)


def pixart_model(resolution: int | None, seed: int, depth: int | None = None):
    """A random PixArtTransformer2DModel of PixArt-alpha 256px's shapes (std-0.02 weights), wrapped for tcgraph."""
    from diffusers import PixArtTransformer2DModel

    from tcgraph.models.diffusers.pixart import DiffusersPixArt

    shapes = dict(PIXART_SHAPES)
    if resolution is not None:
        if resolution % PIXELS_PER_LATENT:
            raise TcgraphError(f"--resolution {resolution} is not a multiple of {PIXELS_PER_LATENT}")
        shapes["sample_size"] = resolution // PIXELS_PER_LATENT
    if depth is not None:
        shapes["num_layers"] = depth
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(**shapes).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    return DiffusersPixArt(model).eval()


def conditioning_for(model, batch: int, seed: int):
    """What every backend samples for: class ids 0, 1, ... or, for a text model, random prompt
    embeddings (padded after 20.. tokens) with an empty negative prompt."""
    from tcgraph.sampling.conditioning import Text

    cfg = model.config
    if not cfg.text_conditioned:
        return [i % cfg.num_classes for i in range(batch)]
    g = torch.Generator().manual_seed(seed)
    mask, neg = torch.zeros(batch, PIXART_TEXT_LENGTH), torch.zeros(batch, PIXART_TEXT_LENGTH)
    for i in range(batch):
        mask[i, : 20 + (i * 37) % (PIXART_TEXT_LENGTH - 20)] = 1
    neg[:, 0] = 1
    width = cfg.caption_channels
    return Text(torch.randn(batch, PIXART_TEXT_LENGTH, width, generator=g), mask,
                torch.randn(1, PIXART_TEXT_LENGTH, width, generator=g).expand(batch, -1, -1).clone(), neg)


def make_plans(model: DiT, settings: SamplerSettings, specs: list[str]) -> dict[str, tuple[Plan, str]]:
    """spec -> (plan, how it was made); learned-planner specs give their structural plans."""
    plans: dict[str, tuple[Plan, str]] = {}
    structural: dict[float, dict[str, Plan]] = {}
    for spec in specs:
        kind, _, arg = spec.partition(":")
        if kind in STRUCTURAL:
            if model.config.text_conditioned:
                raise TcgraphError(f"plan {spec!r}: the structural learned plans are DiT's two-branch shapes; for "
                                   f"{PIXART} use {PIXART_PLANS}")
            try:
                target = float(arg)
            except ValueError:
                raise TcgraphError(f"plan {spec!r}: write a target speedup, e.g. {kind}:2") from None
            if target not in structural:
                from bench_tokencache import structural_plans  # heavy imports, only when asked for

                structural[target] = structural_plans(model, settings, [target])
            plans[spec] = (structural[target][f"{kind}:{target}"], "structural (untrained shape: speed only)")
        else:
            plans[spec] = (make_plan(spec, model.config, settings, weights=model), "make_plan")
    return plans


def _json_form(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def artifact_for(model: DiT, plan: Plan, folder: Path, *, engines: dict | None, rebuild: bool,
                 progress: bool) -> tuple[Artifact, tuple[str, str] | None]:
    """The artifact folder of `plan` (reused when it matches), with TensorRT engines built
    with `engines` (engine options) unless None; returns it and, when engines were wanted
    but not built, ("skipped" or "failed", why)."""
    if folder.exists() and not rebuild:
        try:
            art = load_artifact(folder, verify_hashes=False)  # written atomically; hashing GBs costs minutes
            same = (_json_form(art.plan.to_dict()) == _json_form(plan.to_dict())
                    and _json_form(art.model_config.to_dict()) == _json_form(model.config.to_dict()))
            trt = art.tensorrt or {}
            built = {"precision": trt.get("precision"), "strip_weights": trt.get("weight_stripped")}
            if same and (engines is None or built == engines):
                log(f"reusing {folder}")
                return art, None
        except TcgraphError:
            pass
    build = functools.partial(api.transform, model, plan, folder, force=True, check=False, progress=progress)
    trt_problem = None
    if engines is not None:
        log(f"transform {plan.planner} with TensorRT engines ({engines}) -> {folder}")
        try:
            return load_artifact(build(backend="trt", engine_options=engines), verify_hashes=False), None
        except TcgraphError as e:
            trt_problem = ("skipped", f"TensorRT engines could not be built: {e}")
        except Exception as e:  # the other backends still need this plan's folder
            traceback.print_exc()
            trt_problem = ("failed", f"building TensorRT engines: {type(e).__name__}: {e}")
        log(f"trt × {plan.planner}: {trt_problem[0]}: {trt_problem[1]}")
    log(f"transform {plan.planner} -> {folder}")
    return load_artifact(build(), verify_hashes=False), trt_problem


#################################################################################
#                                 Backends                                      #
#################################################################################


def unavailable(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on `device` at all (checked before any work), or None."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return (f"--device {device} but torch sees no CUDA GPU (torch {torch.__version__}, CUDA build: "
                f"{torch.version.cuda or 'none'})")
    if backend == "torch-nograph" and device.type != "cuda":
        return "the same as 'torch' off CUDA (CUDA graphs need --device cuda)"
    if backend == "ort" and device.type == "cuda":
        try:
            import onnxruntime
        except ImportError as e:
            return f"onnxruntime is not installed ({e})"
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return (f"this onnxruntime {onnxruntime.__version__} has no CUDAExecutionProvider (providers: "
                    f"{', '.join(onnxruntime.get_available_providers())}); install onnxruntime-gpu")
    if backend == "trt":
        if device.type != "cuda":
            return f"TensorRT runs only on NVIDIA GPUs (--device {device})"
        try:
            from tcgraph.runtime.trt.common import import_tensorrt
        except ImportError as e:
            return f"this tcgraph has no TensorRT export ({e})"
        try:
            import_tensorrt()
        except TcgraphError as e:
            return str(e)
        if "backend" not in inspect.signature(api.transform).parameters:
            return "this tcgraph's api.transform() cannot build TensorRT engines (it has no backend= parameter)"
    return None


def runner_options(backend: str, device: torch.device, dtype: str) -> tuple[str, dict]:
    """(runner name, options) of a benchmark backend name."""
    precision = PRECISION[dtype]
    if backend == "torch":
        return "torch", {"device": str(device), "precision": precision}
    if backend == "torch-nograph":
        return "torch", {"device": str(device), "precision": precision, "cuda_graphs": False}
    if backend == "torch-compile":
        return "torch", {"device": str(device), "precision": precision, "compile": True}
    if backend == "ort":
        return "ort", {"device": device.type}
    return "trt", {"device": str(device)}


def precision_of(backend: str, art: Artifact | None, dtype: str) -> str:
    if backend == "eager":
        return "float32" if dtype == "float32" else f"{dtype} autocast, fp32 weights"
    if backend.startswith("torch"):
        return dtype
    if backend == "ort":
        return "float32 (ONNX)"
    return str((art.tensorrt or {}).get("precision", "?")) if art is not None else "?"


@contextlib.contextmanager
def eager_session(model: DiT, device: torch.device, dtype: torch.dtype) -> Iterator[tuple]:
    """(step_fn, reset, device) of the uncached model, moved to `device` for the session."""
    autocast = dtype != torch.float32

    from tcgraph.sampling.conditioning import as_inputs

    @torch.inference_mode()
    def step(_step: int, x: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            return model(x, t, *as_inputs(y)).float()

    model.to(device)
    try:
        yield step, (lambda: None), device
    finally:
        model.to("cpu")  # transform exports from the CPU copy


@contextlib.contextmanager
def runner_session(backend: str, art: Artifact, plan: Plan, device: torch.device, dtype: str) -> Iterator[tuple]:
    name, options = runner_options(backend, device, dtype)
    with api.make_runner(name, art, **options) as runner:
        dispatch = ScheduleDispatcher.for_plan(runner, plan)
        yield dispatch, dispatch.reset, torch.device(runner.device)
