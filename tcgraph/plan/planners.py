"""Planners turn a spec string (`full`, `fora:3`, …) into a Plan.

Each policy has a frozen config dataclass checked in `__post_init__` and one `make_*`
function; `make_plan` parses the spec and dispatches through the registry, so new methods
(Learning-to-Cache, TokenCache) register a parser and a function here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tcgraph.errors import TcgraphError
from tcgraph.models.dit import DiTConfig
from tcgraph.plan.plan import COMPUTE, REUSE, Plan, Recipe, SamplerSettings


@dataclass(frozen=True)
class FullConfig:
    """No caching: every step computes every branch."""


@dataclass(frozen=True)
class ForaConfig:
    """FORA / fixed-interval caching (Selvaraju et al. 2024, arXiv 2407.01425): compute
    every branch at one step of every `interval`, reuse all branches at the others."""

    interval: int

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise TcgraphError(f"fora interval must be >= 1, got {self.interval}")


def make_full(cfg: FullConfig, model: DiTConfig, settings: SamplerSettings) -> Plan:
    recipes = tuple(Recipe.uniform(model.depth, COMPUTE) for _ in range(settings.num_steps))
    return Plan("full", settings, recipes, model.num_tokens, params={})


def make_fora(cfg: ForaConfig, model: DiTConfig, settings: SamplerSettings) -> Plan:
    full, cached = Recipe.uniform(model.depth, COMPUTE), Recipe.uniform(model.depth, REUSE)
    recipes = tuple(full if s % cfg.interval == 0 else cached for s in range(settings.num_steps))
    return Plan(f"fora:{cfg.interval}", settings, recipes, model.num_tokens, params={"interval": cfg.interval})


def _parse_int(arg: str, spec: str) -> int:
    try:
        return int(arg)
    except ValueError:
        raise TcgraphError(f"plan {spec!r}: {arg!r} is not an integer") from None


PLANNERS: dict[str, tuple[Callable[[list[str], str], object], Callable]] = {
    "full": (lambda args, spec: FullConfig(), make_full),
    "fora": (lambda args, spec: ForaConfig(_parse_int(args[0], spec) if args else 2), make_fora),
}

PLAN_HELP = "full | fora:N (reuse every branch for N-1 of every N steps)"


def make_plan(spec: str, model: DiTConfig, settings: SamplerSettings) -> Plan:
    """Build a plan from a spec such as `full` or `fora:3`."""
    name, *args = spec.split(":")
    if name not in PLANNERS:
        raise TcgraphError(f"unknown plan {spec!r}; available: {PLAN_HELP}")
    parse, make = PLANNERS[name]
    if settings.resolution != model.input_size:
        raise TcgraphError(
            f"resolution {settings.resolution} does not match the model's input size {model.input_size}"
        )
    return make(parse(args, spec), model, settings)
