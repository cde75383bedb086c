"""benchmarks/bench_plans.py's shared learning: the same plans as `make_plan`, calibrated once."""
from __future__ import annotations

import pytest

from tcgraph import api
from tcgraph.plan import make_plan
from tcgraph.progress import Recorder
from tcgraph.sampling import SamplerSettings
from tests.benchmarks import load_script


@pytest.mark.slow  # ~10 s: each learned plan twice, at 3 steps and 3 calibration images
def test_shared_learning_makes_the_plans_of_make_plan():
    model = api.load_dit("digits")
    settings = SamplerSettings(num_steps=3, cfg_scale=2.0, batch=2, resolution=16, clip_x0=True)
    options = {"calib_images": 3, "epochs": 1}
    specs = ["fora:2", "l2c:2", "l2c:2.5", "tokencache:1.3", "tokencache:1.2"]
    recorder = Recorder()
    sharing = load_script("bench_plans").SharedLearning(model, settings, progress=recorder)
    got = {s: sharing.plan(s, **({} if s.startswith("fora") else options)) for s in specs}
    for s in specs:
        alone = make_plan(s, model.config, settings, weights=model, **({} if s.startswith("fora") else options))
        assert got[s].to_json() == alone.to_json(), s
    phases = [p[0] for p in recorder.phases]
    assert phases.count("calibrate") == 1 and phases.count("forecast weights") == 1
    assert phases.count("train predictor") == 1
    routers = [ticks for desc, _, ticks in recorder.phases if desc == "train router"]
    assert len(routers) == 2  # both targets search interval 3 only
    assert routers[0] and "reused" not in routers[0]  # the first target trains the router...
    assert routers[1] and set(routers[1]) == {"reused"}  # ...the second reuses it, its rounds ticked at once
