"""The Python API; the CLI (`tcgraph transform | sample | inspect`) is a thin layer over it."""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Sequence

import torch

from tcgraph.errors import UsageError
from tcgraph.images import checked_outputs, save_grid, save_npy, to_images  # noqa: F401  (to_images: public API)
from tcgraph.models import is_model
from tcgraph.models.official.dit import DiT, DiTConfig
from tcgraph.plan import Plan, make_plan, plan_flops
from tcgraph.progress import Progress, bars
from tcgraph.runtime import BACKENDS, make_runner
from tcgraph.sampling import SamplerSettings, checks, conditioning, make_noise, run_batches, sampler_for
from tcgraph.sampling.schedulers import scheduler_for_transform
from tcgraph.sampling.checks import MAX_SEED, parse_classes  # noqa: F401  (public API)
from tcgraph.sampling.settings import MAX_TEXT_LENGTH

DEFAULT_MODEL = "digits"


def default_out(model: str, plan: str) -> Path:
    return Path("tcgraph-out") / f"{Path(model).stem}-{plan.replace(':', '').replace('+', '-')}"


def load_dit(model: str | DiT = DEFAULT_MODEL, config: str | DiTConfig | None = None,
             resolution: int | None = None) -> DiT:
    """A model tcgraph can transform: `model` itself if it is one (a DiT or a wrapped diffusers DiT),
    else what `tcgraph.models.load_model` loads from its name, checkpoint or diffusers folder."""
    if is_model(model):
        if resolution not in (None, model.config.input_size):
            raise UsageError(f"the model passed is built for resolution {model.config.input_size}, not {resolution}")
        return model.eval()
    from tcgraph.models import load_model

    return load_model(model, config=config, resolution=resolution)


def transform(
    model: str | DiT = DEFAULT_MODEL,
    plan: str | Plan = "full",
    out: str | Path | None = None,
    *,
    config: str | DiTConfig | None = None,
    steps: int = 50,
    guidance: float | None = None,
    eta: float = 0.0,
    batch: int = 8,
    clip_x0: bool | None = None,
    scheduler: str | os.PathLike | dict | None = "auto",
    text_length: int | None = None,
    calibration_text=None,
    resolution: int | None = None,
    force: bool = False,
    check: bool = True,
    progress: bool | Progress = True,
    plan_options: dict | None = None,
    backend: str = "ort",
    engine_options: dict | None = None,
) -> Path:
    """Plan, rewrite, check and export a model into an artifact folder; returns its path.

    `guidance`: the guidance scale, 1 = none; None: 2, or 1 for a model without guidance (FLUX.1-schnell).
    `clip_x0`: whether DDIM clips x0 to [-1, 1] (None: the model's default, on for pixel-space
    models such as the demo; see `SamplerSettings`).
    `scheduler`: "auto" (default: the pipeline's own scheduler when `model` is a diffusers
    pipeline folder with a `scheduler/`, else tcgraph's DDIM), "ddim" (tcgraph's DDIM), a
    diffusers scheduler folder or `scheduler_config.json`, or that file's contents as a dict.
    `text_length`: the text tokens a text-conditioned model's graphs read (prompts are padded to
    it); None takes `calibration_text`'s. `calibration_text`: prompt embeddings (a
    `tcgraph.sampling.conditioning.Text`, or an embeddings file, see `load_text`) that learned
    planners calibrate a text-conditioned model on.
    `resolution`: the latent side (as `inspect` shows it) of a FLUX or SD3 folder (None: its own or 128).
    `plan_options` go to the planner (e.g. l2c: `target_speedup`, `lam`, `threshold`,
    `max_variants`, `router`); learned planners calibrate on the model first.
    `check=False` skips both numerical checks: rewritten graphs against the eager
    reference, and ONNX files against their graphs. `backend="trt"` also builds one TensorRT engine per variant into the folder
    (`engine_options`: `precision` fp16|bf16|fp32, `strip_weights`); TensorRT and a GPU
    are checked before any planning starts.
    """
    from tcgraph.compile import build_variants
    from tcgraph.export.artifact import write_artifact

    # Every argument is checked before anything slow (loading, planning, export), and the
    # sampler settings exactly as `sample` will check them: no artifact is written that
    # cannot be run. The resolution is the model's, filled in once it is loaded.
    settings = _transform_arguments(model, plan, out, config, steps, guidance, eta, batch, check, plan_options,
                                    backend, engine_options, clip_x0, scheduler)
    calibration_text = conditioning.text_argument(calibration_text, "calibration_text", "--calibration-embeddings")
    if text_length is None and calibration_text is not None:
        text_length = calibration_text.length
    if text_length is not None:  # given: 1..MAX (0 would silently mean "the model's default")
        text_length = checks.integer(text_length, "text length", "--text-length", lo=1, hi=MAX_TEXT_LENGTH)
        settings = dataclasses.replace(settings, text_length=text_length)
    model_name = model if isinstance(model, str) else "in-memory"
    options = {k: v for k, v in (plan_options or {}).items() if v is not None}
    if isinstance(plan, Plan) and options:
        raise UsageError(f"plan options {sorted(options)} need a plan spec, not a ready Plan")
    if not isinstance(plan, Plan):
        _check_plan_spec(plan, options)
    label = plan.planner if isinstance(plan, Plan) else plan
    if "target_speedup" in options:
        label += f"-{options['target_speedup']}x"
    out = Path(out) if out is not None else default_out(model_name, label)
    from tcgraph.export.folder import check_output_folder

    check_output_folder(out, force)  # before planning, which may take minutes; --force replaces artifacts only
    engines = _engine_builder(backend, engine_options or {})
    resolution = None if resolution is None else checks.integer(resolution, "resolution", "--resolution", lo=1,
                                                                 hi=MAX_RESOLUTION)
    dit = load_dit(model, config, resolution)
    if is_model(model):  # a checkpoint's weights are checked as it loads
        from tcgraph.models.official.checkpoint import check_finite

        check_finite(dit.state_dict(), "the model passed to transform")
    prog = bars(progress)
    if isinstance(plan, Plan):
        the_plan = plan
        conditioning.check_conditioning(the_plan.settings, dit.config, None)
    else:
        takes = dit.config.family.guidance_of(dit.config)
        scale = (1.0 if takes == "none" else DEFAULT_GUIDANCE) if guidance is None else settings.cfg_scale
        settings = dataclasses.replace(settings, resolution=dit.config.input_size, guidance=takes, cfg_scale=scale,
                                       pooled=bool(getattr(dit.config, "pooled_channels", 0)))
        if dit.config.text_conditioned and not settings.text_length:
            settings, calibration_text = conditioning.encoder_defaults(model, settings, calibration_text)
        conditioning.check_conditioning(settings, dit.config, calibration_text)
        sampler_for(settings, dit.config)  # a diffusers scheduler's config is checked by diffusers, before planning
        _check_graph_memory(settings, dit.config)
        if calibration_text is not None:
            options["calibration_text"] = calibration_text
        the_plan = make_plan(plan, dit.config, settings, weights=dit, progress=prog, **options)
    variants = build_variants(dit, the_plan, check=check, progress=prog)
    from tcgraph.plan.costs import plan_costs, predict_flops

    costs = plan_costs(dit, the_plan)  # measured, not named: inspect predicts from it without the model
    path = write_artifact(
        out,
        model_config=dit.config,
        plan=the_plan,
        variants=variants,
        extra={"model": model_name, "flops": predict_flops(costs, the_plan), "costs": costs.to_dict(),
               **({"source": str(Path(model).resolve())} if isinstance(model, str) and Path(model).is_dir() else {})},
        overwrite=force, progress=prog, verify=check, state=dit.state_dict(),
        engines=None if engines is None else functools.partial(engines, progress=prog),
    )
    return path


# One tensor of a variant graph ([model batch, tokens, hidden] float32: a block's hidden
# state, each cache) past this size means a batch no device runs; refused before planning.
MAX_GRAPH_TENSOR_BYTES = 16 * 2**30
DEFAULT_GUIDANCE = 2.0
MAX_RESOLUTION = 1024  # latent side: 8192 pixels with a VAE of factor 8  # transform's guidance scale for a model that takes guidance


def _transform_arguments(model, plan, out, config, steps, guidance, eta, batch, check, plan_options, backend,
                         engine_options, clip_x0=None, scheduler="auto") -> SamplerSettings:
    """The types of `transform`'s arguments, and its sampler settings (resolution still the default)."""
    if not isinstance(model, (str, os.PathLike)) and not is_model(model):
        raise UsageError(f"model must be a model name ('digits'), a checkpoint path, a diffusers folder or a DiT, got "
                         f"{type(model).__name__}")
    if not isinstance(plan, (str, Plan)):
        raise UsageError(f"plan (--plan) must be a plan spec such as 'fora:3' or a Plan, got {type(plan).__name__}")
    checks.path(out, "out", "--out", optional=True)
    if config is not None and not isinstance(config, (str, DiTConfig)):
        raise UsageError(f"config (--config) must be a registered config name or a DiTConfig, got "
                         f"{type(config).__name__}")
    checks.flag(check, "check")
    checks.text(backend, "backend", "--backend")
    for name, value in (("plan_options", plan_options), ("engine_options", engine_options)):
        if value is not None and not isinstance(value, dict):
            raise UsageError(f"{name} must be a dict of option names to values or None, got {type(value).__name__}")
    guidance = DEFAULT_GUIDANCE if guidance is None else guidance  # the model's own default comes once it is loaded
    config = scheduler_for_transform(scheduler, model)
    if config is None:
        return SamplerSettings(num_steps=steps, cfg_scale=guidance, eta=eta, batch=batch, clip_x0=clip_x0)
    return SamplerSettings(sampler="diffusers", scheduler=config, num_steps=steps, cfg_scale=guidance, eta=eta,
                           batch=batch, clip_x0=clip_x0)








def _check_plan_spec(spec: str, options: dict) -> None:
    """The plan spec and options as the planner registry reads them (cheap), before the model loads."""
    from tcgraph.plan.registry import PLAN_HELP, PLANNERS

    name, *args = spec.split(":")
    if name not in PLANNERS:
        raise UsageError(f"unknown plan {spec!r}; available: {PLAN_HELP}")
    PLANNERS[name].configure(spec, args, options)


def _check_graph_memory(settings: SamplerSettings, cfg: DiTConfig) -> None:
    need = settings.model_batch * cfg.num_tokens * cfg.hidden_size * checks.FLOAT32_BYTES
    if need > MAX_GRAPH_TENSOR_BYTES:
        halves = " (x2 for the guidance halves)" if settings.model_batch > settings.batch else ""
        raise UsageError(
            f"batch (--batch) {settings.batch}{halves} is too large for this model: one [batch, tokens, hidden] "
            f"tensor of its graphs ({settings.model_batch} x {cfg.num_tokens} x {cfg.hidden_size} float32) needs "
            f"{need / 2**30:.3g} GiB, more than the {MAX_GRAPH_TENSOR_BYTES // 2**30} GiB tcgraph allows; "
            "use a smaller --batch (images are sampled in runs of it)"
        )


def _engine_builder(backend: str, options: dict):
    """None for the backends that run what every artifact holds (ort: the ONNX files; torch: the
    torch programs); for "trt" a function building the engines (TensorRT and a GPU checked now)."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}; available backends: {', '.join(BACKENDS)}")
    if backend != "trt":
        if options:
            raise UsageError(f"engine options {sorted(options)} belong to TensorRT engines: add --backend trt")
        return None
    from tcgraph.runtime.trt.build import build_engines
    from tcgraph.runtime.trt.common import cuda_device_info, import_tensorrt

    import_tensorrt()  # TensorRT and a GPU checked now, before minutes of planning and export
    cuda_device_info()
    return functools.partial(build_engines, **options)


def sample(
    artifact: str | Path,
    *,
    classes: str | Sequence[int] | None = None,
    per_class: int = 4,
    seed: int = 0,
    backend: str = "ort",
    device: str | None = None,
    batch: int | None = None,
    resolution: int | None = None,
    png: str | Path | None = None,
    npy: str | Path | None = None,
    progress: bool | Progress = True,
    runner_options: dict | None = None,
    text=None,
    prompts: Sequence[str] | None = None,
    negative_prompt: str = "",
    text_encoder: str | Path | None = None,
    measured: dict | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Run the optimized sampler from an artifact folder; returns (samples, labels).

    A plan of gated steps (`adaptive`) decides on the device which steps compute; the count is read
    once per sampling run, and `measured` (a dict, where given) receives `computed_steps`, `steps` and
    `fraction` (the share of block work: a skipped step still computes its first blocks), also announced
    on `progress`.

    A text-conditioned model samples `per_class` images for each prompt of `text` (a
    `tcgraph.sampling.conditioning.Text` or an embeddings file, `--embeddings`; with guidance it
    needs the negative prompt's embeddings too); its labels are the prompt indices. `prompts`
    (with `negative_prompt`) are encoded by the model's own text encoder: the digits-text demo's,
    or that of the diffusers pipeline folder `text_encoder` (no path is read from the artifact).

    `device` ("cpu", "cuda") goes to the runner; left out, each backend picks its own
    (ort: CUDA where onnxruntime-gpu has it, else CPU; torch: CPU; trt: CUDA). The
    sampler's own arithmetic runs where the runner keeps its outputs.
    """
    from tcgraph.export.artifact import load_artifact
    from tcgraph.runtime.dispatch import ScheduleDispatcher

    checks.path(artifact, "artifact")
    per_class = checks.integer(per_class, "per_class", "--per-class", lo=1)
    seed = checks.seed(seed)
    checks.text(backend, "backend", "--backend")
    checks.text(device, "device", "--device", optional=True)
    batch = None if batch is None else checks.integer(batch, "batch", "--batch", lo=1)
    resolution = None if resolution is None else checks.integer(resolution, "resolution", "--resolution", lo=1)
    if runner_options is not None and not isinstance(runner_options, dict):
        raise UsageError(f"runner_options must be a dict of option names to values or None, got "
                         f"{type(runner_options).__name__}")
    png, npy = checked_outputs(png, npy)  # before sampling, which may take minutes
    art = load_artifact(Path(artifact))
    plan = art.plan
    cfg = art.model_config
    s = plan.settings
    if batch is not None and batch != s.batch:
        raise UsageError(f"this artifact was built for batch {s.batch}, not {batch}; "
                           f"omit --batch (images are sampled in runs of {s.batch}) or transform again with --batch {batch}")
    if resolution is not None and resolution != s.resolution:
        raise UsageError(f"this artifact was built for resolution {s.resolution}, not {resolution}; "
                           "transform again for another resolution")
    text = conditioning.text_argument(text, "text", "--embeddings")
    if prompts is not None:
        if text is not None:
            raise UsageError("give prompts or text embeddings, not both")
        text = conditioning.encode_prompts(art, prompts, negative_prompt, text_encoder)
    elif text_encoder is not None:
        raise UsageError("text_encoder (--text-encoder) embeds prompts: give prompts (--prompt) too")
    if cfg.text_conditioned:
        if text is None or classes is not None:
            raise UsageError("this artifact's model is text-conditioned: give prompt embeddings (text=, --embeddings "
                             "FILE, or --prompt with a pipeline's text encoder) instead of class ids")
        text.check(s.text_length, cfg.caption_channels, getattr(cfg, "pooled_channels", 0))
        ids, what = list(range(len(text))), "prompts"
    else:
        if text is not None:
            raise UsageError("this artifact's model is conditioned on class ids, not text: give classes (--classes) "
                             "and drop the text embeddings")
        ids, what = checks.parse_classes(classes, cfg.num_classes), "classes"
    checks.sample_memory(len(ids) * per_class, cfg.in_channels, s.resolution, name="per_class", option="--per-class",
                         detail=f"{len(ids)} {what} x {per_class} per class")
    labels = [c for c in ids for _ in range(per_class)]
    cond = labels if text is None else text.take(labels)
    noise = make_noise(len(labels), cfg.in_channels, s.resolution, seed)
    options = dict(runner_options or {})
    if device is not None:
        options["device"] = device
    runner = make_runner(backend, art, **options)
    with runner:
        dispatch = ScheduleDispatcher.for_plan(runner, plan)
        prog = bars(progress)
        samples = run_batches(dispatch, dispatch.reset, sampler_for(s, cfg), cond, noise, s.batch, seed,
                              prog, device=runner.device)
        dispatch.reset()  # adds the last run's computed steps
    if plan.gate is not None and dispatch.measured_fraction() is not None:
        (computed, steps), fraction = dispatch.measured[:2], dispatch.measured_work()
        report = {"computed_steps": computed, "steps": steps, "fraction": fraction}
        if measured is not None:
            measured.update(report)
        prog.announce(f"measured: {computed} of {steps} steps computed their later blocks (compute fraction "
                      f"{fraction:.3f}; the others their first {plan.gate.first})")
    if png is not None:
        save_grid(samples, png, nrow=per_class)
    if npy is not None:
        save_npy(npy, samples.numpy())
    return samples, labels




def sample_eager(model: DiT, settings: SamplerSettings, labels, seed: int = 0,
                 progress: bool | Progress = False) -> torch.Tensor:
    """The uncached PyTorch reference: the same noise, batching and sampler as `sample`; `labels`
    are class ids, or a `Text` of one prompt per image for a text-conditioned model."""
    from tcgraph.sampling.conditioning import Text

    from tcgraph.models import check_class_ids
    from tcgraph.sampling import model_step_fn

    if not is_model(model):
        raise UsageError(f"model must be a tcgraph DiT (tcgraph.load_dit), got {type(model).__name__}")
    if not isinstance(settings, SamplerSettings):
        raise UsageError(f"settings must be a tcgraph SamplerSettings, got {type(settings).__name__}")
    if settings.resolution != model.config.input_size:
        raise UsageError(f"settings.resolution {settings.resolution} does not match the model's input size "
                         f"{model.config.input_size}; make the settings with resolution={model.config.input_size}")
    if isinstance(labels, Text):
        conditioning.check_conditioning(settings, model.config, labels)
    elif isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise UsageError(f"labels must be a list of class ids, got {type(labels).__name__}")
    else:
        labels = check_class_ids(checks.class_ids(labels, "labels", None), model.config.num_classes).tolist()
    if not len(labels):
        raise UsageError("labels is empty; give at least one class id")
    seed = checks.seed(seed)
    checks.sample_memory(len(labels), model.config.in_channels, settings.resolution, name="labels", option=None,
                         detail=f"{len(labels)} labels")
    noise = make_noise(len(labels), model.config.in_channels, settings.resolution, seed)
    return run_batches(model_step_fn(model), lambda: None, sampler_for(settings, model.config), labels, noise,
                       settings.batch, seed, bars(progress))


def inspect(artifact: str | Path, *, variant: str | None = None, step: int | str | None = None,
            verify: bool = True) -> dict:
    """What an artifact folder holds: settings, schedule, variants and their cost; with `variant`
    or `step`, that variant's block view, node table and diff against the full graph."""
    from tcgraph.inspection import inspect_artifact

    checks.path(artifact, "artifact")
    return inspect_artifact(artifact, variant=variant, step=step, verify=verify)


def format_inspect(info: dict) -> str:
    """The terminal report of `inspect`'s result (short by default, detailed for a focus)."""
    from tcgraph.inspection import format_report

    return format_report(info)


def inspect_pictures(artifact: str | Path, out_dir: str | Path, *, variant: str | None = None) -> list[Path]:
    """Schedule heatmap, token masks (token plans) and a block-level DOT drawing into `out_dir`."""
    from tcgraph.inspection import write_pictures

    checks.path(artifact, "artifact")
    checks.path(out_dir, "out_dir", "--out")
    return write_pictures(artifact, out_dir, variant=variant)
