"""GPU benchmark: eager PyTorch vs every tcgraph backend, `full` and cached plans, one process.

    # H100/H200: DiT-XL/2 at 256x256 (latent 32x32), random weights (speed only), batch 8
    # with guidance 4 (16 rows), DDIM 50, bf16; writes benchmarks/results/gpu-<device>.{json,md}
    python benchmarks/bench_gpu.py
    python benchmarks/bench_gpu.py --backends eager,torch,torch-nograph,torch-compile,ort,trt --repeats 10

    # the same in shorter commands: artifact folders (and engines) first, resumable; then
    # backends in groups, each run merging its rows into the same JSON/markdown
    # (`full` runs in every group: realized speedups never mix runs; `vs eager` may)
    python benchmarks/bench_gpu.py --prepare-only
    python benchmarks/bench_gpu.py --backends eager,torch,torch-nograph
    python benchmarks/bench_gpu.py --backends ort,trt --merge
    # --prepare-only makes only the plans named: one process per plan, in parallel, as
    # benchmarks/gpu_check.sh (the 8-minute GPU check) does: --prepare-only --backends torch --plans fora:2

    # FLUX.1-dev at full size (1024x1024, 28 steps, bf16, random weights): eager vs the torch backend,
    # variants built in memory, no artifact folder (benchmarks/gpu/flux.py says why and how)
    python benchmarks/bench_gpu.py --family flux

    # CPU smoke run (what tests/test_bench_gpu.py runs): the demo model, every CUDA part skipped
    OMP_NUM_THREADS=1 python benchmarks/bench_gpu.py --model digits --device cpu --steps 4 --batch 2 \\
        --repeats 1 --plans full,fora:2 --backends eager,torch,ort,trt --out /tmp/gpu-smoke

**What runs.** `eager` is what users run today: the DiT with fp32 weights under
`torch.autocast(dtype=--dtype)` (plain fp32 when --dtype float32, the CPU default), the
same DDIM sampler, noise and labels as every backend, `full` only. The backends run the
artifact folders of every plan: `torch` (the variants' torch programs in the precision of
--dtype, one CUDA graph per variant), `torch-nograph` (the same without CUDA graphs), `torch-compile` (plus
`torch.compile`; not in the default list), `ort` (ONNX Runtime; fp32 ONNX graphs, CUDA
needs onnxruntime-gpu) and `trt` (TensorRT engines, built by `transform(..., backend="trt")`
in the precision of --dtype unless --trt-precision says otherwise). A part that cannot run
here (no CUDA, no TensorRT, no CUDA provider in onnxruntime, an engine that does not fit
this GPU) is recorded as `skipped: <reason>` and the rest goes on; an unexpected error is
recorded as `failed` (and the script exits with status 1).

Plans: `full` and `fora:N` come from `make_plan`; learned-planner names (`l2c:X`,
`tokencache:X`, `dynamic:X`, `tokencache+l2c:X`) are the planners' *structural* plans
(bench_tokencache.structural_plans: the learned planners' shapes without learning),
since learning on random weights would measure nothing; speed depends on the shape only.

**How it measures,** one (backend, plan) at a time so that only one set of weights is on
the GPU (runners are released and the CUDA cache emptied between them):
- whole-run time: one sampling run of `--batch` images as `tcgraph sample` runs it
  (`run_batches`: noise and labels to the device, the loop, the sample back), one
  warm-up run, then the median of `--repeats` runs, `torch.cuda.synchronize()` before the
  clock stops;
- per-step latency by variant: a separate run with CUDA events around each step call
  (perf_counter on the CPU), median per variant id; `outside_steps_ms` is the run's
  wall time minus the sum of its steps (sampler arithmetic, input/output copies, gaps);
- memory: `torch.cuda.max_memory_allocated` from before the runner is made until after
  the timed runs (activation included), and device-wide used memory (`mem_get_info`)
  while the runner is active, absolute and relative to before it (ORT and TensorRT
  allocate outside torch; the device-wide figure also counts other processes);
- host<->device copies: `torch.profiler` (CPU + CUDA activities) over one sampling loop
  alone (inputs already on the device) and over one whole run; the CUDA memcpy events
  are counted by kind (HtoD, DtoH, DtoD, ...). Expected: nothing between host and device
  inside the loop; the whole run adds the noise and labels (2 HtoD) and the sample (1 DtoH).
  Two more runs and the profiler's own processing per row: --profile-backends and
  --profile-plans keep them to some rows, --no-profile drops them;
- speedups: realized = the same backend's `full` median / the plan's median; predicted =
  the plan's FLOP ratio (`plan_flops`, equal to `plan.evaluate.speedup_of`); their ratio
  shows runtime overhead; `vs_eager` = eager `full` median / the row's median.
- PSNR of each plan's samples vs the same backend's `full` samples, and of each backend's
  `full` vs eager's: with random weights the first is no quality measure; the second is a
  numeric parity check of the backend (bf16/fp16 differences included).

Artifact folders go under `--work` and are reused when their plan and model config match
(`--rebuild` to remake them); DiT-XL/2 writes ~2.7 GB per folder, and transform runs with
`check=False` (no numerical checks of the rewrite or the export). The JSON and the
markdown table are rewritten after every row, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import functools
import gc
import platform
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu.measure import NO_CUDA, measure  # noqa: E402
from gpu.prepare import (  # noqa: E402
    BACKENDS,
    DEFAULT_BACKENDS,
    DEFAULT_MODEL,
    DEFAULT_PLANS,
    PIXART_TEXT_LENGTH,
    PIXELS_PER_LATENT,
    TRT_PRECISION,
    artifact_for,
    conditioning_for,
    build_dit,
    eager_session,
    log,
    make_plans,
    precision_of,
    runner_session,
    slug,
    unavailable,
)
from gpu.report import format_table, merge_earlier, versions, write_outputs  # noqa: E402
from gpu.flux import DEFAULTS as FLUX, run_flux  # noqa: E402

from tcgraph.errors import TcgraphError  # noqa: E402
from tcgraph.export.artifact import Artifact  # noqa: E402
from tcgraph.models.official.dit import DiT  # noqa: E402
from tcgraph.plan import plan_flops  # noqa: E402
from tcgraph.sampling import SamplerSettings, make_noise, sampler_for  # noqa: E402
from tcgraph.sampling.schedulers import CLASS_KEY  # noqa: E402


#################################################################################
#                                    Main                                       #
#################################################################################


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=("dit", "flux"), default="dit",
                    help="dit: DiT and PixArt through artifact folders (default); flux: FLUX.1-dev (or FLUX-tiny) "
                         "with its variants in memory, eager vs the torch backend (benchmarks/gpu/flux.py)")
    ap.add_argument("--model", default=None,
                    help=f"a config name (random weights, speed only; default {DEFAULT_MODEL}), 'digits', or "
                         "'PixArt-alpha' (PixArt-alpha 256px's transformer, random weights, text 120 x 4096; "
                         f"plans full, fora:N, taylor:N:K); --family flux: {FLUX['model']} (default) or FLUX-tiny")
    ap.add_argument("--resolution", type=int, default=None,
                    help="image side in pixels (latent = side/8; default: the config's, 256 for DiT-XL/2)")
    ap.add_argument("--depth", type=int, default=None, help="blocks (default: the model's; fewer for a quick look)")
    ap.add_argument("--batch", type=int, default=None,
                    help=f"images per sampling run (guidance doubles the rows; default 8, flux {FLUX['batch']})")
    ap.add_argument("--guidance", type=float, default=None, help=f"default 4, flux {FLUX['guidance']} (an input)")
    ap.add_argument("--steps", type=int, default=None, help=f"default 50, flux {FLUX['steps']}")
    ap.add_argument("--text-length", type=int, default=None, help=f"flux: T5 tokens (default {FLUX['text_length']})")
    ap.add_argument("--plans", default=None,
                    help="comma list; `full` is always included, first (--prepare-only makes only the plans named, "
                         "so that several processes can prepare different plans at once)")
    ap.add_argument("--backends", default=None,
                    help=f"comma list of {', '.join(BACKENDS)} (default {DEFAULT_BACKENDS}; flux: {FLUX['backends']})")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="eager autocast and torch backend precision (default bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--trt-precision", default=None, choices=sorted(set(TRT_PRECISION.values())),
                    help="TensorRT engine precision (default: that of --dtype)")
    ap.add_argument("--trt-strip-weights", action="store_true",
                    help="weight-stripped engines, refitted from weights.bin at activation (less disk)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None,
                    help="output path without suffix; writes .json and .md (default benchmarks/results/gpu-<device>)")
    ap.add_argument("--work", type=Path, default=Path("tcgraph-out/bench-gpu"), help="artifact folders (reused)")
    ap.add_argument("--rebuild", action="store_true", help="transform again even where a matching folder exists")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled runs that count memcpy events")
    ap.add_argument("--profile-backends", default=None,
                    help="comma list: only these backends' rows get the profiled runs (default: every row's)")
    ap.add_argument("--profile-plans", default=None,
                    help="comma list: only these plans' rows get the profiled runs (default: every row's; "
                         "each profiled row costs two more runs and the profiler's processing)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars from transform")
    ap.add_argument("--prepare-only", action="store_true",
                    help="make the plans and artifact folders (and engines), measure nothing")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of --out's JSON for backend x plan pairs this run does not measure "
                         "(same settings and device only): a long benchmark in several shorter commands")
    args = ap.parse_args(argv)
    defaults = FLUX if args.family == "flux" else dict(model=DEFAULT_MODEL, batch=8, guidance=4.0, steps=50,
                                                       plans=DEFAULT_PLANS, backends=DEFAULT_BACKENDS, text_length=0)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("batch", "steps", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    return args


def run_config(args: argparse.Namespace, argv: list[str] | None, model: DiT, settings: SamplerSettings,
               device: torch.device, device_name: str, dtype: str, backends: list[str], specs: list[str]) -> dict:
    cfg = model.config
    return {
        "model": args.model, "weights": "trained" if args.model == "digits" else f"random (seed {args.seed})",
        "parameters": sum(p.numel() for p in model.parameters()), "image_side": image_side(args.model, cfg),
        "input_size": cfg.input_size, "tokens": cfg.num_tokens, "batch": args.batch, "guidance": args.guidance,
        "model_batch": settings.model_batch, "steps": args.steps,
        "sampler": settings.scheduler[CLASS_KEY] if settings.scheduler else settings.sampler, "device": str(device),
        "device_name": device_name, "dtype": dtype, "repeats": args.repeats, "seed": args.seed,
        "backends": backends, "plans": specs, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "versions": versions(), "machine": platform.node() + " " + (platform.processor() or platform.machine()),
        "command": "python benchmarks/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }


def profiled(args: argparse.Namespace, backend: str, spec: str) -> bool:
    """Whether the (backend, plan) row gets the profiled runs that count memcpy events."""
    def named(csv: str | None, name: str) -> bool:
        return csv is None or name in [x.strip() for x in csv.split(",")]

    return not args.no_profile and named(args.profile_backends, backend) and named(args.profile_plans, spec)


def image_side(model_name: str, cfg) -> int:
    return cfg.input_size * (1 if model_name == "digits" else PIXELS_PER_LATENT)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.family == "flux":
        return run_flux(args, argv)
    device = torch.device(args.device)
    cuda_ok = device.type == "cuda" and torch.cuda.is_available()
    if cuda_ok and device.index is None:  # some torch versions' memory queries want an index
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise TcgraphError(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)}")
    specs = [p.strip() for p in args.plans.split(",") if p.strip()]
    if not args.prepare_only:  # realized speedups need the backend's own `full`, measured in this run
        specs = ["full"] + [p for p in specs if p != "full"]

    model = build_dit(args.model, args.resolution, args.seed, args.depth)
    cfg = model.config
    settings = SamplerSettings(num_steps=args.steps, cfg_scale=args.guidance, batch=args.batch,
                               resolution=cfg.input_size, text_length=PIXART_TEXT_LENGTH if cfg.text_conditioned else 0)
    device_name = torch.cuda.get_device_name(device) if cuda_ok else f"CPU ({platform.machine()})"
    out = args.out or (Path(__file__).parent / "results" / "-".join(
        ["gpu", slug(device_name if cuda_ok else "cpu")] + ([] if args.model == DEFAULT_MODEL else [slug(args.model)])))
    result: dict[str, Any] = {
        "config": run_config(args, argv, model, settings, device, device_name, dtype, backends, specs),
        "rows": [], "skipped": [], "failed": [],
        "quality_note": ("PSNR columns in the JSON: a plan vs the same backend's full samples (with random "
                         "weights not a quality measure), and each backend's full vs eager's (numeric parity)."),
        "_samples": {},  # (backend, plan) -> samples of the warm-up run, for the PSNR columns
    }
    log(f"{args.model} ({result['config']['parameters'] / 1e6:.0f} M parameters), {device_name}, {dtype}")
    if args.merge and not args.prepare_only:
        merge_earlier(result, out, backends, specs)

    reasons = {b: unavailable(b, device) for b in backends}
    for b, why in reasons.items():
        if why:
            result["skipped"].append({"backend": b, "plan": None, "reason": why})
            log(f"{b}: skipped: {why}")
    if not cuda_ok:
        result["skipped"].append({"backend": None, "plan": None,
                                  "reason": "GPU memory and host<->device copy counts of every row: " + NO_CUDA})
    runnable = [b for b in backends if not reasons[b]]
    plans = make_plans(model, settings, specs) if runnable else {}

    sampler = sampler_for(settings, cfg)
    labels = conditioning_for(model, args.batch, args.seed)
    noise = make_noise(args.batch, cfg.in_channels, settings.resolution, args.seed)

    def record(backend: str, spec: str, art: Artifact | None, session) -> None:
        log(f"{backend} × {spec}: measuring")
        plan, source = plans[spec]
        schedule = ["eager"] * args.steps if backend == "eager" else plan.schedule()
        try:
            row, samples = measure(session, schedule, sampler, labels, noise, args.seed, device, args.repeats,
                                   profiled(args, backend, spec))
        except TcgraphError as e:
            result["skipped"].append({"backend": backend, "plan": spec, "reason": str(e)})
            log(f"{backend} × {spec}: skipped: {e}")
        except Exception as e:  # a bug or an OOM in one backend must not lose the others' numbers
            traceback.print_exc()
            result["failed"].append({"backend": backend, "plan": spec, "error": f"{type(e).__name__}: {e}"})
        else:
            flops = plan_flops(cfg, plan)
            result["_samples"][(backend, spec)] = samples
            result["rows"].append({
                "backend": backend, "plan": spec, "plan_source": source, "precision": precision_of(backend, art, dtype),
                "variants": len(plan.variants()), "predicted_speedup": flops["predicted_speedup"],
                "flop_fraction": flops["fraction"], "artifact": str(art.root) if art is not None else None, **row})
            result["rows"].sort(key=lambda r: (BACKENDS.index(r["backend"]),
                                               specs.index(r["plan"]) if r["plan"] in specs else len(specs)))
            log(f"{backend} × {spec}: {row['median_ms']:.1f} ms per run")
        finally:
            gc.collect()
            if cuda_ok:
                torch.cuda.empty_cache()
        write_outputs(result, out)

    if "eager" in runnable and not args.prepare_only:
        record("eager", "full", None, functools.partial(eager_session, model, device, getattr(torch, dtype)))
    artifact_backends = [b for b in runnable if b != "eager"]
    folder = args.work / slug(f"{args.model}-{image_side(args.model, cfg)}px-b{args.batch}-g{args.guidance}"
                              f"-s{args.steps}-seed{args.seed}")
    engines = None
    if "trt" in artifact_backends:
        engines = {"precision": args.trt_precision or TRT_PRECISION[dtype], "strip_weights": args.trt_strip_weights}
    for spec, (plan, _) in plans.items() if artifact_backends else ():
        art, trt_problem = artifact_for(model, plan, folder / slug(spec), engines=engines,
                                        rebuild=args.rebuild, progress=not args.quiet)
        if trt_problem:
            kind, why = trt_problem
            result[kind].append({"backend": "trt", "plan": spec, ("reason" if kind == "skipped" else "error"): why})
        for backend in [] if args.prepare_only else artifact_backends:
            if backend == "trt" and trt_problem:
                continue
            record(backend, spec, art, functools.partial(runner_session, backend, art, plan, device, dtype))
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    if args.prepare_only:
        log(f"--prepare-only: artifact folders are under {folder}; nothing measured, nothing written")
        return public
    write_outputs(result, out)
    print(format_table(result))
    log(f"wrote {out}.json and {out}.md")
    return public


if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)
