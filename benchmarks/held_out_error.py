"""Held-out teacher-forced error (`plan.evaluate.plan_error`) of fixed plans, on the same
calibration the learned planners use (demo model, DDIM 50, guidance 2, 48 images from seed 0,
the last 16 held out), so FORA can be compared with the learned plans' `held_out_error`.

    python benchmarks/held_out_error.py --plans fora:2,fora:3
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tcgraph import api
from tcgraph.calibrate import calibrate
from tcgraph.plan import make_plan
from tcgraph.plan.learning.evaluate import plan_error, speedup_of
from tcgraph.plan.planners.l2c import L2CConfig
from tcgraph.sampling import SamplerSettings


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", default="fora:2,fora:3")
    ap.add_argument("--calib-images", type=int, default=48)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "held-out-error.json")
    args = ap.parse_args(argv)
    model = api.load_dit("digits")
    settings = SamplerSettings(num_steps=50, cfg_scale=2.0, batch=8, resolution=model.config.input_size)
    traj = calibrate(model, settings, args.calib_images, seed=0)
    _, held = traj.split(L2CConfig(calib_images=args.calib_images).num_held_out)
    rows = []
    for spec in args.plans.split(","):
        plan = make_plan(spec, model.config, settings)
        rows.append({"plan": spec, "predicted_speedup": speedup_of(model.config, plan.recipes),
                     "held_out_error": plan_error(model, held, plan.recipes)})
        print(json.dumps(rows[-1]), flush=True)
    result = {"command": "python benchmarks/held_out_error.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
