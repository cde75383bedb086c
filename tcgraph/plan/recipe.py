"""A recipe: the actions of one denoising step, one per block and branch (tcgraph.plan.plan's
vocabulary), and the roles a step plays for the run constants (the text's keys and values:
`constant_roles`, and what a variant cap leaves the cache steps, `cache_step_variants`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from tcgraph.errors import TcgraphError
from tcgraph.names import BRANCH_ORDER, RUN_CONSTANTS, CacheKey
from tcgraph.plan.actions import Action

CONSTANT_ROLES = ("", "write", "read")  # Recipe.constants


@dataclass(frozen=True)
class Recipe:
    """Actions of one step: `actions[block][i]` is what branch i of that block does (a DiT's: 0
    attention, 1 MLP). `branches` names them: one tuple for every block (a DiT's ("attn", "mlp")),
    or one tuple per block for a model whose blocks differ (a two-stream model's double blocks have
    a text MLP its single blocks lack); a per-block tuple whose entries are all equal is stored as
    the one tuple, so that the same recipe is always the same value."""

    actions: tuple[tuple[Action, ...], ...]
    branches: tuple  # the model's branches, in BRANCH_ORDER (or one such tuple per block)
    # run constants (module docstring): "" none, "write" (a run's first step), "read" (the later
    # steps); set by the Plan, not stored in plan JSON
    constants: str = ""

    def __post_init__(self) -> None:
        if self.constants not in CONSTANT_ROLES:
            raise TcgraphError(f"recipe constants role {self.constants!r}; expected one of {list(CONSTANT_ROLES)}")
        per_block = bool(self.branches) and all(isinstance(b, (tuple, list)) for b in self.branches)
        layout = tuple(tuple(b) for b in self.branches) if per_block else (tuple(self.branches),)
        if per_block and len(layout) != len(self.actions):
            raise TcgraphError(f"recipe gives branches for {len(layout)} blocks but actions for {len(self.actions)}")
        for names in layout:
            if tuple(b for b in BRANCH_ORDER if b in names) != names or not names:
                raise TcgraphError(f"recipe branches {list(names)} must be distinct names of {list(BRANCH_ORDER)}, "
                                   "in that order")
        object.__setattr__(self, "branches", layout[0] if len(set(layout)) == 1 else layout)
        bad = [l for l, acts in enumerate(self.actions) if len(acts) != len(self.block_branches(l))]
        if bad:
            raise TcgraphError(f"recipe block {bad[0]} has {len(self.actions[bad[0]])} actions, not one per branch "
                               f"{list(self.block_branches(bad[0]))}")

    @classmethod
    def uniform(cls, depth: int, action: Action, branches: tuple) -> "Recipe":
        """Every branch of every block does `action` (`branches` one tuple, or one per block)."""
        per_block = bool(branches) and isinstance(branches[0], (tuple, list))
        return cls(tuple(tuple(action for _ in (branches[l] if per_block else branches)) for l in range(depth)),
                   tuple(map(tuple, branches)) if per_block else tuple(branches))

    @property
    def per_block(self) -> bool:
        """Whether the blocks' branches differ (`branches` holds one tuple per block)."""
        return isinstance(self.branches[0], tuple)

    def block_branches(self, block: int) -> tuple[str, ...]:
        return self.branches[block] if self.per_block else self.branches

    @property
    def depth(self) -> int:
        return len(self.actions)

    def action(self, block: int, branch: str) -> Action:
        names = self.block_branches(block)
        if branch not in names:
            raise TcgraphError(f"block {block} has no branch {branch!r}; its branches: {list(names)}")
        return self.actions[block][names.index(branch)]

    def has(self, block: int, branch: str) -> bool:
        return 0 <= block < self.depth and branch in self.block_branches(block)

    def items(self) -> Iterable[tuple[int, str, Action]]:
        for block, acts in enumerate(self.actions):
            for branch, action in zip(self.block_branches(block), acts):
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
    def from_json(cls, obj, branches: tuple) -> "Recipe":
        return cls(tuple(tuple(Action.from_json(a) for a in acts) for acts in obj), tuple(branches))


def branch_set(branches: tuple) -> set[str]:
    """Every branch name of `Recipe.branches` (one tuple, or one per block)."""
    return {b for names in branches for b in ((names,) if isinstance(names, str) else names)}


def constant_roles(branches: tuple[str, ...], steps: int, carry: bool = True) -> list[str]:
    """Each step's `Recipe.constants` in a plan of `steps` steps: step 0 writes, the others read,
    where the blocks have a branch with run constants and the plan carries them; else ""."""
    if carry and steps > 1 and any(b in RUN_CONSTANTS for b in branch_set(branches)):
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
