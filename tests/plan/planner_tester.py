"""The checks every registered planner must pass, as a mixin (diffusers' tester mixins are the model).

Subclass `PlannerTesterMixin` once per registered planner (tests/plan/test_planners.py) and
set `planner`, `spec`, `options` (small learning options keep it to seconds) and `target`
where the planner takes one. Each plan is made once per class, on the tiny DiT of
tests/conftest.py, with a `Recorder` for its progress.
"""
from __future__ import annotations

import json
import re

import pytest

from tcgraph.errors import TcgraphError, UsageError
from tcgraph.plan import PLANNERS, Plan, make_plan, plan_flops
from tcgraph.plan.learning.evaluate import speedup_of
from tcgraph.progress import Recorder
from tcgraph.sampling import SamplerSettings

SMALL = {"calib_images": 6, "epochs": 1}  # learning options that keep a learned plan to about a second

_PLANS: dict[type, tuple[Plan, Recorder]] = {}


class PlannerTesterMixin:
    planner: str  # the registered name
    spec: str  # the spec to plan with, e.g. "fora:3"
    options: dict = {}
    target: float | None = None  # the FLOP-predicted speedup the plan must reach, where the planner takes one
    steps = 8

    # ---- how the plan is made (override `make_options` for options that need files) -----

    def settings(self) -> SamplerSettings:
        return SamplerSettings(num_steps=self.steps, cfg_scale=2.0, batch=2, resolution=8)

    def make_options(self, tmp_path_factory) -> dict:
        return dict(self.options)

    @pytest.fixture
    def made(self, tiny_model, tmp_path_factory) -> tuple[Plan, Recorder]:
        key = type(self)
        if key not in _PLANS:
            recorder = Recorder()
            plan = make_plan(self.spec, tiny_model.config, self.settings(), weights=tiny_model, progress=recorder,
                             **self.make_options(tmp_path_factory))
            _PLANS[key] = (plan, recorder)
        return _PLANS[key]

    @pytest.fixture
    def plan(self, made) -> Plan:
        return made[0]

    # ---- the checks -----------------------------------------------------------------------

    def test_is_registered(self):
        assert self.planner in PLANNERS and self.spec.split(":")[0] == self.planner

    def test_plan_is_valid_for_the_model(self, plan, tiny_model):
        cfg = tiny_model.config
        plan.validate()
        assert plan.depth == cfg.depth and plan.num_tokens == cfg.num_tokens
        assert plan.settings == self.settings() and len(plan.recipes) == self.steps
        assert plan.recipes[0].is_full  # nothing is cached before the first step
        assert plan.planner.split(":")[0] == self.planner

    def test_meets_the_target(self, plan, tiny_model):
        cfg = tiny_model.config
        sp = speedup_of(cfg, plan.recipes)
        assert sp == pytest.approx(plan_flops(cfg, plan)["predicted_speedup"], rel=1e-12)
        if self.target is None:
            assert sp >= 1.0
        else:
            assert sp >= self.target
            if "predicted_speedup" in plan.params:
                assert plan.params["predicted_speedup"] == pytest.approx(sp, abs=1e-4)

    def test_json_round_trip(self, plan):
        back = Plan.from_dict(plan.to_dict())
        assert back == plan and back.schedule() == plan.schedule() and back.variants() == plan.variants()
        assert back.params == json.loads(json.dumps(plan.params))
        assert Plan.from_json(plan.to_json()).to_json() == plan.to_json()

    def test_compiles(self, plan, tiny_model):
        from tcgraph.compile import build_variants

        variants = build_variants(tiny_model, plan, check=True)
        assert len(variants) == len(plan.variants())

    def test_progress_is_reported(self, made):
        plan, recorder = made
        if PLANNERS[self.planner].learned and "router" not in plan.params:
            descs = [d for d, _, _ in recorder.phases]
            assert any(d.endswith("calibrate") for d in descs) and all(total >= 0 for _, total, _ in recorder.phases)
            assert any(notes for _, _, notes in recorder.phases)
            # the whole plan's phases announced up front, then numbered as they run
            [announced] = recorder.announced
            count = int(re.search(r"in (\d+) phases", announced).group(1))
            numbered = [d for d in descs if d.startswith("phase ")]
            assert numbered and all(re.fullmatch(rf"phase \d+ of {count}: .+", d) for d in numbered)
            assert [int(d.split()[1]) for d in numbered] == sorted({int(d.split()[1]) for d in numbered})
            assert numbered[0] == f"phase 1 of {count}: calibrate" and numbered[-1].startswith(f"phase {count} of")
            assert all(re.search(r"plan: about \d", n) for _, _, notes in recorder.phases[:1] for n in notes)

    def test_learning_needs_the_weights(self, tiny_config, tmp_path_factory):
        options = self.make_options(tmp_path_factory)
        if not PLANNERS[self.planner].learned or "router" in options:
            make_plan(self.spec, tiny_config, self.settings(), **options)  # the config is enough
            return
        with pytest.raises(TcgraphError, match="needs the model's weights"):
            make_plan(self.spec, tiny_config, self.settings(), **options)

    def test_unknown_option_names_the_valid_ones(self, tiny_config):
        with pytest.raises(UsageError, match=re.escape(f"bogus does not apply to plan '{self.planner}'")) as e:
            make_plan(self.spec, tiny_config, self.settings(), bogus=1)
        assert "its options are" in str(e.value) or "takes no options" in str(e.value)

    def test_extra_spec_part_is_refused(self, tiny_config):
        parts = len(PLANNERS[self.planner].short) + 1
        with pytest.raises(UsageError, match="expected"):
            make_plan(self.planner + ":2" * parts, tiny_config, self.settings())
