"""Actions: what one branch does at one step (the vocabulary of docs/design.md).

`compute`, `reuse`, `partial(indices)` (TokenCache: constant token ids recomputed),
`dynamic(k)` (k tokens chosen per sample in the graph) and `forecast(n)` (predicted from the
branch's last n computed outputs; the weights are the plan's, see `plan.Plan.weights`).
`plan.py` re-exports everything here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from tcgraph.errors import TcgraphError

ACTION_KINDS = ("compute", "reuse", "partial", "dynamic", "forecast")
MAX_HISTORY = 4  # most history entries a forecast reads (docs/design.md: r <= 4)


@dataclass(frozen=True)
class Action:
    kind: str  # "compute" | "reuse" | "partial" | "dynamic" | "forecast"
    indices: tuple[int, ...] | None = None  # kept (recomputed) tokens, only for partial
    size: int | None = None  # number of recomputed tokens, only for dynamic (which ones: per sample, in the graph)
    points: int | None = None  # history entries a forecast reads, only for forecast

    def __post_init__(self) -> None:
        if self.kind not in ACTION_KINDS:
            raise TcgraphError(f"unknown action {self.kind!r}; expected compute, reuse, partial, dynamic or forecast")
        if (self.kind == "forecast") != (self.points is not None):
            raise TcgraphError("forecast actions need a number of history points, and only forecast actions have one")
        if self.points is not None and (isinstance(self.points, bool) or not isinstance(self.points, int)
                                        or not 1 <= self.points <= MAX_HISTORY):
            raise TcgraphError(f"a forecast reads 1..{MAX_HISTORY} history points, got {self.points!r}")
        if (self.kind == "partial") != (self.indices is not None):
            raise TcgraphError("partial actions need token indices, and only partial actions have them")
        if self.indices is not None and len(set(self.indices)) != len(self.indices):
            raise TcgraphError("partial token indices must be distinct")
        if (self.kind == "dynamic") != (self.size is not None):
            raise TcgraphError("dynamic actions need a token count k (`size`), and only dynamic actions have one")
        if self.size is not None and (isinstance(self.size, bool) or not isinstance(self.size, int)):
            raise TcgraphError(f"a dynamic action's token count must be an int, got {self.size!r}")

    @property
    def k(self) -> int | None:
        """Recomputed tokens per sample: len(indices) for partial, size for dynamic, else None."""
        if self.indices is not None:
            return len(self.indices)
        return self.size

    @property
    def reads_cache(self) -> bool:
        return self.kind in ("reuse", "partial", "dynamic", "forecast")

    @property
    def computes(self) -> bool:
        """Whether the branch runs (on all or some tokens): such a step is a new history entry."""
        return self.kind in ("compute", "partial", "dynamic")

    def short(self) -> str:
        if self.kind == "forecast":
            return f"F{self.points}"
        return {"compute": "C", "reuse": "R"}.get(self.kind) or f"{'P' if self.kind == 'partial' else 'D'}{self.k}"

    def to_json(self):
        if self.kind == "partial":
            return {"partial": list(self.indices)}
        if self.kind == "dynamic":
            return {"dynamic": self.size}
        if self.kind == "forecast":
            return {"forecast": self.points}
        return self.kind

    @classmethod
    def from_json(cls, obj) -> "Action":
        if isinstance(obj, str):
            return cls(obj)
        if isinstance(obj, dict) and set(obj) == {"partial"}:
            return cls("partial", tuple(int(i) for i in obj["partial"]))
        if isinstance(obj, dict) and set(obj) == {"dynamic"} and isinstance(obj["dynamic"], int) \
                and not isinstance(obj["dynamic"], bool):
            return cls("dynamic", size=obj["dynamic"])
        if isinstance(obj, dict) and set(obj) == {"forecast"} and isinstance(obj["forecast"], int) \
                and not isinstance(obj["forecast"], bool):
            return cls("forecast", points=obj["forecast"])
        raise TcgraphError(
            f"cannot read action {obj!r}; expected 'compute', 'reuse', {{'partial': [indices]}}, {{'dynamic': k}} "
            "or {'forecast': n}"
        )


COMPUTE = Action("compute")
REUSE = Action("reuse")


def partial(indices: Iterable[int]) -> Action:
    return Action("partial", tuple(sorted(int(i) for i in indices)))


def dynamic(k: int) -> Action:
    """Recompute k tokens per sample, the k whose branch input changed most (see the module docstring)."""
    return Action("dynamic", size=int(k))


def forecast(n: int) -> Action:
    """Predict the branch from its last n computed outputs (weights in `Plan.weights`)."""
    return Action("forecast", points=int(n))
