"""Documented config fields: what a planner config says about each of its fields.

Every planner config is a frozen dataclass (diffusers' hook configs are the model). A field
made with `option(...)` is a *plan option*: `make_plan(spec, ..., name=value)` accepts it
and the CLI gets one `--kebab-case` flag for it (`registry.add_plan_arguments`), whose help
text is the field's `help` and whose default is read from the config itself. A field made
with `tuning(...)` is documented the same way but set only in code (learning rates, loss
weights): the defaults are what the benchmarks measured.
"""
from __future__ import annotations

from dataclasses import MISSING, Field, field, fields
from typing import Any, Callable

from tcgraph.errors import TcgraphError, UsageError


def option(default: Any, help: str, *, type: Callable | None = None, parse: Callable[[Any], Any] | None = None,
           flag: str | None = None, metavar: str | None = None, default_help: str | None = None) -> Any:
    """A user-facing config field.

    `type` converts the CLI's text (argparse `type`); `parse` turns an option value as given
    to `make_plan` or the CLI into the field's value (e.g. `0 = no cap` -> None); `flag` the
    CLI flag where it is not `--<field-with-dashes>` (`--lambda` for `lam`); `default_help`
    says the default in words where the field's own default (often None) does not.
    """
    meta = {"help": help, "option": True, "type": type, "parse": parse, "flag": flag, "metavar": metavar,
            "default_help": default_help}
    return field(default=default, metadata=meta)


def tuning(default: Any, help: str) -> Any:
    """A documented config field that only code sets."""
    return field(default=default, metadata={"help": help, "option": False})


# The options every learned planner shares, declared once.
CALIBRATION_HELP = "calibration images (random noise and labels), some held out"


def max_variants_option(default: int) -> Any:
    return option(default, "cap on distinct step graphs (0 = no cap)", type=int, parse=no_cap)


def calib_images_option() -> Any:
    return option(48, CALIBRATION_HELP, type=int)


def held_out_option() -> Any:
    return option(None, "calibration images held out to choose between candidates", type=int,
                  default_help="a third of --calib-images")


def on_off(value) -> bool:
    """`on`/`off` (also yes/no, true/false, 1/0, or a bool) as a bool."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("on", "yes", "true", "1"):
        return True
    if text in ("off", "no", "false", "0"):
        return False
    raise UsageError(f"expected on or off, got {value!r}")


def forecast_option() -> Any:
    return option(True, "let cached branches forecast from their history (least-squares weights) where that is "
                        "better on held-out calibration; off: reuse only, for ablations",
                  type=str, parse=on_off, metavar="on|off")


def compete_option() -> Any:
    return option(True, "let the fixed-interval plans (fora:N, taylor:N) of at least the target's speedup compete in "
                        "the final choice by held-out sampling runs; off: keep the learned plan",
                  type=str, parse=on_off, metavar="on|off")


def min_psnr_option() -> Any:
    return option(None, "quality floor: keep the fastest candidate of the final choice whose PSNR against the full "
                        "model's samples, on held-out calibration images, is at least DB (with a speedup target: "
                        "among plans that meet it; without: fixed-interval plans of any speed compete too)",
                  type=float, metavar="DB", default_help="none: the best PSNR at the target")


def max_cache_mb_option() -> Any:
    return option(None, "cap on the plan's cache and history memory in MB for its batch (learned planners)",
                  type=float, default_help="no cap")


def option_fields(config_type: type) -> list[Field]:
    """The user-facing fields of a config class, in declaration order."""
    return [f for f in fields(config_type) if f.metadata.get("option")]


def flag_of(f: Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def default_text(config_type: type, f: Field) -> str:
    """The default of field `f` as the help shows it: from the config itself."""
    if f.metadata.get("default_help"):
        return f.metadata["default_help"]
    value = getattr(config_type(), f.name) if f.default is MISSING else f.default
    return "none" if value is None else str(value)


def parse_option(f: Field, value: Any) -> Any:
    parse = f.metadata.get("parse")
    return parse(value) if parse is not None and value is not None else value


def no_cap(value: int) -> int | None:
    """`max_variants`: 0 means no cap."""
    return None if value == 0 else value


def parse_number(text: str, what: str, spec: str, kind: type = float) -> Any:
    """A number from a plan spec's `:` part (`l2c:2.5`, `l2c:2.5x`, `fora:3`)."""
    try:
        return kind(text.rstrip("x")) if kind is float else kind(text)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise UsageError(f"plan {spec!r}: {text!r} is not {noun} ({what})") from None


def check_options(name: str, config_type: type, options: dict, skip: tuple[str, ...] = ()) -> None:
    """Every option name must be a plan option of the planner `name` (less the config fields it `skip`s)."""
    known = [f.name for f in option_fields(config_type) if f.name not in skip]
    unknown = sorted(set(options) - set(known))
    if unknown:
        valid = f"its options are {', '.join(known)}" if known else "it takes no options"
        verb = "does" if len(unknown) == 1 else "do"
        raise UsageError(f"{', '.join(unknown)} {verb} not apply to plan {name!r}; {valid}")


def config_error(config_type: type, err: TypeError) -> TcgraphError:
    return TcgraphError(f"cannot build {config_type.__name__}: {err}")
