"""The Python API; the CLI (`tcgraph transform | sample | inspect`) is a thin layer over it."""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tcgraph.errors import TcgraphError, UsageError
from tcgraph.models.dit import DiT, DiTConfig
from tcgraph.plan import Plan, make_plan, plan_flops
from tcgraph.progress import Progress, bars
from tcgraph.runtime import BACKENDS, make_runner
from tcgraph.sampling import SamplerSettings, make_noise, run_batches, sampler_for

DEFAULT_MODEL = "digits"


def default_out(model: str, plan: str) -> Path:
    return Path("tcgraph-out") / f"{Path(model).stem}-{plan.replace(':', '').replace('+', '-')}"


def load_dit(model: str | DiT = DEFAULT_MODEL, config: str | DiTConfig | None = None) -> DiT:
    if isinstance(model, DiT):
        return model.eval()
    from tcgraph.models import load_model

    return load_model(model, config=config)


def transform(
    model: str | DiT = DEFAULT_MODEL,
    plan: str | Plan = "full",
    out: str | Path | None = None,
    *,
    config: str | DiTConfig | None = None,
    steps: int = 50,
    guidance: float = 2.0,
    eta: float = 0.0,
    batch: int = 8,
    force: bool = False,
    check: bool = True,
    progress: bool | Progress = True,
    plan_options: dict | None = None,
    backend: str = "ort",
    engine_options: dict | None = None,
) -> Path:
    """Plan, rewrite, check and export a model into an artifact folder; returns its path.

    `plan_options` go to the planner (e.g. l2c: `target_speedup`, `lam`, `threshold`,
    `max_variants`, `router`); learned planners calibrate on the model first.
    `check=False` skips both numerical checks: rewritten graphs against the eager
    reference, and ONNX files against their graphs. `backend="trt"` also builds one TensorRT engine per variant into the folder
    (`engine_options`: `precision` fp16|bf16|fp32, `strip_weights`); TensorRT and a GPU
    are checked before any planning starts.
    """
    from tcgraph.compile import build_variants
    from tcgraph.export.artifact import write_artifact

    model_name = model if isinstance(model, str) else "in-memory"
    options = {k: v for k, v in (plan_options or {}).items() if v is not None}
    if isinstance(plan, Plan) and options:
        raise UsageError(f"plan options {sorted(options)} need a plan spec, not a ready Plan")
    label = plan.planner if isinstance(plan, Plan) else plan
    if "target_speedup" in options:
        label += f"-{options['target_speedup']}x"
    out = Path(out) if out is not None else default_out(model_name, label)
    if out.exists() and not force:  # checked before planning, which may take minutes
        raise TcgraphError(f"{out} already exists; pass --force to replace it (it is replaced only once the new one is complete)")
    engines = _engine_builder(backend, engine_options or {})
    dit = load_dit(model, config)
    prog = bars(progress)
    if isinstance(plan, Plan):
        the_plan = plan
    else:
        settings = SamplerSettings(num_steps=steps, cfg_scale=guidance, eta=eta, batch=batch,
                                   resolution=dit.config.input_size)
        the_plan = make_plan(plan, dit.config, settings, weights=dit, progress=prog, **options)
    variants = build_variants(dit, the_plan, check=check, progress=prog)
    path = write_artifact(
        out,
        model_config=dit.config,
        plan=the_plan,
        variants=variants,
        extra={"model": model_name, "flops": plan_flops(dit.config, the_plan)},
        overwrite=force,
        progress=prog,
        verify=check,
        state=dit.state_dict(),
        engines=None if engines is None else functools.partial(engines, progress=prog),
    )
    return path


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


def parse_classes(spec: str | Sequence[int] | None, num_classes: int) -> list[int]:
    """`None` -> all classes; "0-9" or "1,3,5" or a list -> class ids, each checked."""
    if spec is None:
        ids = list(range(num_classes))
    elif isinstance(spec, str):
        ids = []
        for part in spec.split(","):
            part = part.strip()
            try:
                if "-" in part[1:]:
                    lo, hi = part.split("-", 1)
                    ids.extend(range(int(lo), int(hi) + 1))
                else:
                    ids.append(int(part))
            except ValueError:
                raise UsageError(f"cannot read class list {spec!r}; write e.g. '0-9' or '1,3,5'") from None
    else:
        ids = [int(i) for i in spec]
    if not ids:
        raise UsageError(f"no class ids in {spec!r}; this model has classes 0..{num_classes - 1}")
    from tcgraph.models import check_class_ids

    return check_class_ids(ids, num_classes).tolist()


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
) -> tuple[torch.Tensor, list[int]]:
    """Run the optimized sampler from an artifact folder; returns (samples, labels).

    `device` ("cpu", "cuda") goes to the runner; left out, each backend picks its own
    (ort: CUDA where onnxruntime-gpu has it, else CPU; torch: CPU; trt: CUDA). The
    sampler's own arithmetic runs where the runner keeps its outputs.
    """
    from tcgraph.export.artifact import load_artifact
    from tcgraph.runtime.dispatch import ScheduleDispatcher

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
    if per_class < 1:
        raise UsageError(f"--per-class must be >= 1, got {per_class}")
    ids = parse_classes(classes, cfg.num_classes)
    labels = [c for c in ids for _ in range(per_class)]
    noise = make_noise(len(labels), cfg.in_channels, s.resolution, seed)
    options = dict(runner_options or {})
    if device is not None:
        options["device"] = device
    runner = make_runner(backend, art, **options)
    with runner:
        dispatch = ScheduleDispatcher.for_runner(runner, plan.schedule())
        samples = run_batches(dispatch, dispatch.reset, sampler_for(s, cfg), labels, noise, s.batch, seed,
                              bars(progress), device=runner.device)
    if png is not None:
        save_grid(samples, png, nrow=per_class)
    if npy is not None:
        _atomic_save_npy(Path(npy), samples.numpy())
    return samples, labels


def sample_eager(model: DiT, settings: SamplerSettings, labels: list[int], seed: int = 0,
                 progress: bool | Progress = False) -> torch.Tensor:
    """The uncached PyTorch reference: the same noise, batching and sampler as `sample`."""
    from tcgraph.sampling import model_step_fn

    noise = make_noise(len(labels), model.config.in_channels, settings.resolution, seed)
    return run_batches(model_step_fn(model), lambda: None, sampler_for(settings, model.config), labels, noise,
                       settings.batch, seed, bars(progress))


def to_images(samples: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, 3 or 1) uint8; latents show their first channels."""
    x = samples.detach().float().clamp(-1, 1)
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1]
    return ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_grid(samples: torch.Tensor, path: str | Path, nrow: int, scale: int = 4, pad: int = 2) -> Path:
    """A PNG grid with `nrow` images per row (one row per class when sampled per class)."""
    from PIL import Image

    imgs = to_images(samples)
    n, h, w, c = imgs.shape
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(imgs):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = img
    pil = Image.fromarray(grid[..., 0] if c == 1 else grid)
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pil.save(tmp, format="PNG")
    tmp.replace(path)
    return path


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    tmp.replace(path)


def inspect(artifact: str | Path, *, variant: str | None = None, step: int | str | None = None,
            verify: bool = True) -> dict:
    """What an artifact folder holds: settings, schedule, variants and their cost; with `variant`
    or `step`, that variant's block view, node table and diff against the full graph."""
    from tcgraph.inspection import inspect_artifact

    return inspect_artifact(artifact, variant=variant, step=step, verify=verify)


def format_inspect(info: dict) -> str:
    """The terminal report of `inspect`'s result (short by default, detailed for a focus)."""
    from tcgraph.inspection import format_report

    return format_report(info)


def inspect_pictures(artifact: str | Path, out_dir: str | Path, *, variant: str | None = None) -> list[Path]:
    """Schedule heatmap, token masks (token plans) and a block-level DOT drawing into `out_dir`."""
    from tcgraph.inspection import write_pictures

    return write_pictures(artifact, out_dir, variant=variant)
