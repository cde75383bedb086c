"""The planner registry: plan spec strings (`full`, `fora:3`, `l2c:2.5`, …) -> Plan.

Each planner is one registered `Planner`: its name, a frozen config dataclass whose fields
are documented where they are declared (`plan.options.option`), which config fields the
spec's `:` parts fill (`fora:3` is interval 3, `l2c:2.5` a target speedup of 2.5), a one-line
help, and one `make(config, model_config, settings, *, weights, progress) -> Plan`; a learned
planner's `make` also takes `calibration_text` (the prompts a text-conditioned model
calibrates on, a `tcgraph.sampling.conditioning.Text`, or None).

Everything user-facing is derived from the registry: `make_plan`'s options, the CLI flags
(`add_plan_arguments`, `plan_options`), their help and defaults, and `PLAN_HELP`.
"""
from __future__ import annotations

import argparse
from dataclasses import Field, dataclass, fields
from typing import Any, Callable

from tcgraph.errors import TcgraphError, UsageError
from tcgraph.models.official.dit import DiT
from tcgraph.models.families import ModelConfig
from tcgraph.plan.planners.adaptive import AdaptiveConfig, make_adaptive
from tcgraph.plan.planners.combined import CombinedConfig, make_combined
from tcgraph.plan.planners.fixed import ForaConfig, FullConfig, TaylorConfig, make_fora, make_full, make_taylor
from tcgraph.plan.planners.l2c import L2CConfig, make_l2c
from tcgraph.plan.options import (
    check_options,
    config_error,
    default_text,
    flag_of,
    option_fields,
    parse_number,
    parse_option,
)
from tcgraph.plan.plan import Plan
from tcgraph.plan.planners.tokencache import TokenCacheConfig, make_dynamic, make_tokencache
from tcgraph.progress import QUIET, Progress
from tcgraph.sampling import SamplerSettings
from tcgraph.sampling.conditioning import Text

# make(config, model_config, settings, *, weights, progress[, calibration_text for learned planners]) -> Plan
MakeFn = Callable[..., Plan]


@dataclass(frozen=True)
class Planner:
    name: str
    config: type  # a frozen dataclass; every field has a default
    make: MakeFn
    usage: str  # the spec's form, e.g. "fora:N"
    summary: str  # one line; `{field}` is replaced by that field's default
    short: tuple[str, ...] = ()  # the config fields that the spec's `:` parts fill, in order
    learned: bool = False  # needs the model's weights (and calibrates) unless its config says otherwise;
    # its `make` takes `calibration_text` too
    skip: tuple[str, ...] = ()  # options of its (shared) config that this planner does not use
    # plans any layout (blocks whose branches differ, branches of several streams); else only
    # models whose blocks all have the same branches, each of image rows (tcgraph.models.layout)
    layouts: bool = False

    def help(self) -> str:
        config = self.config()
        defaults = {f.name: getattr(config, f.name) for f in fields(self.config)}
        return f"{self.usage} ({self.summary.format(**defaults)})"

    def configure(self, spec: str, args: list[str], options: dict[str, Any]) -> Any:
        """The config for `spec`'s `:` parts `args` and the given `options` (None = not given)."""
        given = {k: v for k, v in options.items() if v is not None}
        check_options(self.name, self.config, given, self.skip)
        if len(args) > len(self.short):
            raise UsageError(f"plan {spec!r}: expected {self.usage}, with at most {len(self.short)} ':' part"
                             f"{'s' if len(self.short) != 1 else ''}")
        by_name = {f.name: f for f in fields(self.config)}
        given = {k: parse_option(by_name[k], v) for k, v in given.items()}
        for name, text in zip(self.short, args):
            f = by_name[name]
            if name in given:
                raise UsageError(f"plan {spec!r} already names {name} ({text}); drop {flag_of(f)} or the ':{text}'")
            given[name] = parse_number(text, name, spec, f.metadata["type"])
        try:
            return self.config(**given)
        except TypeError as e:
            raise config_error(self.config, e) from None


PLANNERS: dict[str, Planner] = {}


def register(planner: Planner) -> Planner:
    if planner.name in PLANNERS:
        raise TcgraphError(f"a planner named {planner.name!r} is already registered")
    unknown = set(planner.short) - {f.name for f in option_fields(planner.config)}
    if unknown:
        raise TcgraphError(f"planner {planner.name!r}: spec parts {sorted(unknown)} are not options of its config")
    PLANNERS[planner.name] = planner
    return planner


register(Planner("full", FullConfig, make_full, "full", "no caching", layouts=True))
register(Planner("fora", ForaConfig, make_fora, "fora:N",
                 "reuse every branch for N-1 of every N steps, default N={interval}", short=("interval",),
                 layouts=True))
register(Planner("taylor", TaylorConfig, make_taylor, "taylor:N[:order]",
                 "a full step every N steps, every branch forecast at the others by a Taylor expansion of its "
                 "history, default N={interval}, order {order}", short=("interval", "order"), layouts=True))
register(Planner("l2c", L2CConfig, make_l2c, "l2c[:X]",
                 "Learning-to-Cache: a router learned for a predicted X-times speedup, default {target_speedup}; "
                 "or --lambda L, or --router FILE", short=("target_speedup",), learned=True, layouts=True))
register(Planner("tokencache", TokenCacheConfig, make_tokencache, "tokencache[:X]",
                 "TokenCache: learned token pruning per block on a two-phase round-robin schedule, for a predicted "
                 "X-times speedup, default {target_speedup}; --tprr b,K1,K2, --keep-ratio, --min-keep",
                 short=("target_speedup",), learned=True, layouts=True))
register(Planner("tokencache+l2c", CombinedConfig, make_combined, "tokencache+l2c[:X]",
                 "both: L2C branch reuse, then token pruning of the branches it computes, default X={target_speedup}",
                 short=("target_speedup",), learned=True, layouts=True))
register(Planner("dynamic", TokenCacheConfig, make_dynamic, "dynamic[:X]",
                 "tokencache's schedule and token counts, tokens chosen per sample in the graph",
                 short=("target_speedup",), learned=True, skip=("forecast", "compete", "max_cache_mb"),
                 layouts=True))
def _make_adaptive(config, model_config, settings, **kwargs) -> Plan:
    """`adaptive`, handed the registry to make a base plan given as a spec (the planner does not import it)."""
    return make_adaptive(config, model_config, settings, make_plan=make_plan, **kwargs)


register(Planner("adaptive", AdaptiveConfig, _make_adaptive, "adaptive[:F]",
                 "gated steps: the first blocks always compute, the others reuse or forecast while their change "
                 "stays under a threshold decided in the graph, calibrated to a measured compute fraction F, default "
                 "{fraction}", short=("fraction",), learned=True, layouts=True))


def plan_help() -> str:
    return " | ".join(p.help() for p in PLANNERS.values())


PLAN_HELP = plan_help()


def make_plan(spec: str, model_config: ModelConfig, settings: SamplerSettings, *, weights: DiT | None = None,
              progress: Progress = QUIET, calibration_text: Text | None = None, **options) -> Plan:
    """Build a plan from a spec such as `full`, `fora:3` or `l2c:2.5`.

    `weights` is the DiT itself, which learned planners need; `calibration_text` the prompt
    embeddings a learned planner calibrates a text-conditioned model on (required there; the
    planners that do not calibrate ignore it); `options` are plan options,
    the user-facing fields of the planner's config (None = not given; see `PLAN_OPTIONS`),
    e.g. `target_speedup`, `lam`, `max_variants`, `router` for l2c; `target_speedup`, `tprr`,
    `keep_ratio`, `min_keep`, `max_stale`, `max_variants` for tokencache.
    """
    name, *args = spec.split(":")
    if name not in PLANNERS:
        raise UsageError(f"unknown plan {spec!r}; available: {PLAN_HELP}")
    if not isinstance(progress, Progress):
        raise TypeError(f"progress must be a tcgraph.progress.Progress (QUIET, bars(...)), got {progress!r}")
    if settings.resolution != model_config.input_size:
        raise TcgraphError(
            f"resolution {settings.resolution} does not match the model's input size {model_config.input_size}"
        )
    if calibration_text is not None and not isinstance(calibration_text, Text):
        raise TypeError(f"calibration_text must be a tcgraph.sampling.conditioning.Text, got "
                        f"{type(calibration_text).__name__}")
    planner = PLANNERS[name]
    if not planner.layouts and not model_config.block_layout().is_default:
        able = ", ".join(p.name for p in PLANNERS.values() if p.layouts)
        raise UsageError(f"plan {name!r} is learned for models whose blocks all have the same branches of image "
                         f"tokens; this model's blocks differ or read several streams: use {able}")
    config = planner.configure(spec, args, options)
    extra = {"calibration_text": calibration_text} if planner.learned else {}
    return planner.make(config, model_config, settings, weights=weights, progress=progress, **extra)


#################################################################################
#                         Plan options on the command line                      #
#################################################################################


def plan_option_fields() -> dict[str, list[tuple[str, Field]]]:
    """option name -> [(planner, its config field)], over every registered planner."""
    out: dict[str, list[tuple[str, Field]]] = {}
    for p in PLANNERS.values():
        for f in option_fields(p.config):
            if f.name not in p.skip:
                out.setdefault(f.name, []).append((p.name, f))
    return out


PLAN_OPTIONS = tuple(plan_option_fields())


def _option_help(owners: list[tuple[str, Field]]) -> str:
    groups: dict[tuple[str, str], list[str]] = {}
    for planner, f in owners:
        groups.setdefault((f.metadata["help"], default_text(PLANNERS[planner].config, f)), []).append(planner)
    helps = list(dict.fromkeys(h for h, _ in groups))
    if len(helps) == 1:
        text = helps[0] + " (" + "; ".join(f"{', '.join(ps)}: default {d}" for (_, d), ps in groups.items()) + ")"
    else:
        text = "; ".join(f"{', '.join(ps)}: {h} (default {d})" for (h, d), ps in groups.items())
    return text.replace("%", "%%")


def add_plan_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """One `--flag` per plan option of any registered planner (default None = not given);
    read them back with `plan_options(args)`."""
    for name, owners in plan_option_fields().items():
        first = owners[0][1]
        kw: dict[str, Any] = {"dest": name, "default": None, "help": _option_help(owners)}
        if first.metadata.get("type") is not None:
            kw["type"] = first.metadata["type"]
        if first.metadata.get("metavar"):
            kw["metavar"] = first.metadata["metavar"]
        parser.add_argument(flag_of(first), **kw)


def plan_options(args: argparse.Namespace) -> dict[str, Any]:
    """The plan options given on the command line parsed by `add_plan_arguments`, for `make_plan`."""
    return {name: getattr(args, name) for name in PLAN_OPTIONS if getattr(args, name, None) is not None}
