"""Plans that need no learning: `full` (no caching), `fora:N` (fixed-interval caching) and
`taylor:N[:order]` (fixed-interval forecasting)."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from tcgraph.errors import TcgraphError
from tcgraph.models.families import ModelConfig
from tcgraph.plan.options import option
from tcgraph.plan.learning.extrapolate import taylor_weights
from tcgraph.plan.plan import COMPUTE, MAX_HISTORY, REUSE, Plan, Recipe, forecast
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


@dataclass(frozen=True)
class TaylorConfig:
    """Fixed-interval forecasting (TaylorSeer, arXiv 2503.06923), FORA's static counterpart:
    a full step every `interval` steps, every branch forecast at the others by an order-`order`
    Taylor expansion in the step index through its last `order + 1` computed outputs (fewer
    while fewer exist; with one it is reused)."""

    interval: int = option(3, "a full step every N steps, every branch forecast at the others", type=int)
    order: int = option(1, f"Taylor order of the forecasts (1..{MAX_HISTORY - 1}; history kept: order + 1)",
                        type=int)

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise TcgraphError(f"taylor interval must be >= 1, got {self.interval}")
        if not 1 <= self.order <= MAX_HISTORY - 1:
            raise TcgraphError(f"taylor order must be 1..{MAX_HISTORY - 1}, got {self.order}")


def make_full(cfg: FullConfig, model_config: ModelConfig, settings: SamplerSettings, *,
              weights: nn.Module | None = None, progress: Progress = QUIET) -> Plan:
    full = Recipe.uniform(model_config.depth, COMPUTE, model_config.branches)
    recipes = tuple(full for _ in range(settings.num_steps))
    return Plan("full", settings, recipes, model_config.num_tokens, params={}, layout=model_config.block_layout())


def make_fora(cfg: ForaConfig, model_config: ModelConfig, settings: SamplerSettings, *,
              weights: nn.Module | None = None, progress: Progress = QUIET) -> Plan:
    full = Recipe.uniform(model_config.depth, COMPUTE, model_config.branches)
    cached = Recipe.uniform(model_config.depth, REUSE, model_config.branches)
    recipes = tuple(full if s % cfg.interval == 0 else cached for s in range(settings.num_steps))
    return Plan(f"fora:{cfg.interval}", settings, recipes, model_config.num_tokens,
                params={"interval": cfg.interval}, layout=model_config.block_layout())


def make_taylor(cfg: TaylorConfig, model_config: ModelConfig, settings: SamplerSettings, *,
                weights: nn.Module | None = None, progress: Progress = QUIET) -> Plan:
    depth, branches = model_config.depth, model_config.branches
    full = Recipe.uniform(depth, COMPUTE, branches)
    recipes, plan_weights, computed = [], {}, []
    for s in range(settings.num_steps):
        if s % cfg.interval == 0:
            recipes.append(full)
            computed.insert(0, s)
            continue
        points = min(cfg.order + 1, len(computed))
        if points == 1:
            recipes.append(Recipe.uniform(depth, REUSE, branches))
            continue
        recipes.append(Recipe.uniform(depth, forecast(points), branches))
        w = taylor_weights(s, computed, points - 1)
        plan_weights[s] = {(block, branch): w for block, branch, _ in recipes[-1].items()}
    return Plan(f"taylor:{cfg.interval}:{cfg.order}", settings, tuple(recipes), model_config.num_tokens,
                params={"interval": cfg.interval, "order": cfg.order}, weights=plan_weights,
                layout=model_config.block_layout())
