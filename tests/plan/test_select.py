"""The final choice of the learned planners: by whole sampling runs, and by a quality floor (--min-psnr)."""
from __future__ import annotations

import pytest

from tcgraph.calibrate import calibrate
from tcgraph.errors import TcgraphError
from tcgraph.plan import make_plan
from tcgraph.plan.learning.evaluate import speedup_of
from tcgraph.plan.learning.select import choose
from tcgraph.plan.planners.l2c import L2CConfig, make_l2c
from tcgraph.sampling import SamplerSettings

STEPS = 8


def settings():
    return SamplerSettings(num_steps=STEPS, cfg_scale=2.0, batch=2, resolution=8)


def test_choose_takes_the_best_or_the_fastest_that_meets_the_floor(tiny_config):
    plans = {n: make_plan(f"fora:{n}", tiny_config, settings()) for n in (2, 3, 4)}
    scored = [(40.0, "fora:2", plans[2]), (38.5, "fora:3", plans[3]), (31.0, "fora:4", plans[4])]
    assert choose(scored, None, tiny_config)[1] == "fora:2"
    assert choose(scored, 38.5, tiny_config)[1] == "fora:3"  # the bound itself meets it
    assert choose(scored, 20.0, tiny_config)[1] == "fora:4"
    with pytest.raises(TcgraphError, match=r"--min-psnr 45.0 dB .* best is fora:2 at 40.00 dB"):
        choose(scored, 45.0, tiny_config)


@pytest.fixture
def traj(tiny_model):
    # l2c's split of 6 images holds out 2: the Grams of both parts come with the calibration
    return calibrate(tiny_model, settings(), num_images=6, seed=0, grams_at=4)


def _plan(model, traj, routers, **options):
    cfg = L2CConfig(calib_images=6, epochs=1, max_variants=3, **options)
    return make_l2c(cfg, model.config, settings(), weights=model, traj=traj, routers=routers)


def test_min_psnr_keeps_the_fastest_candidate_that_meets_it(tiny_model, traj):
    routers: dict = {}  # one training for every call below (same trajectories and options)
    best = _plan(tiny_model, traj, routers, target_speedup=1.4)
    scores = sorted({e["held_out_psnr"] for e in best.params["selection"]})
    assert len(best.params["selection"]) >= 3 and len(scores) >= 2
    assert best.params["held_out_psnr"] == scores[-1] and best.params["min_psnr"] is None
    for bound in (scores[0] - 1.0, scores[len(scores) // 2], scores[-1]):
        plan = _plan(tiny_model, traj, routers, target_speedup=1.4, min_psnr=bound)
        p = plan.params
        assert p["selection"] == best.params["selection"]  # the same candidates, sampled alike
        meeting = [e for e in p["selection"] if e["held_out_psnr"] >= bound]
        chosen = next(e for e in p["selection"] if e["candidate"] == p["selected"])
        # the recorded estimate meets the bound, and no candidate that meets it is faster
        assert p["held_out_psnr"] == chosen["held_out_psnr"] >= bound and p["min_psnr"] == bound
        assert chosen["predicted_speedup"] == max(e["predicted_speedup"] for e in meeting)
        assert p["predicted_speedup"] == pytest.approx(speedup_of(tiny_model.config, plan.recipes), abs=1e-4)
        assert p["predicted_speedup"] >= 1.4
    with pytest.raises(TcgraphError, match=rf"no candidate reaches --min-psnr .* best is .* at {scores[-1]:.2f} dB"):
        _plan(tiny_model, traj, routers, target_speedup=1.4, min_psnr=scores[-1] + 0.01)


def test_min_psnr_without_a_target_lets_fixed_plans_of_any_speed_compete(tiny_model, traj):
    routers: dict = {}
    plan = _plan(tiny_model, traj, routers, min_psnr=1.0)  # every candidate meets 1 dB
    p = plan.params
    assert plan.planner == "l2c (min PSNR 1 dB)"  # the floor chose it, not the router's default target
    labels = [e["candidate"] for e in p["selection"]]
    assert f"fora:{STEPS}" in labels  # far faster than the learned plan's default target
    chosen = next(e for e in p["selection"] if e["candidate"] == p["selected"])
    assert chosen["predicted_speedup"] == max(e["predicted_speedup"] for e in p["selection"])
    assert chosen["held_out_psnr"] == p["held_out_psnr"] >= 1.0
    # a floor that only the slower fixed plans meet: the scan stops at the first interval none of whose plans do
    fixed = [e for e in p["selection"] if e["candidate"].split(":")[0] in ("fora", "taylor")]
    bound = sorted(e["held_out_psnr"] for e in fixed)[len(fixed) // 2]
    p2 = _plan(tiny_model, traj, routers, min_psnr=bound).params
    chosen = next(e for e in p2["selection"] if e["candidate"] == p2["selected"])
    assert chosen["held_out_psnr"] == p2["held_out_psnr"] >= bound
    assert chosen["predicted_speedup"] == max(e["predicted_speedup"] for e in p2["selection"]
                                              if e["held_out_psnr"] >= bound)
    last = max(int(e["candidate"].split(":")[1]) for e in p2["selection"] if e in fixed)
    if last < STEPS:
        assert all(e["held_out_psnr"] < bound for e in p2["selection"]
                   if e["candidate"].split(":")[0] in ("fora", "taylor") and int(e["candidate"].split(":")[1]) == last)
        assert len(p2["selection"]) < len(p["selection"])
