"""One progress interface for long work: planning, rewriting, export, engines, sampling.

A function that takes time accepts `progress: Progress` and opens one phase per kind of
work with a known number of ticks::

    with progress.phase("rewrite", len(recipes)) as phase:
        for r in recipes:
            ...
            phase.tick(f"v{i}")

`QUIET` reports nothing (the default everywhere); `bars(enabled)` draws tqdm bars on
stderr; `Lines` writes one line per phase when it ends (what it did, in how long), for logs.
Tests record phases with `Recorder`.
"""
from __future__ import annotations

import sys
import time
from typing import Sequence


class Phase:
    """One unit of long work; `tick` once per item, with an optional short note."""

    def tick(self, note: str = "") -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "Phase":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Progress:
    """Reports nothing: the base class and the quiet default."""

    def phase(self, desc: str, total: int) -> Phase:
        return Phase()

    def announce(self, text: str) -> None:
        """One line about the work ahead (an `Outline`'s phases); shown where the progress is shown."""

    def outline(self, steps: "Sequence[tuple[str, float]]", title: str = "",
                seconds_per_unit: float | None = None) -> "Progress":
        """This progress with the phases of one job announced up front (`Outline`): `steps` are
        (phase name, estimated cost) in the order the job opens them, in any unit;
        `seconds_per_unit` turns the total into a first estimate of the time."""
        return Outline(self, steps, title, seconds_per_unit)


QUIET = Progress()
SILENT = Phase()  # the phase of work nobody watches: the default of functions that tick inside a caller's phase


class _BarPhase(Phase):
    def __init__(self, desc: str, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)

    def tick(self, note: str = "") -> None:
        if note:
            self.bar.set_postfix_str(note, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class Bars(Progress):
    """tqdm bars on stderr, one per phase."""

    def phase(self, desc: str, total: int) -> Phase:
        return _BarPhase(desc, total)

    def announce(self, text: str) -> None:
        from tqdm import tqdm

        tqdm.write(f"tcgraph: {text}", file=sys.stderr)


def bars(enabled: "bool | Progress") -> Progress:
    """Bars when `enabled` (the CLI: when stderr is a terminal), else `QUIET`; a `Progress`
    given instead is used as it is (the API's `progress=` takes either)."""
    if isinstance(enabled, Progress):
        return enabled
    return Bars() if enabled else QUIET


class _LinePhase(Phase):
    def __init__(self, desc: str, total: int, stream):
        self.desc, self.total, self.stream = desc, total, stream
        self.done, self.start, self.closed = 0, time.perf_counter(), False

    def tick(self, note: str = "") -> None:
        self.done += 1

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            seconds = time.perf_counter() - self.start
            print(f"tcgraph: {self.desc}: {self.done}/{self.total} in {seconds:.1f} s", file=self.stream, flush=True)


class Lines(Progress):
    """One line per phase on `stream` (default stderr) when the phase ends: `tcgraph: sample: 8/8 in 1.2 s`."""

    def __init__(self, stream=None) -> None:
        self.stream = stream

    def phase(self, desc: str, total: int) -> Phase:
        return _LinePhase(desc, total, self.stream if self.stream is not None else sys.stderr)

    def announce(self, text: str) -> None:
        print(f"tcgraph: {text}", file=self.stream if self.stream is not None else sys.stderr, flush=True)


class Recorder(Progress):
    """Keeps every phase and tick: `phases` is a list of [desc, total, notes]."""

    def __init__(self) -> None:
        self.phases: list[list] = []
        self.announced: list[str] = []

    def announce(self, text: str) -> None:
        self.announced.append(text)

    def phase(self, desc: str, total: int) -> Phase:
        entry = [desc, total, []]
        self.phases.append(entry)

        class _Rec(Phase):
            def tick(self, note: str = "") -> None:
                entry[2].append(note)

        return _Rec()


#################################################################################
#                 The phases of one long job, announced up front                #
#################################################################################


def duration(seconds: float) -> str:
    """`45 s`, `3 min 20 s`, `1 h 05 min`."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class _OutlinePhase(Phase):
    def __init__(self, outline: "Outline", inner: Phase, index: int | None, total: int):
        self.outline, self.inner, self.index, self.total = outline, inner, index, total
        self.done, self.closed = 0, False

    def tick(self, note: str = "") -> None:
        self.done += 1
        left = self.outline.seconds_left(self.index, self.done / max(self.total, 1))
        eta = f"plan: about {duration(left)} left" if left is not None else ""
        self.inner.tick(", ".join(n for n in (note, eta) if n))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.inner.close()
            if self.index is not None:
                self.outline.finished(self.index)


class Outline(Progress):
    """A `Progress` that knows the phases of a whole job before it starts (`Progress.outline`).

    It announces them up front (`tcgraph: plan l2c:2x in 4 phases: 1 calibrate, 2 train router,
    … (about 1 min 10 s)`), names each phase it opens `phase 2 of 4: train router`, and adds the
    time left for the whole job to every tick's note, from the estimated costs of the phases and
    the time the finished work took. A phase not in the outline is passed on as it is; an
    outline asked for inside this one (a planner that calls another) is this one.
    """

    def __init__(self, inner: Progress, steps: Sequence[tuple[str, float]], title: str = "",
                 seconds_per_unit: float | None = None) -> None:
        self.inner, self.steps = inner, [(str(d), max(float(c), 0.0)) for d, c in steps]
        self.total = sum(c for _, c in self.steps) or 1.0
        self.position, self.done, self.start = 0, [0.0] * len(self.steps), time.perf_counter()
        self.seconds_per_unit = seconds_per_unit
        names = ", ".join(f"{i + 1} {d}" for i, (d, _) in enumerate(self.steps))
        guess = f" (about {duration(self.total * seconds_per_unit)})" if seconds_per_unit else ""
        inner.announce(f"{title + ' in ' if title else ''}{len(self.steps)} phases: {names}{guess}")

    def outline(self, steps, title: str = "", seconds_per_unit: float | None = None) -> Progress:
        return self

    def announce(self, text: str) -> None:
        self.inner.announce(text)

    def phase(self, desc: str, total: int) -> Phase:
        index = next((i for i in range(self.position, len(self.steps)) if self.steps[i][0] == desc), None)
        if index is None:
            return self.inner.phase(desc, total)
        for i in range(self.position, index):  # phases the job did not need count as done
            self.done[i] = self.steps[i][1]
        self.position = index + 1
        label = f"phase {index + 1} of {len(self.steps)}: {desc}"
        return _OutlinePhase(self, self.inner.phase(label, total), index, total)

    def finished(self, index: int) -> None:
        self.done[index] = self.steps[index][1]

    def seconds_left(self, index: int | None, fraction: float) -> float | None:
        """The estimated time left for the whole job, with phase `index` `fraction` done."""
        done = sum(self.done) + (self.steps[index][1] * min(fraction, 1.0) if index is not None else 0.0)
        elapsed = time.perf_counter() - self.start
        if done <= 0 or elapsed <= 0:
            return None if self.seconds_per_unit is None else (self.total - done) * self.seconds_per_unit
        return max(self.total - done, 0.0) * elapsed / done
