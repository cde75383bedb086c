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
from tcgraph.plan.plan import COMPUTE, REUSE, Plan, Recipe
from tcgraph.sampling import SamplerSettings


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


def _parse_float(arg: str, spec: str) -> float:
    try:
        return float(arg.rstrip("x"))
    except ValueError:
        raise TcgraphError(f"plan {spec!r}: {arg!r} is not a number") from None


def _no_options(name: str):
    def check(args: list[str], spec: str, options: dict) -> None:
        if options:
            raise TcgraphError(f"{', '.join(sorted(options))} do not apply to plan {name!r}; they are options of "
                               "learned plans (l2c, tokencache)")
    return check


def _parse_full(args, spec, options):
    _no_options("full")(args, spec, options)
    return FullConfig()


def _parse_fora(args, spec, options):
    _no_options("fora")(args, spec, options)
    return ForaConfig(_parse_int(args[0], spec) if args else 2)


L2C_OPTIONS = ("target_speedup", "lam", "threshold", "max_variants", "interval", "router", "calib_images", "epochs",
               "seed")


def _parse_l2c(args, spec, options):
    unknown = set(options) - set(L2C_OPTIONS)
    if unknown:
        raise TcgraphError(f"unknown l2c options {sorted(unknown)}; known: {', '.join(L2C_OPTIONS)}")
    opts = dict(options)
    if args:  # `l2c:2.5` is short for a target of 2.5x
        if opts.get("target_speedup") is not None:
            raise TcgraphError(f"plan {spec!r} already names a target; drop --target-speedup or the ':X'")
        opts["target_speedup"] = _parse_float(args[0], spec)
    router = opts.pop("router", None)
    if router is not None:
        learned = sorted(k for k in ("target_speedup", "lam", "max_variants", "interval", "calib_images", "epochs")
                         if opts.get(k) is not None)
        if learned:
            raise TcgraphError(f"--router imports a trained router; {', '.join(learned)} apply to learning one")
        return ("router", str(router), opts.get("threshold"))
    from tcgraph.plan.l2c import L2CConfig

    given = {k: v for k, v in opts.items() if v is not None}
    if given.get("max_variants") == 0:
        given["max_variants"] = None  # 0 = no cap
    if "target_speedup" not in given and "lam" not in given:
        given["target_speedup"] = DEFAULT_L2C_TARGET
    return L2CConfig(**given)


def _make_l2c(cfg, model_cfg: DiTConfig, settings: SamplerSettings, *, model=None, progress=None) -> Plan:
    if isinstance(cfg, tuple):  # an imported router
        from tcgraph.plan.l2c_import import DEFAULT_THRESHOLD, load_published_router_plan

        _, path, threshold = cfg
        return load_published_router_plan(path, model_cfg, settings,
                                          DEFAULT_THRESHOLD if threshold is None else threshold)
    if model is None:
        raise TcgraphError("learning a Learning-to-Cache router needs the model's weights, not only its config")
    from tcgraph.plan.l2c import make_l2c

    return make_l2c(cfg, model, settings, progress=progress)


DEFAULT_L2C_TARGET = 2.0

DEFAULT_TOKENCACHE_TARGET = 1.5
TOKENCACHE_OPTIONS = ("target_speedup", "tprr", "keep_ratio", "min_keep", "max_stale", "max_variants",
                      "calib_images", "epochs", "seed")


def _parse_tokencache(args, spec, options):
    unknown = set(options) - set(TOKENCACHE_OPTIONS)
    if unknown:
        raise TcgraphError(f"{', '.join(sorted(unknown))} do not apply to plan 'tokencache'; its options are "
                           f"{', '.join(TOKENCACHE_OPTIONS)}")
    if len(args) > 1:
        raise TcgraphError(f"plan {spec!r}: expected tokencache or tokencache:X (X = target speedup)")
    from tcgraph.plan.tokencache import TokenCacheConfig, parse_tprr

    given = {k: v for k, v in options.items() if v is not None}
    if args:  # `tokencache:1.5` is short for a target of 1.5x
        if "target_speedup" in given:
            raise TcgraphError(f"plan {spec!r} already names a target; drop --target-speedup or the ':X'")
        given["target_speedup"] = _parse_float(args[0], spec)
    given.setdefault("target_speedup", DEFAULT_TOKENCACHE_TARGET)
    if "tprr" in given:
        given["tprr"] = parse_tprr(given["tprr"])
    if given.get("max_variants") == 0:
        given["max_variants"] = None  # 0 = no cap
    return TokenCacheConfig(**given)


def _make_tokencache(cfg, model_cfg: DiTConfig, settings: SamplerSettings, *, model=None, progress=None) -> Plan:
    if model is None:
        raise TcgraphError("learning a TokenCache plan needs the model's weights, not only its config")
    from tcgraph.plan.tokencache import make_tokencache

    return make_tokencache(cfg, model, settings, progress=progress)


def _make_dynamic(cfg, model_cfg: DiTConfig, settings: SamplerSettings, *, model=None, progress=None) -> Plan:
    from tcgraph.plan.tokencache import to_dynamic

    return to_dynamic(_make_tokencache(cfg, model_cfg, settings, model=model, progress=progress))


COMBINED_OPTIONS = ("target_speedup", "keep_ratio", "min_keep", "max_variants", "calib_images", "epochs", "seed",
                    "l2c_share")


def _parse_combined(args, spec, options):
    unknown = set(options) - set(COMBINED_OPTIONS)
    if unknown:
        raise TcgraphError(f"{', '.join(sorted(unknown))} do not apply to plan 'tokencache+l2c'; its options are "
                           f"{', '.join(COMBINED_OPTIONS)}")
    from tcgraph.plan.combined import CombinedConfig

    given = {k: v for k, v in options.items() if v is not None}
    if args:
        if "target_speedup" in given:
            raise TcgraphError(f"plan {spec!r} already names a target; drop --target-speedup or the ':X'")
        given["target_speedup"] = _parse_float(args[0], spec)
    if given.get("max_variants") == 0:
        given["max_variants"] = None
    return CombinedConfig(**given)


def _make_combined(cfg, model_cfg: DiTConfig, settings: SamplerSettings, *, model=None, progress=None) -> Plan:
    if model is None:
        raise TcgraphError("learning a combined plan needs the model's weights, not only its config")
    from tcgraph.plan.combined import make_combined

    return make_combined(cfg, model, settings, progress=progress)


# name -> (parse(args, spec, options) -> config, make(config, model_cfg, settings, *, model, progress) -> Plan)
PLANNERS: dict[str, tuple[Callable, Callable]] = {
    "full": (_parse_full, lambda cfg, m, s, **_: make_full(cfg, m, s)),
    "fora": (_parse_fora, lambda cfg, m, s, **_: make_fora(cfg, m, s)),
    "l2c": (_parse_l2c, _make_l2c),
    "tokencache": (_parse_tokencache, _make_tokencache),
    "tokencache+l2c": (_parse_combined, _make_combined),
    "dynamic": (_parse_tokencache, _make_dynamic),
}

PLAN_HELP = ("full | fora:N (reuse every branch for N-1 of every N steps) | l2c[:X] (Learning-to-Cache: a router "
             f"learned for a predicted X-times speedup, default {DEFAULT_L2C_TARGET}; or --router FILE) | "
             "tokencache[:X] (TokenCache: learned token pruning per block on a two-phase round-robin schedule, for "
             f"a predicted X-times speedup, default {DEFAULT_TOKENCACHE_TARGET}; --tprr b,K1,K2, --keep-ratio, --min-keep) | "
             "tokencache+l2c[:X] (both: L2C branch reuse, then token pruning of the branches it computes) | "
             "dynamic[:X] (tokencache's schedule and token counts, tokens chosen per sample in the graph)")


def make_plan(spec: str, model: DiTConfig, settings: SamplerSettings, *, weights=None, progress=None,
              **options) -> Plan:
    """Build a plan from a spec such as `full`, `fora:3` or `l2c:2.5`.

    `weights` is the DiT itself, for learned planners; `options` are planner options (None =
    not given), e.g. `target_speedup`, `lam`, `max_variants`, `router` for l2c; `target_speedup`,
    `tprr`, `keep_ratio`, `min_keep`, `max_stale`, `max_variants` for tokencache.
    """
    name, *args = spec.split(":")
    if name not in PLANNERS:
        raise TcgraphError(f"unknown plan {spec!r}; available: {PLAN_HELP}")
    parse, make = PLANNERS[name]
    if settings.resolution != model.input_size:
        raise TcgraphError(
            f"resolution {settings.resolution} does not match the model's input size {model.input_size}"
        )
    options = {k: v for k, v in options.items() if v is not None}
    return make(parse(args, spec, options), model, settings, model=weights, progress=progress)
