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


class Recorder(Progress):
    """Keeps every phase and tick: `phases` is a list of [desc, total, notes]."""

    def __init__(self) -> None:
        self.phases: list[list] = []

    def phase(self, desc: str, total: int) -> Phase:
        entry = [desc, total, []]
        self.phases.append(entry)

        class _Rec(Phase):
            def tick(self, note: str = "") -> None:
                entry[2].append(note)

        return _Rec()
