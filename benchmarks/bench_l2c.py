"""Learning-to-Cache on the demo model: learned plans beside FORA at matched compute.

    python benchmarks/bench_l2c.py                       # targets 1.5, 2, 2.5, 2.89 (= fora:3)

One calibration (random noise and labels, DDIM 50, guidance 2) serves every target. For
each target the l2c planner searches interval and λ (`tcgraph.plan.planners.l2c`); reported per
target: the chosen interval and λ, training time, the held-out error of the learned plan
against an untrained router's plan at the same predicted speedup, the soft objective on
held-out trajectories before and after training, and a variant-cap sweep (held-out
error per cap, the data behind `DEFAULT_MAX_VARIANTS`). Then `full`, `fora:N` and the
learned plans are exported and timed together on ONNX Runtime CPU (bench_plans'
round-robin), with PSNR/SSIM against `full`'s samples, class accuracy and digits-FD.
Writes JSON, a markdown table and a heatmap PNG per learned plan.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_plans import compare_plans, format_table, labels_for, with_baselines  # noqa: E402

from tcgraph import api  # noqa: E402
from tcgraph.calibrate import calibrate  # noqa: E402
from tcgraph.inspection.pictures import draw_heatmap  # noqa: E402
from tcgraph.plan import plan_flops  # noqa: E402
from tcgraph.plan.learning.evaluate import plan_error, speedup_of  # noqa: E402
from tcgraph.plan.planners.l2c import (  # noqa: E402
    DEFAULT_MAX_VARIANTS,
    L2CConfig,
    init_logits,
    make_l2c,
    recipes_for_target,
    soft_loss,
)
from tcgraph.sampling import SamplerSettings  # noqa: E402

CAPS = (2, 3, 4, 6, 8, None)


def router_logits(plan) -> torch.Tensor:
    """The learned logits back from the plan's recorded probabilities (full-step rows 0)."""
    S, depth = plan.settings.num_steps, plan.depth
    logits = torch.zeros(S, depth, 2)
    for s, rows in plan.params["router_probs"].items():
        p = torch.tensor(rows).clamp(1e-4, 1 - 1e-4)
        logits[int(s)] = torch.log(p / (1 - p))
    return logits


def l2c_diagnostics(model, held, plan, png_dir: Path) -> dict:
    """For a learned l2c plan: held-out error against an untrained router's plan at the same
    target, the soft objective before/after training, a variant-cap sweep, a heatmap PNG."""
    cfg, p = model.config, plan.params
    k, lam, target = p["interval"], p["lambda"], p["target_speedup"]
    logits = router_logits(plan)
    init = init_logits(plan.settings.num_steps, cfg.depth, p["calibration"]["seed"])
    untrained = recipes_for_target(cfg, torch.sigmoid(init), k, target, p["max_variants"])
    caps = []
    for cap in CAPS:
        rec = recipes_for_target(cfg, torch.sigmoid(logits), k, target, cap)
        caps.append({"max_variants": cap, "variants": len(set(rec)), "predicted_speedup": speedup_of(cfg, rec),
                     "held_out_error": plan_error(model, held, rec)})
    png = draw_heatmap(plan, png_dir / f"l2c-{target}x-heatmap.png")
    return {
        "interval": k, "lambda": lam,
        "predicted_speedup": p["predicted_speedup"], "variants": len(plan.variants()),
        "held_out_error_trained": p["held_out_error"],
        "held_out_error_untrained": plan_error(model, held, untrained),
        "untrained_predicted_speedup": speedup_of(cfg, untrained),
        "soft_held_out_loss_untrained": soft_loss(model, held, k, init, lam),
        "soft_held_out_loss_trained": soft_loss(model, held, k, logits, lam),
        "search": p["search"], "cap_sweep": caps, "heatmap": str(png),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="1.5,2.0,2.5,2.89")
    ap.add_argument("--fora", default="2,3")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--calib-images", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--max-variants", type=int, default=None, help="variant cap (default: the planner's; 0 = none)")
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--classes", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "l2c-digits.json")
    args = ap.parse_args(argv)

    model = api.load_dit("digits")
    cfg = model.config
    settings = SamplerSettings(num_steps=args.steps, cfg_scale=2.0, batch=8, resolution=cfg.input_size)
    config = {"model": "digits", "steps": args.steps, "guidance": 2.0, "batch": 8, "threads": torch.get_num_threads(),
              "backend": "ort-cpu", "repeats": args.repeats, "calib_images": args.calib_images,
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "command": "python benchmarks/bench_l2c.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(config), flush=True)

    t0 = time.perf_counter()
    traj = calibrate(model, settings, args.calib_images, seed=0)
    calib_s = time.perf_counter() - t0
    base = L2CConfig(calib_images=args.calib_images, **({"epochs": args.epochs} if args.epochs else {}))
    train, held = traj.split(base.num_held_out)

    learned, l2c_rows = {}, []
    for target in [float(x) for x in args.targets.split(",")]:
        cap = {} if args.max_variants is None else {"max_variants": args.max_variants or None}
        lcfg = L2CConfig(target_speedup=target, calib_images=args.calib_images, epochs=base.epochs, **cap)
        t0 = time.perf_counter()
        plan = make_l2c(lcfg, cfg, settings, weights=model, traj=traj)
        train_s = time.perf_counter() - t0
        row = {"target": target, "train_s": train_s, **l2c_diagnostics(model, held, plan, args.out.parent)}
        print(json.dumps(row), flush=True)
        l2c_rows.append(row)
        learned[f"l2c:{target}"] = plan

    plans = with_baselines(cfg, settings, args.fora, learned)
    labels = labels_for(args.classes, args.per_class, cfg.num_classes)
    config["images"] = len(labels)
    result = compare_plans(model, settings, plans, labels, config, repeats=args.repeats, digits=True)
    result.update(calibration_s=calib_s, l2c=l2c_rows, default_max_variants=DEFAULT_MAX_VARIANTS,
                  fora_predicted={n: plan_flops(cfg, p)["predicted_speedup"] for n, p in plans.items()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(format_table(result))
    print(format_l2c(result))
    print(f"\nwrote {args.out}")
    return result


def format_l2c(result: dict) -> str:
    lines = [f"\ncalibration: {result['config']['calib_images']} images x {result['config']['steps']} steps "
             f"in {result['calibration_s']:.0f} s",
             "| target | interval | λ | train s | variants | predicted x | held-out err trained | untrained "
             "(same x) | soft loss trained | untrained |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["l2c"]:
        lines.append(f"| {r['target']} | {r['interval']} | {r['lambda']:.2e} | {r['train_s']:.0f} | {r['variants']} | "
                     f"{r['predicted_speedup']:.2f} | {r['held_out_error_trained']:.2e} | "
                     f"{r['held_out_error_untrained']:.2e} | {r['soft_held_out_loss_trained']:.2e} | "
                     f"{r['soft_held_out_loss_untrained']:.2e} |")
    lines += ["", "variant cap sweep (held-out error):",
              "| target | " + " | ".join(str(c or "none") for c in CAPS) + " |", "|---|" + "---|" * len(CAPS)]
    for r in result["l2c"]:
        lines.append(f"| {r['target']} | " + " | ".join(f"{c['held_out_error']:.2e} ({c['variants']}v)"
                                                          for c in r["cap_sweep"]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
