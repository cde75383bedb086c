"""The dispatcher: a sampler step function that runs the schedule's variant at each step.

Caches live in the backend's own values between steps (OrtValues for ONNX Runtime), so
they never round-trip through numpy; only `out` is turned into a torch tensor for the
sampler's update.

History (forecast branches, docs/design.md "Forecast actions"). A branch that some variant
forecasts from r points keeps its last r computed outputs, newest first (until r exist, the
missing older ones are fed the oldest there is: their weights are 0): the variant
inputs `cache.<l>.<branch>` (newest), `cache.<l>.<branch>.h1`, … A step that writes
`cache.<l>.<branch>` makes its output the newest entry; the oldest drops out. The entries
are references to the values the backend returned, so a new entry moves no tensor: which
entry is which at every step follows from the static schedule alone (`Plan.history_steps`
says it, and a test checks the two agree over whole schedules). A backend that returns its
own fixed buffers (`Runner.returns_buffers`: CUDA graphs, TensorRT) overwrites them at the
next run, so the dispatcher keeps a copy of each history entry older than the newest there.

Inputs that come from the plan, not from earlier steps (`forecast.w`, the step's forecast
weights; `gate.params` of a gated step), are given per step as `step_feeds`.

Gated steps (docs/design.md, "Gated steps") decide on the device whether they compute, so the
schedule cannot say which entry is which: a gated variant reads and writes every history entry
itself (`….h<j>` among its outputs), and the dispatcher keeps what it returns as the history. Its
state (`gate.*`) is kept like a cache. What a gated variant reads before any step wrote it (the
first step's caches, history and state) is zeros of the shape it declares (`initial`): its first
step computes (the plan gives it a threshold below 0), so it reads none of them. The number of
steps that computed and the block work the steps did (each step's share, `gate.params`) are summed on
the device (`gate.count`) and read once, by `last_run()` after the run;
nothing of the decision reaches the host during the run.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from tcgraph.errors import TcgraphError
from tcgraph.names import GATE_COUNT, GATE_PARAMS, history_index, is_cache, is_gate, model_input_count
from tcgraph.sampling.conditioning import as_inputs

RunFn = Callable[[str, dict[str, Any]], dict[str, Any]]


class ScheduleDispatcher:
    """Callable as `step_fn(step, x, t, y)`; call `reset()` before each sampling run."""

    def __init__(self, schedule: list[str], io: dict[str, tuple[list[str], list[str]]], run: RunFn,
                 to_torch: Callable[[Any], torch.Tensor] = lambda v: v, *,
                 step_feeds: list[dict[str, Any]] | None = None, copy_history: bool = False,
                 initial: dict[str, Any] | None = None):
        missing = sorted(set(schedule) - set(io))
        if missing:
            raise TcgraphError(f"schedule names variants {missing} that were not loaded; loaded: {sorted(io)}")
        if step_feeds is not None and len(step_feeds) != len(schedule):
            raise TcgraphError(f"{len(step_feeds)} step feeds for a schedule of {len(schedule)} steps")
        self.schedule = list(schedule)
        self.io = io
        self.run = run
        self.to_torch = to_torch
        self.step_feeds = step_feeds or [{} for _ in schedule]
        self.copy_history = copy_history
        self.initial = dict(initial or {})  # name -> value fed before any step wrote it (gated variants)
        self.depth = history_depths(io)  # cache name -> history entries kept (only where > 1)
        self.caches: dict[str, Any] = {}
        self.history: dict[str, list[Any]] = {}  # cache name -> entries, newest first
        self.calls: list[str] = []  # variant id per step of the current run
        self.measured = [0, 0, 0.0]  # (computed steps, steps, block work) of the finished runs with gated steps

    @classmethod
    def for_runner(cls, runner, schedule: list[str], step_feeds: list[dict[str, Any]] | None = None
                   ) -> "ScheduleDispatcher":
        """Dispatch `schedule` onto an activated Runner of an artifact folder; `out` comes back
        where the runner keeps it (GPU memory for GPU runners: the sampler runs there too).
        `step_feeds`: per step, the plan's own inputs (`Plan.step_feeds()`)."""
        return cls(schedule, runner.io_names(), runner.run, runner.tensor, step_feeds=step_feeds,
                   copy_history=getattr(runner, "returns_buffers", False), initial=gated_zeros(runner))

    @classmethod
    def for_plan(cls, runner, plan) -> "ScheduleDispatcher":
        """Dispatch a plan's schedule, with its per-step forecast weights, onto an activated Runner."""
        return cls.for_runner(runner, plan.schedule(), plan.step_feeds())

    def measured_fraction(self) -> float | None:
        """Computed steps / steps over every finished run with gated steps (call `reset()` to finish the last)."""
        return self.measured[0] / self.measured[1] if self.measured[1] else None

    def measured_work(self) -> float | None:
        """Block work / steps (the compute fraction) over every finished run with gated steps."""
        return self.measured[2] / self.measured[1] if self.measured[1] else None

    def last_run(self) -> tuple[int, float] | None:
        """(steps that computed, block work: each step's share summed) of the last run, an ungated step counting
        as computed with share 1; read from the device once; None when no step was gated."""
        if GATE_COUNT not in self.caches:
            return None
        ungated = sum(1 for vid in self.calls if GATE_PARAMS not in self.io[vid][0])
        count, work = (float(v) for v in self.to_torch(self.caches[GATE_COUNT]).reshape(-1)[:2])
        return int(round(count)) + ungated, work + ungated

    def computed_steps(self) -> int | None:
        """How many steps of the last run computed (full, or gated steps that decided to); None when no step
        was gated."""
        run = self.last_run()
        return None if run is None else run[0]

    def reset(self) -> None:
        """Start a sampling run (the last one's computed steps and work, when it had gated steps, are added to
        `measured`)."""
        run = self.last_run()
        if run is not None:
            self.measured[0] += run[0]
            self.measured[1] += len(self.calls)
            self.measured[2] += run[1]
        self.caches = {}
        self.history = {}
        self.calls = []

    def _read(self, name: str) -> Any:
        base, j = history_index(name)
        if base in self.depth:
            entries = self.history.get(base, [])
            # an entry that does not exist yet has weight 0 (Plan.validate): any finite tensor will do
            if entries:
                return entries[min(j, len(entries) - 1)]
            return self.initial.get(name)
        return self.caches.get(name, self.initial.get(name))

    def _write(self, name: str, value: Any) -> None:
        if name not in self.depth:
            self.caches[name] = value
            return
        entries = self.history.setdefault(name, [])
        entries.insert(0, value.clone() if self.copy_history else value)  # a runner's buffer is overwritten next run
        del entries[self.depth[name]:]

    def __call__(self, step: int, x: torch.Tensor, t: torch.Tensor, y) -> torch.Tensor:
        """One step; `y` is the model's conditioning (class ids, or the tuple (text embeddings, mask))."""
        if not 0 <= step < len(self.schedule):
            raise TcgraphError(f"step {step} is outside the plan's {len(self.schedule)} steps")
        vid = self.schedule[step]
        inputs, outputs = self.io[vid]
        own = model_input_count(inputs)
        values = (x, t, *as_inputs(y))
        if len(values) != own:
            raise TcgraphError(f"variant {vid} reads {own} model inputs ({', '.join(inputs[:own])}); the step got "
                               f"{len(values)}: pass class ids to a class-conditional model, (embeddings, mask) "
                               "to a text-conditioned one")
        feeds: dict[str, Any] = dict(zip(inputs[:own], values))
        given = self.step_feeds[step]
        for name in inputs[own:]:
            value = given[name] if name in given else self._read(name)
            if value is None:
                raise TcgraphError(
                    f"step {step} ({vid}) reads {name}, which no earlier step wrote"
                    + (" and the plan does not give: dispatch with ScheduleDispatcher.for_plan"
                       if not is_cache(name) else "; call reset() before each sampling run and start at step 0"))
            feeds[name] = value
        result = self.run(vid, feeds)
        whole = {history_index(n)[0] for n in outputs if history_index(n)[1]}  # a gated variant's history
        for name in outputs[1:]:
            base, j = history_index(name)
            if base in whole:
                entries = self.history.setdefault(base, [])
                del entries[j:]
                entries.append(result[name].clone() if self.copy_history else result[name])
            else:
                self._write(name, result[name])
        self.calls.append(vid)
        return self.to_torch(result["out"])


def gated_zeros(runner) -> dict[str, torch.Tensor]:
    """Zeros for every cache and state input of the runner's gated variants (those reading `gate.params`),
    where the runner keeps its tensors."""
    zeros: dict[str, torch.Tensor] = {}
    for spec in getattr(runner, "specs", {}).values():
        if GATE_PARAMS not in spec.input_names:
            continue
        for io in spec.inputs:
            if (is_cache(io.name) or is_gate(io.name)) and io.name != GATE_PARAMS:
                zeros[io.name] = torch.zeros(list(io.shape), dtype=getattr(torch, io.dtype), device=runner.device)
    return zeros


def history_depths(io: dict[str, tuple[list[str], list[str]]]) -> dict[str, int]:
    """Cache name -> how many history entries the variants read (1 + the largest j of `….h<j>`), where > 1."""
    depth: dict[str, int] = {}
    for inputs, _ in io.values():
        for name in inputs:
            base, j = history_index(name)
            if j:
                depth[base] = max(depth.get(base, 1), j + 1)
    return depth


def graph_runner(graphs: dict[str, torch.fx.GraphModule], io: dict[str, tuple[list[str], list[str]]]) -> RunFn:
    """A RunFn over in-memory variant GraphModules (the eager path; used as a reference)."""

    @torch.no_grad()
    def run(vid: str, feeds: dict[str, Any]) -> dict[str, Any]:
        inputs, outputs = io[vid]
        out = graphs[vid](*[feeds[n] for n in inputs])
        out = out if isinstance(out, tuple) else (out,)
        return dict(zip(outputs, out))

    return run
