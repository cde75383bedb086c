"""The planner registry: spec parsing, plan options from the configs, CLI flags and help."""
from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from tcgraph.errors import TcgraphError, UsageError
from tcgraph.plan import PLAN_HELP, PLAN_OPTIONS, PLANNERS, add_plan_arguments, make_plan, plan_options
from tcgraph.plan.planners.fixed import ForaConfig
from tcgraph.plan.planners.l2c import DEFAULT_TARGET, L2CConfig
from tcgraph.plan.options import option_fields
from tcgraph.plan.registry import Planner, register
from tcgraph.plan.planners.tokencache import TokenCacheConfig
from tcgraph.sampling import SamplerSettings

# Today's CLI flags (their names are kept across the registry refactor).
CLI_FLAGS = {"--target-speedup": "target_speedup", "--lambda": "lam", "--threshold": "threshold",
             "--max-variants": "max_variants", "--interval": "interval", "--router": "router",
             "--calib-images": "calib_images", "--tprr": "tprr", "--keep-ratio": "keep_ratio",
             "--min-keep": "min_keep"}


def settings(steps=6):
    return SamplerSettings(num_steps=steps, cfg_scale=2.0, batch=2, resolution=8)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_plan_arguments(p.add_argument_group("plan"))
    return p


def test_every_config_field_is_documented():
    for p in PLANNERS.values():
        for f in fields(p.config):
            if f.init:  # a field the planner derives itself (init=False: l2c's speedup_given) is no option
                assert f.metadata.get("help"), (p.name, f.name)
        p.config()  # every field has a default


def test_spec_short_arguments_fill_config_fields():
    assert PLANNERS["fora"].configure("fora:3", ["3"], {}) == ForaConfig(3)
    assert PLANNERS["fora"].configure("fora", [], {}) == ForaConfig(2)
    assert PLANNERS["l2c"].configure("l2c:2.5", ["2.5"], {}) == L2CConfig(target_speedup=2.5)
    assert PLANNERS["l2c"].configure("l2c:2.5x", ["2.5x"], {}).target_speedup == 2.5
    assert PLANNERS["l2c"].configure("l2c", [], {}).target_speedup == DEFAULT_TARGET
    assert PLANNERS["l2c"].configure("l2c", [], {"lam": 0.1}).target_speedup is None
    assert PLANNERS["tokencache"].configure("tokencache:1.5", ["1.5"], {"tprr": "4,2,2", "max_variants": 0}) == \
        TokenCacheConfig(target_speedup=1.5, tprr=(4, 2, 2), max_variants=None)
    assert PLANNERS["fora"].configure("fora", [], {"interval": 4}) == ForaConfig(4)


@pytest.mark.parametrize("spec, options, message", [
    ("fora:2:3", {}, "expected fora:N"),
    ("full:2", {}, "expected full"),
    ("l2c:2:3", {}, "expected l2c"),
    ("tokencache+l2c:2:3", {}, "expected tokencache"),
    ("fora:x", {}, "not an integer"),
    ("l2c:fast", {}, "not a number"),
    ("fora:3", {"interval": 3}, "already names interval"),
    ("full", {"interval": 3}, "it takes no options"),
    ("fora", {"lam": 1.0}, "its options are interval"),
    ("l2c", {"router": "r.pt", "epochs": 3}, "apply to learning"),
    ("l2c", {"target_speedup": 2.0, "lam": 0.1}, "not both"),
    ("magic", {}, "unknown plan"),
])
def test_spec_and_option_errors(tiny_config, spec, options, message):
    with pytest.raises(UsageError, match=message):
        make_plan(spec, tiny_config, settings(), **options)


def test_none_means_not_given(tiny_config):
    every = {name: None for name in PLAN_OPTIONS}  # what a CLI with no plan flags passes
    assert make_plan("fora:3", tiny_config, settings(), **every).schedule() == ["v0", "v1", "v1"] * 2


def test_progress_must_be_a_progress(tiny_config):
    with pytest.raises(TypeError, match="Progress"):
        make_plan("full", tiny_config, settings(), progress=lambda desc, total: (lambda: None))


def test_cli_flags_keep_their_names_and_come_from_the_configs():
    p = parser()
    actions = {a.option_strings[0]: a for a in p._actions if a.option_strings and a.dest != "help"}
    for flag, dest in CLI_FLAGS.items():
        assert actions[flag].dest == dest and actions[flag].default is None
    # one flag per user-facing field, shared by the planners that have it
    names = {f.name for q in PLANNERS.values() for f in option_fields(q.config)}
    assert {a.dest for a in actions.values()} == names == set(PLAN_OPTIONS)
    # help names the planners and the defaults, read from the dataclasses
    mv = actions["--max-variants"].help
    assert "l2c, tokencache+l2c: default 6" in mv and "tokencache, dynamic: default 8" in mv and "0 = no cap" in mv
    assert "default 48" in actions["--calib-images"].help
    assert f"default {L2CConfig().target_speedup}" in actions["--target-speedup"].help
    assert "default 1.5" in actions["--target-speedup"].help
    assert "fora" in actions["--interval"].help and "l2c" in actions["--interval"].help
    assert "lr" not in PLAN_OPTIONS and "mu" not in PLAN_OPTIONS  # tuning fields are set in code only


def test_plan_options_returns_the_given_ones():
    args = parser().parse_args(["--lambda", "0.1", "--max-variants", "0", "--tprr", "4,2,2", "--router", "r.pt"])
    assert plan_options(args) == {"lam": 0.1, "max_variants": 0, "tprr": "4,2,2", "router": "r.pt"}
    assert plan_options(parser().parse_args([])) == {}


def test_plan_help_is_generated_from_the_registry():
    for p in PLANNERS.values():
        assert p.usage in PLAN_HELP
    assert "default N=2" in PLAN_HELP and f"default {DEFAULT_TARGET}" in PLAN_HELP and "default 1.5" in PLAN_HELP


def test_register_refuses_duplicates_and_unknown_spec_parts():
    with pytest.raises(TcgraphError, match="already registered"):
        register(PLANNERS["full"])
    with pytest.raises(TcgraphError, match="not options"):
        register(Planner("fora2", ForaConfig, PLANNERS["fora"].make, "fora2:N", "", short=("steps",)))
    assert "fora2" not in PLANNERS
