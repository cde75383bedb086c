"""bench_gpu.py --family flux: FLUX.1-dev at full size (random bf16 weights, speed only), eager vs the torch backend.

    python benchmarks/bench_gpu.py --family flux                 # FLUX.1-dev, 1024x1024, 28 steps, bf16, text 512
    python benchmarks/bench_gpu.py --family flux --model FLUX-tiny --device cpu --steps 4 --text-length 8 \\
        --dtype bfloat16 --repeats 1 --out /tmp/flux-smoke      # what gpu_check.sh --cpu-smoke runs

**Why no artifact folder.** FLUX.1-dev has 11.9 B parameters. An artifact folder holds them in
float32 beside an ONNX export of every variant (~48 GB, and minutes of single-threaded export per
variant): more than a 15-minute GPU lease holds. So each plan's variants are rewritten in memory
(`tcgraph.compile.rewrite_variant`, the graphs `transform` would export, unchecked as with
`check=False`) and run by the same `TorchRunner` as `tcgraph sample --backend torch` (one CUDA graph
per variant, caches in its bank, `ScheduleDispatcher`) through an `Artifact` without files, its I/O
specs taken from the plan. The graphs share the model's parameters: one copy of the weights.

**Precision.** The parameters are made on the device, in the dtype of --dtype (bf16 on CUDA: fp32
weights would need 48 GB), drawn N(0, 0.02) in place; nothing is built on the host. Where the torch
runner casts the input of every matmul of an exported program to its weight's dtype
(tcgraph.runtime.torch.precision), here a forward pre-hook on every Linear does the same for the fx
graphs and for eager (the float32 timestep features meet bf16 weights); RoPE runs in float32 and
casts back, as diffusers does. `eager` is the wrapped model's own forward (diffusers' modules in
diffusers' order), `full` only, in the same dtype.

**Plans.** `full`, `fora:N`, `taylor:N[:order]` (make_plan), and `tokens:N`, a fixed token plan (no
learned planner: calibrating FLUX.1-dev at full size would not fit the budget): steps 0, N, 2N, ...
compute everything; every other step recomputes half of the image rows (every second one, the same
rows at every step) of each branch that writes image rows (the joint attentions keep every text row
and every key and value) and reuses the text-only MLPs. Speed depends on a plan's shape only; with
random weights the samples say nothing of quality.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import platform
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gpu.measure import NO_CUDA, measure
from gpu.prepare import PRECISION, log, slug
from gpu.report import format_table, versions, write_outputs

from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import Artifact
from tcgraph.export.specs import TensorSpec, VariantSpec
from tcgraph.models.diffusers.flux_config import FluxConfig, flux_kwargs
from tcgraph.names import FORECAST_WEIGHTS, OUT, X, is_cache
from tcgraph.plan import COMPUTE, REUSE, Plan, Recipe, make_plan, plan_flops
from tcgraph.plan.actions import partial
from tcgraph.runtime.dispatch import ScheduleDispatcher
from tcgraph.runtime.torch.runner import TorchRunner
from tcgraph.sampling import SamplerSettings, make_noise, sampler_for
from tcgraph.sampling.conditioning import Text

FLUX_DEV, FLUX_TINY = "FLUX.1-dev", "FLUX-tiny"
FLUX_BACKENDS = ("eager", "torch", "torch-nograph")
# FLUX.1-dev: 19 double + 38 single blocks of width 3072 (24 heads of 128), latent 16 channels in 2x2
# patches, T5 width 4096, CLIP pooled 768, the guidance embedding; 1024x1024 pixels -> latent 128 -> 4096 tokens.
# FLUX-tiny: tests/models/flux_tiny.py's shapes (2 double + 2 single blocks of width 32, 16 image tokens).
SHAPES = {
    FLUX_DEV: dict(input_size=128, in_channels=16, hidden_size=3072, depth=57, single_depth=38, num_heads=24,
                   caption_channels=4096, pooled_channels=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
    FLUX_TINY: dict(input_size=8, in_channels=4, hidden_size=32, depth=4, single_depth=2, num_heads=2,
                    caption_channels=12, pooled_channels=10, guidance_embeds=True, axes_dims_rope=(4, 6, 6)),
}
# FluxPipeline's defaults for FLUX.1-dev: 28 steps, guidance 3.5, T5 prompts of 512 tokens
DEFAULTS = dict(model=FLUX_DEV, batch=1, guidance=3.5, steps=28, plans="full,fora:3,taylor:4,tokens:2",
                backends="eager,torch", text_length=512)
# FLUX.1-dev's scheduler_config.json: flow matching, its shift from the image's token count
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
             "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
             "max_image_seq_len": 4096}
INIT_STD = 0.02
PIXELS_PER_LATENT = 8


#################################################################################
#                          Model, settings, plans                               #
#################################################################################


def flux_config(name: str, resolution: int | None = None, depth: int | None = None) -> FluxConfig:
    """The config of `name`, at `resolution` pixels (latent /8) and `depth` blocks (a third of them double,
    as FLUX.1) where given."""
    if name not in SHAPES:
        raise TcgraphError(f"--family flux: unknown model {name!r}; use {' or '.join(SHAPES)}")
    shapes = dict(SHAPES[name])
    if resolution is not None:
        if resolution % (2 * PIXELS_PER_LATENT):
            raise TcgraphError(f"--resolution {resolution}: FLUX needs a multiple of 16 (latent /8, 2x2 patches)")
        shapes["input_size"] = resolution // PIXELS_PER_LATENT
    if depth is not None:
        shapes.update(depth=depth, single_depth=2 * depth // 3)
    return FluxConfig(**shapes)


def _input_in_weight_dtype(module: torch.nn.Linear, args: tuple) -> tuple | None:
    x = args[0]
    return None if x.dtype == module.weight.dtype else (x.to(module.weight.dtype), *args[1:])


def cast_linear_inputs(model: torch.nn.Module) -> torch.nn.Module:
    """Every Linear of `model` casts its input to its weight's dtype (a forward pre-hook): for fx graphs and
    eager, what the torch runner's precision pass does to exported programs."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(_input_in_weight_dtype)
    return model


def build_flux(config: FluxConfig, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """The wrapped diffusers FluxTransformer2DModel of `config`, every parameter made on `device` in `dtype`
    and drawn N(0, INIT_STD) there; every Linear's input cast to its weight's dtype (see the module docstring)."""
    from diffusers import FluxTransformer2DModel

    from tcgraph.models.diffusers.flux import wrap

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**flux_kwargs(config))
    finally:
        torch.set_default_dtype(default)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, INIT_STD, generator=g)
    # the single blocks' split projections keep the weights' dtype and device; the RoPE tables follow
    return cast_linear_inputs(wrap(model, config).to(device))


def flux_settings(config: FluxConfig, steps: int, batch: int, guidance: float, text_length: int) -> SamplerSettings:
    return SamplerSettings(num_steps=steps, cfg_scale=guidance, batch=batch, resolution=config.input_size,
                           text_length=text_length, pooled=True, guidance="input", sampler="diffusers",
                           scheduler=SCHEDULER)


def flux_text(config: FluxConfig, batch: int, length: int, seed: int) -> Text:
    """Random prompt embeddings (T5 sequence, CLIP pooled), one prompt per image, every token read."""
    g = torch.Generator().manual_seed(seed)
    ones = torch.ones(batch, length)
    return Text(torch.randn(batch, length, config.caption_channels, generator=g), ones,
                torch.randn(1, length, config.caption_channels, generator=g).expand(batch, -1, -1).clone(),
                ones.clone(), pooled=torch.randn(batch, config.pooled_channels, generator=g),
                negative_pooled=torch.randn(1, config.pooled_channels, generator=g).expand(batch, -1).clone())


def token_plan(model: torch.nn.Module, settings: SamplerSettings, interval: int) -> Plan:
    """`tokens:N` (see the module docstring): full steps every N, half of the image rows in between."""
    from tcgraph.models.adapter import adapter_for
    from tcgraph.models.layout import Layout
    from tcgraph.names import IMAGE

    if interval < 2:
        raise TcgraphError(f"tokens:{interval}: write an interval of 2 or more, e.g. tokens:2")
    layout = Layout(adapter_for(model).layout(model))
    n, names = model.config.num_tokens, layout.branches()
    kept = partial(range(0, n, 2))
    full = Recipe.uniform(layout.depth, COMPUTE, names)
    half = Recipe(tuple(tuple(kept if IMAGE in layout.streams(block, branch) else REUSE for branch in names[block])
                        for block in range(layout.depth)), names)
    recipes = tuple(full if s % interval == 0 else half for s in range(settings.num_steps))
    return Plan(f"tokens:{interval}", settings, recipes, n, {"structural": True, "kept_image_rows": 0.5},
                layout=layout)


def flux_plans(model: torch.nn.Module, settings: SamplerSettings, specs: list[str]) -> dict[str, tuple[Plan, str]]:
    plans = {}
    for spec in specs:
        kind, _, arg = spec.partition(":")
        if kind == "tokens":
            if not arg.isdigit():
                raise TcgraphError(f"plan {spec!r}: write the interval of full steps, e.g. tokens:2")
            plans[spec] = (token_plan(model, settings, int(arg)), "fixed token plan (every other image row)")
        else:
            plans[spec] = (make_plan(spec, model.config, settings, weights=model), "make_plan")
    return plans


#################################################################################
#                     The torch backend, without a folder                       #
#################################################################################


def in_memory_artifact(model: torch.nn.Module, plan: Plan, device: torch.device) -> tuple[Artifact, dict]:
    """(an Artifact without files, {variant id: fx program}) of `plan`: its variants rewritten in memory,
    their I/O specs from the plan's shapes (what transform's manifest records), no example tensors made."""
    from tcgraph.compile import rewrite_variant
    from tcgraph.passes import io_names

    cfg = model.config
    declared = {i.name: TensorSpec(i.name, tuple(i.shape), i.dtype)
                for i in cfg.family.graph_inputs(cfg, plan.settings)}

    def spec(name: str, recipe: Recipe) -> TensorSpec:
        if name in declared:
            return declared[name]
        if name == OUT:  # the model's prediction has the latent's shape
            return TensorSpec(OUT, declared[X].shape, "float32")
        if name == FORECAST_WEIGHTS:
            return TensorSpec(name, (sum(points for _, points in recipe.forecasts()),), "float32")
        if is_cache(name):
            return TensorSpec(name, tuple(plan.cache_shape(name, cfg.hidden_size)), "float32")
        raise TcgraphError(f"no shape for the graph input or output {name!r} of plan {plan.planner}")

    specs, programs = [], {}
    for i, recipe in enumerate(plan.variants()):
        vid = f"v{i}"
        if recipe.gate is not None:
            raise TcgraphError(f"plan {plan.planner}: gated steps are not benchmarked in memory")
        gm = rewrite_variant(model, plan, recipe).to(device)  # its index constants join the weights
        inputs, outputs = io_names(gm)
        if (inputs, outputs) != tuple(plan.variant_io(recipe)):
            raise TcgraphError(f"variant {vid} has I/O {inputs}->{outputs}, the plan expects {plan.variant_io(recipe)}")
        specs.append(VariantSpec(vid, "", tuple(spec(n, recipe) for n in inputs),
                                 tuple(spec(n, recipe) for n in outputs)))
        programs[vid] = gm
    return Artifact(root=Path("<in memory>"), plan=plan, model_config=cfg, variants=tuple(specs)), programs


@contextlib.contextmanager
def runner_session(backend: str, model: torch.nn.Module, plan: Plan, device: torch.device,
                   dtype: str) -> Iterator[tuple]:
    """(dispatch, reset, device) of the torch backend on `plan`'s in-memory variants."""
    art, programs = in_memory_artifact(model, plan, device)
    graphs = backend == "torch" and device.type == "cuda"
    with TorchRunner(art, device=str(device), precision=PRECISION[dtype], cuda_graphs=graphs,
                     programs=programs) as runner:
        dispatch = ScheduleDispatcher.for_plan(runner, plan)
        yield dispatch, dispatch.reset, runner.device


@contextlib.contextmanager
def eager_session(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Iterator[tuple]:
    """(step_fn, reset, device) of the uncached model (already on `device` in `dtype`)."""
    from tcgraph.sampling.conditioning import as_inputs

    @torch.inference_mode()
    def step(_step: int, x: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
        cond = [a.to(dtype) if a.is_floating_point() else a for a in as_inputs(y)]
        return model(x.to(dtype), t, *cond).float()

    yield step, (lambda: None), device


#################################################################################
#                                    Main                                       #
#################################################################################


def run_flux(args, argv: list[str] | None) -> dict:
    """bench_gpu.py's main for --family flux (its arguments, FLUX defaults filled in): one row per
    (backend, plan), eager `full` first; the JSON and markdown rewritten after every row."""
    import sys

    device = torch.device(args.device)
    cuda_ok = device.type == "cuda" and torch.cuda.is_available()
    if device.type == "cuda" and not cuda_ok:
        raise TcgraphError(f"--device {device} but torch sees no CUDA GPU (torch {torch.__version__}); "
                           "on a CPU machine pass --device cpu --model FLUX-tiny")
    if cuda_ok and device.index is None:  # some torch versions' memory queries want an index
        device = torch.device("cuda", torch.cuda.current_device())
    if args.prepare_only or args.merge:
        raise TcgraphError("--family flux builds its variants in memory and measures every row in one run: "
                           "there is nothing to prepare or merge (drop --prepare-only, --merge)")
    dtype = args.dtype or ("bfloat16" if cuda_ok else "float32")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in FLUX_BACKENDS]
    if unknown:
        raise TcgraphError(f"--family flux runs the backends {', '.join(FLUX_BACKENDS)} (no artifact folder for "
                           f"ort or trt); got {unknown}")
    specs = ["full"] + [p.strip() for p in args.plans.split(",") if p.strip() and p.strip() != "full"]
    config = flux_config(args.model, args.resolution, args.depth)
    log(f"{args.model}: building {config.double_depth} double + {config.single_depth} single blocks of width "
        f"{config.hidden_size} on {device} in {dtype}")
    model = build_flux(config, device, getattr(torch, dtype), args.seed)
    settings = flux_settings(config, args.steps, args.batch, args.guidance, args.text_length)
    plans = flux_plans(model, settings, specs)
    device_name = torch.cuda.get_device_name(device) if cuda_ok else f"CPU ({platform.machine()})"
    out = args.out or (Path(__file__).parents[1] / "results" / f"gpu-{slug(device_name if cuda_ok else 'cpu')}-flux")
    params = sum(p.numel() for p in model.parameters())
    result: dict[str, Any] = {
        "config": {
            "family": "flux", "model": args.model, "weights": f"random N(0, {INIT_STD}) (seed {args.seed})",
            "parameters": params, "blocks": [config.double_depth, config.single_depth],
            "image_side": config.input_size * PIXELS_PER_LATENT, "input_size": config.input_size,
            "tokens": config.num_tokens, "text_length": args.text_length, "batch": args.batch,
            "guidance": args.guidance, "model_batch": settings.model_batch, "steps": args.steps,
            "sampler": SCHEDULER["_class_name"], "device": str(device), "device_name": device_name, "dtype": dtype,
            "repeats": args.repeats, "seed": args.seed, "backends": backends, "plans": specs,
            "versions": versions(), "machine": platform.node() + " " + (platform.processor() or platform.machine()),
            "command": "python benchmarks/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        },
        "rows": [], "skipped": [], "failed": [],
        "quality_note": ("Random weights: a plan's PSNR vs the same backend's full samples is no quality measure; "
                         "the torch backend's full vs eager is a parity check (same dtype, same arithmetic)."),
        "_samples": {},
    }
    log(f"{params / 1e6:,.1f} M parameters, {config.num_tokens} image + {args.text_length} text tokens, {device_name}")
    if not cuda_ok:
        result["skipped"].append({"backend": None, "plan": None,
                                  "reason": "GPU memory and host<->device copy counts of every row: " + NO_CUDA})
    if "torch-nograph" in backends and not cuda_ok:
        backends.remove("torch-nograph")
        result["skipped"].append({"backend": "torch-nograph", "plan": None,
                                  "reason": "the same as 'torch' off CUDA (CUDA graphs need --device cuda)"})
    sampler = sampler_for(settings, config)
    text = flux_text(config, args.batch, args.text_length, args.seed)
    noise = make_noise(args.batch, config.in_channels, config.input_size, args.seed)

    def record(backend: str, spec: str, session) -> None:
        plan, source = plans[spec]
        schedule = ["eager"] * args.steps if backend == "eager" else plan.schedule()
        log(f"{backend} × {spec}: measuring")
        try:
            row, samples = measure(session, schedule, sampler, text, noise, args.seed, device, args.repeats,
                                   cuda_ok and not args.no_profile)
        except Exception as e:  # an OOM or a bug in one row must not lose the others' numbers
            traceback.print_exc()
            result["failed"].append({"backend": backend, "plan": spec, "error": f"{type(e).__name__}: {e}"})
        else:
            flops = plan_flops(config, plan)
            result["_samples"][(backend, spec)] = samples
            result["rows"].append({
                "backend": backend, "plan": spec, "plan_source": source,
                "precision": dtype if backend != "eager" else f"{dtype} (weights and activations)",
                "variants": len(plan.variants()) if backend != "eager" else 1,
                "predicted_speedup": flops["predicted_speedup"], "flop_fraction": flops["fraction"],
                "cache_mib": plan.cache_bytes(config.hidden_size, torch.finfo(getattr(torch, dtype)).bits // 8)
                / 2**20, **row})
            log(f"{backend} × {spec}: {row['median_ms']:.1f} ms per run")
        finally:
            gc.collect()
            if cuda_ok:
                torch.cuda.empty_cache()
        write_outputs(result, out)

    if "eager" in backends:
        record("eager", "full", functools.partial(eager_session, model, device, getattr(torch, dtype)))
    for spec in specs:
        for backend in (b for b in backends if b != "eager"):
            record(backend, spec, functools.partial(runner_session, backend, model, plans[spec][0], device, dtype))
    write_outputs(result, out)
    print(format_table(result))
    log(f"wrote {out}.json and {out}.md")
    return {k: v for k, v in result.items() if not k.startswith("_")}
