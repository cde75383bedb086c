"""The `adaptive` planner: every step gated, the threshold calibrated to a measured compute fraction."""
from __future__ import annotations

import pytest

from tcgraph.errors import TcgraphError
from tcgraph.models.official.dit import DiT, make_config, randomize_weights
from tcgraph.plan import make_plan
from tcgraph.plan.gate import FORCE_COMPUTE
from tcgraph.plan.planners.adaptive import AdaptiveConfig, fraction_range, measure
from tcgraph.sampling import SamplerSettings

STEPS = 12


@pytest.fixture(scope="module")
def model():
    cfg = make_config("DiT-S/2", input_size=8, depth=3, hidden_size=32, num_heads=2, in_channels=2,
                      num_classes=5, learn_sigma=True)
    return randomize_weights(DiT(cfg), std=0.05).eval()


def settings():
    return SamplerSettings(num_steps=STEPS, batch=2, cfg_scale=1.0, resolution=8)


def test_the_threshold_is_calibrated_to_the_measured_fraction(model):
    opts = dict(first=1, max_skips=3, warmup=2, final=1, calib_images=2)
    plan = make_plan("adaptive:0.75", model.config, settings(), weights=model, **opts)
    assert len(plan.variants()) == 1 and plan.gate.first == 1
    thresholds = plan.gate_thresholds
    assert thresholds[:2] == (FORCE_COMPUTE,) * 2 and thresholds[-1] == FORCE_COMPUTE
    threshold = plan.params["threshold"]
    assert all(t == threshold for t in thresholds[2:-1]) and threshold > 0
    got = plan.params["calibrated_fraction"]
    least, most = plan.params["fraction_range"]
    assert least <= got <= most and abs(got - 0.75) <= 0.1, got
    cfg = AdaptiveConfig(fraction=0.75, **opts)
    # the measured fraction falls as the threshold rises: a run with the calibrated one measures `got`
    assert measure(model, settings(), cfg, plan.gate, threshold) == pytest.approx(got)
    assert measure(model, settings(), cfg, plan.gate, threshold * 100) <= got <= \
        measure(model, settings(), cfg, plan.gate, threshold / 100)


def test_range_and_refusals(model):
    cfg = AdaptiveConfig(fraction=0.5, first=1, max_skips=3, warmup=2, final=1)
    least, most = fraction_range(settings(), cfg, 3)
    # 9 free steps: 3 skips then a compute, twice, and one skip: 7 skipped, 5 computed
    assert (least, most) == pytest.approx(((5 + 7 / 3) / STEPS, 1.0))
    with pytest.raises(TcgraphError, match="below the least"):
        make_plan("adaptive:0.2", model.config, settings(), weights=model, first=1, max_skips=3, warmup=2, final=1)
    with pytest.raises(TcgraphError, match="warmup"):
        AdaptiveConfig(order=2, warmup=2)
    plan = make_plan("adaptive", model.config, settings(), threshold=0.3, order=0, warmup=1)
    assert plan.params["threshold"] == 0.3 and plan.params["calibrated_fraction"] is None
