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

    # CPU smoke run (what tests/test_bench_gpu.py runs): the demo model, every CUDA part skipped
    OMP_NUM_THREADS=1 python benchmarks/bench_gpu.py --model digits --device cpu --steps 4 --batch 2 \\
        --repeats 1 --plans full,fora:2 --backends eager,torch,ort,trt --out /tmp/gpu-smoke

**What runs.** `eager` is what users run today: the DiT with fp32 weights under
`torch.autocast(dtype=--dtype)` (plain fp32 when --dtype float32, the CPU default), the
same DDIM sampler, noise and labels as every backend, `full` only. The backends run the
artifact folders of every plan: `torch` (variant GraphModules in --dtype, one CUDA graph
per variant), `torch-nograph` (the same without CUDA graphs), `torch-compile` (plus
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
  inside the loop; the whole run adds the noise and labels (2 HtoD) and the sample (1 DtoH);
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
import contextlib
import functools
import gc
import inspect
import json
import platform
import re
import statistics
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_plans import time_runs  # noqa: E402

from tcgraph import api  # noqa: E402
from tcgraph.errors import TcgraphError  # noqa: E402
from tcgraph.export.artifact import Artifact, load_artifact  # noqa: E402
from tcgraph.models.dit import CONFIGS, DiT, build_model, randomize_weights  # noqa: E402
from tcgraph.plan import Plan, make_plan, plan_flops  # noqa: E402
from tcgraph.sampling import SamplerSettings, make_noise, run_batches, sampler_for
from tcgraph.runtime.dispatch import ScheduleDispatcher  # noqa: E402

DEFAULT_MODEL = "DiT-XL/2"
DEFAULT_PLANS = "full,fora:2,fora:3,l2c:2,tokencache:2"
DEFAULT_BACKENDS = "eager,torch,torch-nograph,ort,trt"
BACKENDS = ("eager", "torch", "torch-nograph", "torch-compile", "ort", "trt")
STRUCTURAL = ("tokencache", "dynamic", "l2c", "tokencache+l2c")  # learned planners: their shapes, untrained
PIXELS_PER_LATENT = 8  # the SD VAE of the DiT checkpoints: 256x256 images <-> 32x32 latents
MEMCPY = re.compile(r"Memcpy (\w+)\b")  # Kineto names: "Memcpy HtoD (Pageable -> Device)", ...
NO_CUDA = "not measured (no CUDA)"
MIB = 1 << 20
TRT_PRECISION = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}  # --dtype -> engine precision
_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench_gpu {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


#################################################################################
#                         Model, plans, artifact folders                        #
#################################################################################


def build_dit(name: str, resolution: int | None, seed: int) -> DiT:
    """The demo model (trained), or a registered config with random weights (speed only)."""
    if name == "digits":
        model = api.load_dit("digits")
        if resolution not in (None, model.config.input_size):
            raise TcgraphError(f"the digits model samples {model.config.input_size}x{model.config.input_size} "
                               f"pixels only; omit --resolution")
        return model
    if name not in CONFIGS:
        raise TcgraphError(f"unknown model {name!r}; use 'digits' or one of {', '.join(CONFIGS)}")
    overrides = {}
    if resolution is not None:
        if resolution % PIXELS_PER_LATENT:
            raise TcgraphError(f"--resolution {resolution} is not a multiple of {PIXELS_PER_LATENT} "
                               "(image side; the latent is 1/8 of it)")
        overrides["input_size"] = resolution // PIXELS_PER_LATENT
    return randomize_weights(build_model(name, **overrides), seed=seed)


def make_plans(model: DiT, settings: SamplerSettings, specs: list[str]) -> dict[str, tuple[Plan, str]]:
    """spec -> (plan, how it was made); learned-planner specs give their structural plans."""
    plans: dict[str, tuple[Plan, str]] = {}
    structural: dict[float, dict[str, Plan]] = {}
    for spec in specs:
        kind, _, arg = spec.partition(":")
        if kind in STRUCTURAL:
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
            same = (art.plan == _json_form(plan.to_dict())
                    and art.model_config == _json_form(model.config.to_dict()))
            trt = art.manifest.get("tensorrt") or {}
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
            from tcgraph.export.tensorrt import import_tensorrt
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
    if backend == "torch":
        return "torch", {"device": str(device), "dtype": dtype}
    if backend == "torch-nograph":
        return "torch", {"device": str(device), "dtype": dtype, "cuda_graphs": False}
    if backend == "torch-compile":
        return "torch", {"device": str(device), "dtype": dtype, "compile": True}
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
    return str((art.manifest.get("tensorrt") or {}).get("precision", "?")) if art is not None else "?"


@contextlib.contextmanager
def eager_session(model: DiT, device: torch.device, dtype: torch.dtype) -> Iterator[tuple]:
    """(step_fn, reset, device) of the uncached model, moved to `device` for the session."""
    autocast = dtype != torch.float32

    @torch.inference_mode()
    def step(_step: int, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=autocast):
            return model(x, t, y).float()

    model.to(device)
    try:
        yield step, (lambda: None), device
    finally:
        model.to("cpu")  # transform exports from the CPU copy


@contextlib.contextmanager
def runner_session(backend: str, art: Artifact, plan: Plan, device: torch.device, dtype: str) -> Iterator[tuple]:
    name, options = runner_options(backend, device, dtype)
    with api.make_runner(name, art, **options) as runner:
        dispatch = ScheduleDispatcher.for_runner(runner, plan.schedule())
        yield dispatch, dispatch.reset, torch.device(runner.device)


#################################################################################
#                                 Measuring                                     #
#################################################################################


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_used_mib(device: torch.device) -> float:
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) / MIB


class StepClock:
    """A step function that times every call of the one it wraps (CUDA events on the GPU)."""

    def __init__(self, step_fn: Callable, schedule: list[str], device: torch.device):
        self.step_fn, self.schedule, self.cuda = step_fn, schedule, device.type == "cuda"
        self.marks: list[tuple[str, Any, Any]] = []

    def __call__(self, step: int, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.step_fn(step, x, t, y)
            end.record()
        else:
            start = time.perf_counter()
            out = self.step_fn(step, x, t, y)
            end = time.perf_counter()
        self.marks.append((self.schedule[step], start, end))
        return out

    def milliseconds(self) -> list[tuple[str, float]]:
        """(variant id, ms) per step; call after the device is synchronised."""
        if self.cuda:
            return [(vid, s.elapsed_time(e)) for vid, s, e in self.marks]
        return [(vid, (e - s) * 1e3) for vid, s, e in self.marks]


def count_copies(run: Callable[[], Any], device: torch.device) -> dict[str, int] | str:
    """CUDA memcpy events by kind (HtoD, DtoH, DtoD, ...) while `run()` executes."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            sync(device)
    except Exception as e:  # a profiler problem must not cost the row its timings
        traceback.print_exc()
        return f"not measured (the profiled run raised {type(e).__name__}: {e})"
    counts = Counter({"HtoD": 0, "DtoH": 0, "DtoD": 0})
    device_events = 0
    for event in prof.events():
        device_events += event.device_type == DeviceType.CUDA
        m = MEMCPY.match(event.name)
        if m:
            counts[m.group(1)] += 1
    if not device_events:  # zero copies would be a lie: the profiler saw no GPU work at all
        return "not measured (the profiler recorded no CUDA activity: is CUPTI available?)"
    return dict(counts)


def measure(session: Callable[[], contextlib.AbstractContextManager], schedule: list[str], sampler, labels: list[int],
            noise: torch.Tensor, seed: int, device: torch.device, repeats: int,
            profile_copies: bool) -> tuple[dict, torch.Tensor]:
    """Time, step latencies, memory and copies of one (backend, plan); the samples of its warm-up run."""
    cuda = device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        used_before = device_used_mib(device)
    row: dict[str, Any] = {}
    t0 = time.perf_counter()
    with session() as (step_fn, reset, run_device):
        row["activate_s"] = time.perf_counter() - t0
        batch = len(labels)

        def one_run(fn=step_fn) -> torch.Tensor:
            samples = run_batches(fn, reset, sampler, labels, noise, batch, seed, device=run_device)
            sync(device)
            return samples

        samples = one_run()  # warm-up; its samples are the ones compared
        if cuda:
            row["device_used_mib"] = device_used_mib(device)
            row["device_used_delta_mib"] = row["device_used_mib"] - used_before
        times = time_runs(one_run, repeats)
        row["times_ms"] = [t * 1e3 for t in times]
        row["median_ms"] = statistics.median(row["times_ms"])
        row["peak_torch_mib"] = torch.cuda.max_memory_allocated(device) / MIB if cuda else NO_CUDA

        clock = StepClock(step_fn, schedule, run_device)
        t0 = time.perf_counter()
        one_run(clock)
        wall_ms = (time.perf_counter() - t0) * 1e3
        per_variant: dict[str, list[float]] = {}
        for vid, ms in clock.milliseconds():
            per_variant.setdefault(vid, []).append(ms)
        row["step_ms"] = {vid: {"steps": len(v), "median_ms": statistics.median(v)} for vid, v in per_variant.items()}
        row["outside_steps_ms"] = wall_ms - sum(ms for v in per_variant.values() for ms in v)

        if cuda and profile_copies:
            x, y = noise[:batch].to(run_device), torch.tensor(labels).to(run_device)
            sync(device)

            def loop_only() -> None:
                reset()
                sampler.sample(step_fn, x, y, generator=torch.Generator().manual_seed(seed + 1))

            row["copies_in_loop"] = count_copies(loop_only, device)
            row["copies_whole_run"] = count_copies(one_run, device)
        else:
            reason = NO_CUDA if not cuda else "not measured (--no-profile)"
            row["copies_in_loop"] = row["copies_whole_run"] = reason
    return row, samples


#################################################################################
#                                  Results                                      #
#################################################################################


def finish(result: dict) -> None:
    """Fill the derived columns of every row (idempotent: called after each new row)."""
    from tcgraph.eval import psnr

    rows = result["rows"]
    full = {r["backend"]: r for r in rows if r["plan"] == "full"}
    eager = full.get("eager")
    for r in rows:
        ref = full.get(r["backend"])
        r["realized_speedup"] = ref["median_ms"] / r["median_ms"] if ref else None
        r["realized_over_predicted"] = (r["realized_speedup"] / r["predicted_speedup"]
                                        if r["realized_speedup"] is not None else None)
        r["vs_eager"] = eager["median_ms"] / r["median_ms"] if eager else None
        ref_step = ref["step_ms"].get("v0", ref["step_ms"].get("eager")) if ref else None
        for vid, s in r["step_ms"].items():
            s["flop_fraction"] = r["flop_fraction"].get(vid, 1.0)
            s["time_fraction"] = s["median_ms"] / ref_step["median_ms"] if ref_step else None
        samples = result["_samples"]
        mine, full_key, eager_key = samples.get((r["backend"], r["plan"])), (r["backend"], "full"), ("eager", "full")
        if mine is None:  # a row merged from an earlier run keeps the values it was written with
            continue
        r["psnr_vs_full_db"] = psnr(mine, samples[full_key]) if r["plan"] != "full" and full_key in samples else None
        r["psnr_full_vs_eager_db"] = psnr(mine, samples[eager_key]) \
            if r["plan"] == "full" and r["backend"] != "eager" and eager_key in samples else None


def _num(v, spec: str = ".2f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "–"


def _copies(c) -> str:
    if not isinstance(c, dict):
        return str(c)
    extra = "".join(f", {n} {k}" for k, n in c.items() if k not in ("HtoD", "DtoH", "DtoD"))
    return f"{c['HtoD']} HtoD, {c['DtoH']} DtoH, {c['DtoD']} DtoD{extra}"


def _part(skip: dict) -> str:
    if skip["backend"] is None:
        return ""
    return f"{skip['backend']}{' × ' + skip['plan'] if skip['plan'] else ''}: "


def format_table(result: dict) -> str:
    c = result["config"]
    settings = (f"{c['image_side']}x{c['image_side']} images (model input {c['input_size']}x{c['input_size']}, "
                f"{c['tokens']} tokens), batch {c['batch']} with guidance {c['guidance']} ({c['model_batch']} "
                f"rows), DDIM {c['steps']}, {c['dtype']}, median of {c['repeats']} runs after 1 warm-up; "
                f"torch {c['versions']['torch']}, onnxruntime {c['versions']['onnxruntime']}, "
                f"tensorrt {c['versions']['tensorrt']}.")
    head = [f"# GPU benchmark: {c['model']} on {c['device_name']}", "", settings, "", f"`{c['command']}`"]
    head += [f"merged with rows of: `{cmd}`" for cmd in c.get("merged_commands", [])] + [""]
    cols = ["backend", "plan", "precision", "variants", "predicted x", "whole run ms", "realized x", "real/pred",
            "vs eager x", "peak torch MiB", "device used MiB", "step ms by variant (steps)", "copies in loop",
            "copies per run"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        steps = "; ".join(f"{vid} {s['median_ms']:.2f} ({s['steps']})" for vid, s in r["step_ms"].items())
        vals = [r["backend"], r["plan"], r["precision"], str(r["variants"]), _num(r["predicted_speedup"]),
                _num(r["median_ms"], ".1f"), _num(r["realized_speedup"]), _num(r["realized_over_predicted"]),
                _num(r["vs_eager"]), _num(r["peak_torch_mib"], ".0f"), _num(r.get("device_used_mib"), ".0f"),
                steps, _copies(r["copies_in_loop"]), _copies(r["copies_whole_run"])]
        lines.append("| " + " | ".join(vals) + " |")
    legend = ("Realized x: the same backend's `full` time / the plan's time; predicted x: FLOP ratio; "
              "vs eager x: eager PyTorch `full` time / this row's time. Copies: CUDA memcpy events "
              "(torch.profiler) in one sampling loop, and in one whole run (inputs in, sample out).")
    tail = ["", legend]
    if result["skipped"]:
        tail += ["", "Not run:"] + [f"- {_part(s)}skipped: {s['reason']}" for s in result["skipped"]]
    if result["failed"]:
        tail += ["", "Failed:"] + [f"- {f['backend']} × {f['plan']}: {f['error']}" for f in result["failed"]]
    tail += ["", result["quality_note"]]
    return "\n".join(head + lines + tail) + "\n"


def write_outputs(result: dict, out: Path) -> None:
    finish(result)
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(public, indent=1)), (".md", format_table(result))):
        path = out.with_name(out.name + suffix)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)


MERGE_KEYS = ("model", "weights", "image_side", "batch", "guidance", "steps", "dtype", "device_name", "seed")


def merge_earlier(result: dict, out: Path, backends: list[str], specs: list[str]) -> None:
    """Take over the rows (and skip/fail records) of an earlier run that this run does not redo."""
    path = out.with_name(out.name + ".json")
    if not path.is_file():
        log(f"--merge: no {path} yet, nothing to merge")
        return
    earlier = json.loads(path.read_text())
    mine, theirs = result["config"], earlier["config"]
    differ = {k: (theirs.get(k), mine[k]) for k in MERGE_KEYS if theirs.get(k) != mine[k]}
    if differ:
        raise TcgraphError(f"--merge: {path} was measured with other settings ({differ}: earlier, now); "
                           "write to another --out or drop --merge")
    redo = {(b, p) for b in backends for p in specs}
    kept = [r for r in earlier["rows"] if (r["backend"], r["plan"]) not in redo]
    for r in kept:
        r.setdefault("measured_by", theirs["command"])
    result["rows"].extend(kept)
    result["skipped"].extend(s for s in earlier["skipped"] if s["backend"] is not None and s["backend"] not in backends)
    result["failed"].extend(f for f in earlier["failed"] if f["backend"] not in backends)
    mine["merged_commands"] = theirs.get("merged_commands", []) + [theirs["command"]]
    log(f"--merge: kept {len(kept)} rows of {path}")


def versions() -> dict:
    found = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import onnxruntime

        found["onnxruntime"] = onnxruntime.__version__
        found["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError as e:
        found["onnxruntime"] = f"not installed ({e})"
    try:
        import tensorrt

        found["tensorrt"] = str(getattr(tensorrt, "__version__", "unknown (stub?)"))
    except Exception as e:  # ImportError, or a stub package failing in its own way
        found["tensorrt"] = f"not importable ({type(e).__name__})"
    return found


#################################################################################
#                                    Main                                       #
#################################################################################


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"a config name (random weights, speed only; default {DEFAULT_MODEL}) or 'digits'")
    ap.add_argument("--resolution", type=int, default=None,
                    help="image side in pixels (latent = side/8; default: the config's, 256 for DiT-XL/2)")
    ap.add_argument("--batch", type=int, default=8, help="images per sampling run (guidance doubles the rows)")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--plans", default=DEFAULT_PLANS, help="comma list; `full` is always included, first")
    ap.add_argument("--backends", default=DEFAULT_BACKENDS, help=f"comma list of {', '.join(BACKENDS)}")
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
    ap.add_argument("--quiet", action="store_true", help="no progress bars from transform")
    ap.add_argument("--prepare-only", action="store_true",
                    help="make the plans and artifact folders (and engines), measure nothing")
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows of --out's JSON for backend x plan pairs this run does not measure "
                         "(same settings and device only): a long benchmark in several shorter commands")
    args = ap.parse_args(argv)
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
        "model_batch": settings.model_batch, "steps": args.steps, "sampler": "ddim", "device": str(device),
        "device_name": device_name, "dtype": dtype, "repeats": args.repeats, "seed": args.seed,
        "backends": backends, "plans": specs, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "versions": versions(), "machine": platform.node() + " " + (platform.processor() or platform.machine()),
        "command": "python benchmarks/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }


def image_side(model_name: str, cfg) -> int:
    return cfg.input_size * (1 if model_name == "digits" else PIXELS_PER_LATENT)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
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
    specs = ["full"] + [p for p in specs if p != "full"]

    model = build_dit(args.model, args.resolution, args.seed)
    cfg = model.config
    settings = SamplerSettings(num_steps=args.steps, cfg_scale=args.guidance, batch=args.batch,
                               resolution=cfg.input_size)
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
    labels = [i % cfg.num_classes for i in range(args.batch)]
    noise = make_noise(args.batch, cfg.in_channels, settings.resolution, args.seed)

    def record(backend: str, spec: str, art: Artifact | None, session) -> None:
        log(f"{backend} × {spec}: measuring")
        plan, source = plans[spec]
        schedule = ["eager"] * args.steps if backend == "eager" else plan.schedule()
        try:
            row, samples = measure(session, schedule, sampler, labels, noise, args.seed, device, args.repeats,
                                   not args.no_profile)
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
