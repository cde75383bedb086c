"""A recipe: the actions of one denoising step, one per block and branch (tcgraph.plan.plan's
vocabulary), and the roles a step plays for the run constants (the text's keys and values:
`constant_roles`, and what a variant cap leaves the cache steps, `cache_step_variants`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from tcgraph.errors import TcgraphError
from tcgraph.names import BRANCH_ORDER, BRANCHES, RUN_CONSTANTS, CacheKey
from tcgraph.plan.actions import Action

CONSTANT_ROLES = ("", "write", "read")  # Recipe.constants


@dataclass(frozen=True)
class Recipe:
    """Actions of one step: `actions[block][i]` is what branch `branches[i]` of that block does
    (a DiT's: 0 attention, 1 MLP)."""

    actions: tuple[tuple[Action, ...], ...]
    branches: tuple[str, ...] = BRANCHES  # the model's branches, in BRANCH_ORDER
    # run constants (module docstring): "" none, "write" (a run's first step), "read" (the later
    # steps); set by the Plan, not stored in plan JSON
    constants: str = ""

    def __post_init__(self) -> None:
        if self.constants not in CONSTANT_ROLES:
            raise TcgraphError(f"recipe constants role {self.constants!r}; expected one of {list(CONSTANT_ROLES)}")
        if tuple(b for b in BRANCH_ORDER if b in self.branches) != tuple(self.branches) or not self.branches:
            raise TcgraphError(f"recipe branches {list(self.branches)} must be distinct names of {list(BRANCH_ORDER)}, "
                               "in that order")
        bad = [l for l, acts in enumerate(self.actions) if len(acts) != len(self.branches)]
        if bad:
            raise TcgraphError(f"recipe block {bad[0]} has {len(self.actions[bad[0]])} actions, not one per branch "
                               f"{list(self.branches)}")

    @classmethod
    def uniform(cls, depth: int, action: Action, branches: tuple[str, ...] = BRANCHES) -> "Recipe":
        return cls(tuple(tuple(action for _ in branches) for _ in range(depth)), tuple(branches))

    @property
    def depth(self) -> int:
        return len(self.actions)

    def action(self, block: int, branch: str) -> Action:
        return self.actions[block][self.branches.index(branch)]

    def items(self) -> Iterable[tuple[int, str, Action]]:
        for block, acts in enumerate(self.actions):
            for branch, action in zip(self.branches, acts):
                yield block, branch, action

    def reads(self) -> list[CacheKey]:
        return [(b, br) for b, br, a in self.items() if a.reads_cache]

    def input_reads(self) -> list[CacheKey]:
        """Branches whose input cache `cache.<l>.<branch>.in` this recipe reads: the dynamic ones."""
        return [(b, br) for b, br, a in self.items() if a.kind == "dynamic"]

    def constant_reads(self) -> list[CacheKey]:
        """Branches whose run constants this recipe reads: those it runs, when it is a later step."""
        if self.constants != "read":
            return []
        return [(b, br) for b, br, a in self.items() if br in RUN_CONSTANTS and a.computes]

    def forecasts(self) -> list[tuple[CacheKey, int]]:
        """((block, branch), points) of the forecast branches, in block order: the layout of `forecast.w`."""
        return [((b, br), a.points) for b, br, a in self.items() if a.kind == "forecast"]

    @property
    def is_full(self) -> bool:
        return all(a.kind == "compute" for _, _, a in self.items())

    def short(self) -> str:
        """One line: per block one letter per branch, e.g. `CC CR RR`; a recipe that writes or reads
        run constants ends in ` +K/V` or ` K/V`."""
        mark = {"write": " +K/V", "read": " K/V" if self.constant_reads() else ""}.get(self.constants, "")
        return " ".join("".join(a.short() for a in acts) for acts in self.actions) + mark

    def to_json(self) -> list:
        return [[a.to_json() for a in acts] for acts in self.actions]

    @classmethod
    def from_json(cls, obj, branches: tuple[str, ...] = BRANCHES) -> "Recipe":
        return cls(tuple(tuple(Action.from_json(a) for a in acts) for acts in obj), tuple(branches))


def constant_roles(branches: tuple[str, ...], steps: int, carry: bool = True) -> list[str]:
    """Each step's `Recipe.constants` in a plan of `steps` steps: step 0 writes, the others read,
    where the blocks have a branch with run constants and the plan carries them; else ""."""
    if carry and steps > 1 and any(b in RUN_CONSTANTS for b in branches):
        return ["write"] + ["read"] * (steps - 1)
    return [""] * steps


def cache_step_variants(max_variants: int | None, branches: tuple[str, ...], steps: int) -> int | None:
    """How many variants a planner may give its cache steps under `max_variants` (None: no cap): the
    full steps take one, two where the plan carries run constants (its first step is its own variant)."""
    if max_variants is None:
        return None
    reserved = 2 if constant_roles(branches, steps)[0] == "write" else 1
    if max_variants <= reserved:
        why = " (the first, which projects the text, and the later ones)" if reserved == 2 else ""
        raise TcgraphError(f"max_variants {max_variants} leaves no variant for the cache steps: the full steps take "
                           f"{reserved}{why}; ask for at least {reserved + 1}")
    return max_variants - reserved
