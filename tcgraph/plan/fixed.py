"""Plans that need no learning: `full` (no caching) and `fora:N` (fixed-interval caching)."""
from __future__ import annotations

from dataclasses import dataclass

from tcgraph.errors import TcgraphError
from tcgraph.models.dit import DiT, DiTConfig
from tcgraph.plan.options import option
from tcgraph.plan.plan import COMPUTE, REUSE, Plan, Recipe
from tcgraph.progress import QUIET, Progress
from tcgraph.sampling import SamplerSettings


@dataclass(frozen=True)
class FullConfig:
    """No caching: every step computes every branch."""


@dataclass(frozen=True)
class ForaConfig:
    """FORA / fixed-interval caching (Selvaraju et al. 2024, arXiv 2407.01425): compute
    every branch at one step of every `interval`, reuse all branches at the others."""

    interval: int = option(2, "a full step every N steps, every branch reused at the others", type=int)

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise TcgraphError(f"fora interval must be >= 1, got {self.interval}")


def make_full(cfg: FullConfig, model_config: DiTConfig, settings: SamplerSettings, *,
              weights: DiT | None = None, progress: Progress = QUIET) -> Plan:
    recipes = tuple(Recipe.uniform(model_config.depth, COMPUTE) for _ in range(settings.num_steps))
    return Plan("full", settings, recipes, model_config.num_tokens, params={})


def make_fora(cfg: ForaConfig, model_config: DiTConfig, settings: SamplerSettings, *,
              weights: DiT | None = None, progress: Progress = QUIET) -> Plan:
    full, cached = Recipe.uniform(model_config.depth, COMPUTE), Recipe.uniform(model_config.depth, REUSE)
    recipes = tuple(full if s % cfg.interval == 0 else cached for s in range(settings.num_steps))
    return Plan(f"fora:{cfg.interval}", settings, recipes, model_config.num_tokens,
                params={"interval": cfg.interval})
