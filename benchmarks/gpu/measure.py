"""How bench_gpu.py measures one (backend, plan): whole-run time, step latencies, memory, copies."""
from __future__ import annotations

import contextlib
import gc
import re
import statistics
import time
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from bench_plans import time_runs

from tcgraph.sampling import run_batches

MEMCPY = re.compile(r"Memcpy (\w+)\b")  # Kineto names: "Memcpy HtoD (Pageable -> Device)", ...
NO_CUDA = "not measured (no CUDA)"
NOT_PROFILED = "not measured (not a profiled row: see --no-profile, --profile-backends, --profile-plans)"
MIB = 1 << 20


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


def measure(session: Callable[[], contextlib.AbstractContextManager], schedule: list[str], sampler, labels,
            noise: torch.Tensor, seed: int, device: torch.device, repeats: int,
            profile_copies: bool) -> tuple[dict, torch.Tensor]:
    """Time, step latencies, memory and copies of one (backend, plan); the samples of its warm-up run.
    `labels`: class ids, or a text model's `Text` (one prompt per image)."""
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
            x = noise[:batch].to(run_device)
            y = labels.to(run_device) if hasattr(labels, "model_inputs") else torch.tensor(labels).to(run_device)
            sync(device)

            def loop_only() -> None:
                reset()
                sampler.sample(step_fn, x, y, generator=torch.Generator().manual_seed(seed + 1))

            row["copies_in_loop"] = count_copies(loop_only, device)
            row["copies_whole_run"] = count_copies(one_run, device)
        else:
            reason = NO_CUDA if not cuda else NOT_PROFILED
            row["copies_in_loop"] = row["copies_whole_run"] = reason
    return row, samples
