"""A recipe: the actions of one denoising step, one per block and branch (tcgraph.plan.plan's
vocabulary), and the roles a step plays for the run constants (the text's keys and values:
`constant_roles`, and what a variant cap leaves the cache steps, `cache_step_variants`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from tcgraph.errors import TcgraphError
from tcgraph.names import BRANCH_ORDER, RUN_CONSTANTS, CacheKey
from tcgraph.plan.actions import Action
from tcgraph.plan.gate import Gate

CONSTANT_ROLES = ("", "write", "read")  # Recipe.constants
GATED_ACTIONS = ("compute", "reuse", "forecast")  # what a gated recipe's computing path may do


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
    # a gated step (tcgraph.plan.gate): `actions` are its computing path (the first blocks compute, the
    # others compute, reuse or forecast: a base plan's recipe); the gate says which blocks always compute
    # and what the others do when the graph decides to skip them
    gate: Gate | None = None

    def __post_init__(self) -> None:
        if self.gate is not None:
            if not isinstance(self.gate, Gate):
                raise TcgraphError(f"recipe gate must be a Gate, got {type(self.gate).__name__}")
            head = [a for acts in self.actions[:self.gate.first] for a in acts]
            if any(a.kind != "compute" for a in head) or any(
                    a.kind not in GATED_ACTIONS for acts in self.actions for a in acts):
                raise TcgraphError(f"a gated recipe lists the actions of its computing path: its first "
                                   f"{self.gate.first} blocks compute, the others {', '.join(GATED_ACTIONS)}")
            if self.gate.first >= len(self.actions):
                raise TcgraphError(f"gate first={self.gate.first} leaves none of the {len(self.actions)} blocks to "
                                   f"skip; use first <= {len(self.actions) - 1}")
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
        if self.gate is not None:  # the skipping path reads every branch after the first blocks
            return [(b, br) for b, br, _ in self.items() if b >= self.gate.first]
        return [(b, br) for b, br, a in self.items() if a.reads_cache]

    def gated_keys(self) -> list[CacheKey]:
        """The branches a gated recipe may skip (after its first blocks), in block order; [] ungated."""
        return self.reads() if self.gate is not None else []

    def cheap(self) -> "Recipe":
        """A gated recipe's skipping path as an ungated recipe: the first blocks compute, the others
        take the gate's cheap action."""
        if self.gate is None:
            raise TcgraphError("only a gated recipe has a skipping path")
        acts = tuple(tuple(self.gate.cheap if l >= self.gate.first else a for a in acts)
                     for l, acts in enumerate(self.actions))
        return Recipe(acts, self.branches, self.constants)

    def computing(self) -> "Recipe":
        """A gated recipe's computing path as an ungated recipe (itself when ungated)."""
        return Recipe(self.actions, self.branches, self.constants)

    def input_reads(self) -> list[CacheKey]:
        """Branches whose input cache `cache.<l>.<branch>.in` this recipe reads: the dynamic ones."""
        return [(b, br) for b, br, a in self.items() if a.kind == "dynamic"]

    def constant_reads(self) -> list[CacheKey]:
        """Branches whose run constants this recipe reads: those it runs, when it is a later step."""
        if self.constants != "read":
            return []
        return [(b, br) for b, br, a in self.items() if br in RUN_CONSTANTS and a.computes]

    def forecasts(self) -> list[tuple[CacheKey, int]]:
        """((block, branch), points) of the forecast branches, in block order: the layout of `forecast.w`
        ([] for a gated recipe: its weights are formed in the graph from the steps its history holds)."""
        if self.gate is not None:
            return []
        return [((b, br), a.points) for b, br, a in self.items() if a.kind == "forecast"]

    @property
    def is_full(self) -> bool:
        return self.gate is None and all(a.kind == "compute" for _, _, a in self.items())

    def short(self) -> str:
        """One line: per block one letter per branch, e.g. `CC CR RR`; a recipe that writes or reads
        run constants ends in ` +K/V` or ` K/V`."""
        mark = {"write": " +K/V", "read": " K/V" if self.constant_reads() else ""}.get(self.constants, "")
        if self.gate is not None:  # and the computing path's actions, where some later branch does not compute
            path = " ".join("".join(a.short() for a in acts) for acts in self.actions)
            return self.gate.short() + (f" {path}" if {a.kind for _, _, a in self.items()} != {"compute"} else "") + mark
        return " ".join("".join(a.short() for a in acts) for acts in self.actions) + mark

    def to_json(self):
        actions = [[a.to_json() for a in acts] for acts in self.actions]
        return actions if self.gate is None else {"actions": actions, "gate": self.gate.to_json()}

    @classmethod
    def from_json(cls, obj, branches: tuple) -> "Recipe":
        gate = None
        if isinstance(obj, dict):  # a gated recipe
            if set(obj) != {"actions", "gate"}:
                raise TcgraphError(f"cannot read recipe {obj!r}: expected a list of actions per block, or "
                                   "{'actions': [...], 'gate': {...}}")
            obj, gate = obj["actions"], Gate.from_json(obj["gate"])
        return cls(tuple(tuple(Action.from_json(a) for a in acts) for acts in obj), tuple(branches), gate=gate)


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
