"""Every registered planner through the same checks (`PlannerTesterMixin`), and one tester per planner."""
from __future__ import annotations

import torch
from torch import nn

from tcgraph.plan import PLANNERS
from tcgraph.plan.learning.evaluate import speedup_of

from tests.plan.planner_tester import SMALL, PlannerTesterMixin


class TestFull(PlannerTesterMixin):
    planner, spec = "full", "full"


class TestFora(PlannerTesterMixin):
    planner, spec = "fora", "fora:3"


class TestTaylor(PlannerTesterMixin):
    planner, spec = "taylor", "taylor:3"

    def test_forecasts_between_full_steps(self, plan):
        # full every 3 steps; reuse while one compute exists; forecast(2) (order 1) after
        assert [r.short().split()[0] for r in plan.recipes] == ["CC", "RR", "RR", "CC", "F2F2", "F2F2", "CC", "F2F2"]
        assert sorted(plan.weights) == [4, 5, 7] and len(plan.variants()) == 3


class TestTaylorOrder2(PlannerTesterMixin):
    planner, spec = "taylor", "taylor:2:2"

    def test_forecasts_between_full_steps(self, plan):
        assert [r.short().split()[0] for r in plan.recipes] == ["CC", "RR", "CC", "F2F2", "CC", "F3F3", "CC", "F3F3"]
        assert plan.history((0, "attn")) == 3 and len(plan.variants()) == 4


class TestL2CTarget(PlannerTesterMixin):
    planner, spec, target = "l2c", "l2c:1.6", 1.6
    options = {**SMALL, "max_variants": 3}


class TestL2CLambda(PlannerTesterMixin):
    planner, spec = "l2c", "l2c"
    options = {**SMALL, "lam": 0.0, "threshold": 0.5, "interval": 3}


class _Router(nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.prob = nn.Parameter(logits.clone())


class TestL2CImportedRouter(PlannerTesterMixin):
    planner, spec = "l2c", "l2c"

    def make_options(self, tmp_path_factory) -> dict:
        path = tmp_path_factory.getbasetemp() / "router-3x8.pt"
        if not path.exists():
            g = torch.Generator().manual_seed(0)
            logits = torch.randn(self.steps, 3, 2, generator=g) * 1.5 - 2.2  # both sides of the threshold 0.1
            routers = nn.ModuleList([_Router(row.reshape(-1)) for row in logits])
            torch.save({"routers": routers.state_dict()}, path)
        return {"router": path}


class TestTokenCache(PlannerTesterMixin):
    planner, spec, target = "tokencache", "tokencache:1.4", 1.4
    options = {**SMALL, "max_variants": 3}


class TestDynamic(PlannerTesterMixin):
    planner, spec = "dynamic", "dynamic:1.4"
    options = {**SMALL, "max_variants": 3}

    def test_meets_the_target(self, plan, tiny_model):
        # tokencache's plan meets the target; dynamic(k) adds its token score (2·N·D per branch)
        super().test_meets_the_target(plan, tiny_model)
        assert plan.params["predicted_speedup"] >= 1.4
        assert 1.0 < speedup_of(tiny_model.config, plan.recipes) < plan.params["predicted_speedup"]


class TestCombined(PlannerTesterMixin):
    planner, spec, target = "tokencache+l2c", "tokencache+l2c:1.8", 1.8
    options = {**SMALL, "max_variants": 3}


def _testers(cls) -> list[type]:
    return [t for sub in cls.__subclasses__() for t in [sub, *_testers(sub)]]


def test_every_registered_planner_has_a_tester():
    tested = {t.planner for t in _testers(PlannerTesterMixin)}
    assert tested == set(PLANNERS), f"planners without a PlannerTesterMixin subclass: {set(PLANNERS) - tested}"


class TestAdaptive(PlannerTesterMixin):
    planner, spec = "adaptive", "adaptive:0.8"
    options = {"calib_images": 2, "warmup": 2}

    def test_plan_is_valid_for_the_model(self, plan, tiny_model):
        plan.validate()  # every step is one gated step; the first computes (its threshold is below 0)
        assert len(plan.recipes) == self.steps and len(plan.variants()) == 1 and plan.gate is not None
        assert plan.gate_thresholds[0] < 0 and plan.depth == tiny_model.config.depth

    def test_progress_is_reported(self, made):
        _, recorder = made
        assert [d for d, _, _ in recorder.phases] == ["calibrate threshold"]
        assert all("fraction" in n for _, _, notes in recorder.phases for n in notes)
