"""Which indicator and which cheap action a gated step should use: each calibrated to the same measured
compute fraction, then sampled eagerly (the same semantics as the graph, `EagerGate`) and compared
with the full model, on noise of seed 1 (classes 0-9 x 4): not the images of the tables (seed 0), so
that choosing here does not tune the benchmark.

    python benchmarks/adaptive_indicators.py      # demo model, DDIM 50, guidance 2, fraction 0.35

Indicators (tcgraph.plan.gate): `step` sums the relative L1 change of the first blocks' output from
step to step since the last computing step (TeaCache's accumulation); `anchor` takes its change
against the last computing step (FirstBlockCache's). Cheap actions: reuse (order 0) or an order-1
forecast. Writes benchmarks/results/adaptive-indicators.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tcgraph import api  # noqa: E402
from tcgraph.eval import compare_samples  # noqa: E402
from tcgraph.plan import make_plan  # noqa: E402
from tcgraph.plan.planners.adaptive import EagerGate  # noqa: E402
from tcgraph.sampling import SamplerSettings, make_noise, run_batches, sampler_for  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fraction", type=float, default=0.35)
    ap.add_argument("--calib-images", type=int, default=16)
    ap.add_argument("--out", type=Path, default=RESULTS / "adaptive-indicators.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = api.load_dit("digits")
    cfg = model.config
    settings = SamplerSettings(num_steps=50, cfg_scale=2.0, batch=8, resolution=cfg.input_size)
    labels = [c for c in range(10) for _ in range(4)]
    noise = make_noise(len(labels), cfg.in_channels, settings.resolution, 1)
    sampler = sampler_for(settings, cfg)
    reference = api.sample_eager(model, settings, labels, 1)
    rows = []
    for indicator in ("step", "anchor"):
        for order in (0, 1):
            plan = make_plan(f"adaptive:{args.fraction}", cfg, settings, weights=model, indicator=indicator,
                             order=order, max_skips=8, warmup=2, final=1, calib_images=args.calib_images)
            eager = EagerGate(model, plan.gate, plan.gate_thresholds, cfg.depth)
            samples = run_batches(eager, eager.reset, sampler, labels, noise, settings.batch, 1)
            q = compare_samples(samples, reference)
            row = {"indicator": indicator, "cheap": "reuse" if order == 0 else "forecast order 1",
                   "threshold": plan.params["threshold"], "calibrated_fraction": plan.params["calibrated_fraction"],
                   "fraction": eager.fraction(), "psnr": q["psnr"], "ssim": q["ssim"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"config": {"model": "digits", "steps": 50, "guidance": 2.0, "images": len(labels), "noise_seed": 1,
                         "target_fraction": args.fraction, "first": 1, "max_skips": 8, "warmup": 2, "final": 1,
                         "command": "python benchmarks/adaptive_indicators.py " + " ".join(argv or sys.argv[1:])},
              "rows": rows}
    args.out.write_text(json.dumps(result, indent=1))
    lines = [f"demo model, DDIM 50, guidance 2, 40 images (noise seed 1), eager; every plan calibrated to a "
             f"measured compute fraction {args.fraction} on 16 calibration images; `{result['config']['command']}`",
             "", "| indicator | cheap action | threshold | fraction (calibration) | fraction (these images) | "
             "PSNR dB | SSIM |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['indicator']} | {r['cheap']} | {r['threshold']:.4g} | {r['calibrated_fraction']:.3f} | "
                     f"{r['fraction']:.3f} | {r['psnr']:.1f} | {r['ssim']:.4f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
