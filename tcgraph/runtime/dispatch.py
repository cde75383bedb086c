"""The dispatcher: a sampler step function that runs the schedule's variant at each step.

Caches live in the backend's own values between steps (OrtValues for ONNX Runtime), so
they never round-trip through numpy; only `out` is turned into a torch tensor for the
sampler's update.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from tcgraph.errors import TcgraphError

RunFn = Callable[[str, dict[str, Any]], dict[str, Any]]


class ScheduleDispatcher:
    """Callable as `step_fn(step, x, t, y)`; call `reset()` before each sampling run."""

    def __init__(self, schedule: list[str], io: dict[str, tuple[list[str], list[str]]], run: RunFn,
                 to_torch: Callable[[Any], torch.Tensor] = lambda v: v):
        missing = sorted(set(schedule) - set(io))
        if missing:
            raise TcgraphError(f"schedule names variants {missing} that were not loaded; loaded: {sorted(io)}")
        self.schedule = list(schedule)
        self.io = io
        self.run = run
        self.to_torch = to_torch
        self.caches: dict[str, Any] = {}
        self.calls: list[str] = []  # variant id per step of the current run

    @classmethod
    def for_runner(cls, runner, schedule: list[str]) -> "ScheduleDispatcher":
        """Dispatch `schedule` onto an activated Runner of an artifact folder; `out` comes back
        where the runner keeps it (GPU memory for GPU runners: the sampler runs there too)."""
        return cls(schedule, runner.io_names(), runner.run, runner.tensor)

    def reset(self) -> None:
        self.caches = {}
        self.calls = []

    def __call__(self, step: int, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not 0 <= step < len(self.schedule):
            raise TcgraphError(f"step {step} is outside the plan's {len(self.schedule)} steps")
        vid = self.schedule[step]
        inputs, outputs = self.io[vid]
        feeds: dict[str, Any] = {"x": x, "t": t, "y": y}
        for name in inputs[3:]:
            if name not in self.caches:
                raise TcgraphError(f"step {step} ({vid}) reads {name}, which no earlier step wrote; call reset() "
                                   "before each sampling run and start at step 0")
            feeds[name] = self.caches[name]
        result = self.run(vid, feeds)
        for name in outputs[1:]:
            self.caches[name] = result[name]
        self.calls.append(vid)
        return self.to_torch(result["out"])


def graph_runner(graphs: dict[str, torch.fx.GraphModule], io: dict[str, tuple[list[str], list[str]]]) -> RunFn:
    """A RunFn over in-memory variant GraphModules (the eager path; used as a reference)."""

    @torch.no_grad()
    def run(vid: str, feeds: dict[str, Any]) -> dict[str, Any]:
        inputs, outputs = io[vid]
        out = graphs[vid](*[feeds[n] for n in inputs])
        out = out if isinstance(out, tuple) else (out,)
        return dict(zip(outputs, out))

    return run
