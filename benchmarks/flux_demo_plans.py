"""Plans on the FLUX-architecture demo ("digits-flux"): quality against `full` from the same noise,
prompted-digit accuracy, realized against predicted speedup, all through `tcgraph compare`.

    python benchmarks/flux_demo_plans.py                       # the table of docs/text-models.md
    python benchmarks/flux_demo_plans.py --plans full,fora:2 --per-digit 1 --steps 10 --out /tmp/x   # a quick look

For every plan: `tcgraph.transform("digits-flux", plan)` (learned planners calibrate on the demo's
own prompts), then `tcgraph.compare` against one `full` artifact of the same settings: the same
noise and prompts ("a handwritten <digit>", `--per-digit` images of each digit, the empty
negative prompt), ONNX Runtime on the CPU, `--repeats` timed runs of each side, medians. Realized
speedup = full's median / the plan's; predicted = the plan's FLOP ratio. Accuracy: the share of
images the digits classifier (`tcgraph.eval.judge`) reads as the prompted digit.

Writes JSON (the command line, versions, load average before and after) and a markdown table
(`--out` without suffix; default benchmarks/results/flux-demo-plans).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import tcgraph
from tcgraph import compare
from tcgraph.demos.digits_text import prompt_for
from tcgraph.errors import TcgraphError

ROOT = Path(__file__).resolve().parents[1]
PLANS = "full,fora:2,fora:3,taylor:2,taylor:3,taylor:4,l2c:2,l2c:3,l2c:4,tokencache:2,tokencache+l2c:2.5,adaptive:0.5"


def row(plan: str, r: dict, seconds: float) -> dict:
    acc = r["accuracy"] or {}
    return {"plan": plan, "predicted": r["predicted_speedup"], "realized": r["realized_speedup"],
            "ratio": r["realized_speedup"] / r["predicted_speedup"], "psnr": r["psnr"], "ssim": r["ssim"],
            "accuracy": acc.get("artifact"), "full_accuracy": acc.get("reference"),
            "time_s": r["time_s"]["artifact"], "full_time_s": r["time_s"]["reference"], "transform_s": seconds}


def table(rows: list[dict]) -> str:
    lines = ["| plan | predicted | realized | realized/predicted | PSNR vs full (dB) | SSIM | prompted-digit accuracy "
             "| transform (s) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        psnr = "identical" if r["psnr"] == float("inf") else f"{r['psnr']:.2f}"
        ssim = "—" if r["ssim"] is None else f"{r['ssim']:.4f}"
        acc = "—" if r["accuracy"] is None else f"{100 * r['accuracy']:.0f} %"
        lines.append(f"| {r['plan']} | {r['predicted']:.2f}x | {r['realized']:.2f}x | {r['ratio']:.2f} | {psnr} | {ssim} "
                     f"| {acc} | {r['transform_s']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plans", default=PLANS, help=f"comma list (default {PLANS})")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--per-digit", type=int, default=4, help="images of each digit (default 4: 40 images)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "flux-demo-plans")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = [prompt_for(d) for d in range(10)]
    load = [os.getloadavg()[0]]
    rows = []
    with tempfile.TemporaryDirectory(prefix="flux-demo-plans-") as tmp:
        settings = dict(steps=args.steps, guidance=args.guidance, batch=args.batch, progress=False)
        full = tcgraph.transform("digits-flux", "full", Path(tmp) / "full", **settings)
        for plan in args.plans.split(","):
            start = time.perf_counter()
            try:
                art = full if plan == "full" else tcgraph.transform("digits-flux", plan,
                                                                    Path(tmp) / plan.replace(":", "-"), **settings)
            except TcgraphError as e:  # a target out of reach: said in the output, the other plans go on
                print(f"{plan}: {e}", flush=True)
                continue
            seconds = time.perf_counter() - start
            r = compare.compare(art, full, prompts=prompts, per_class=args.per_digit, seed=args.seed,
                                repeats=args.repeats)
            rows.append(row(plan, r, seconds))
            print(f"{plan}: predicted {r['predicted_speedup']:.2f}x realized {r['realized_speedup']:.2f}x "
                  f"PSNR {r['psnr']:.2f} dB", flush=True)
            text = write(args, rows, [*load, os.getloadavg()[0]])  # after every plan: a stopped run keeps its rows
    print(text)
    return 0


def write(args, rows: list[dict], load: list[float]) -> str:
    """The JSON and markdown of the rows so far; returns the markdown."""
    info = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "rows": rows, "images": 10 * args.per_digit,
            "steps": args.steps, "guidance": args.guidance, "batch": args.batch, "repeats": args.repeats,
            "load_average": load, "torch": torch.__version__, "tcgraph": tcgraph.__version__,
            "python": platform.python_version(), "cpus": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    text = (f"# digits-flux: plans against full\n\n{info['images']} images (prompts 'a handwritten <digit>', "
            f"{args.per_digit} per digit), {args.steps} steps, guidance {args.guidance}, batch {args.batch}, ORT on "
            f"{os.cpu_count()} CPUs, medians of {args.repeats} runs; load average {load[0]:.1f} before, {load[-1]:.1f} "
            f"after.\n\n`{info['command']}`\n\n{table(rows)}\n")
    args.out.with_suffix(".md").write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
