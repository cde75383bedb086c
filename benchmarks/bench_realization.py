"""Realized / predicted speedup before and after, one process, interleaved (forecast fusion, cheaper steps).

    python benchmarks/bench_realization.py                          # demo model, 40 images, DDIM 50, guidance 2
    python benchmarks/bench_realization.py --model DiT-S/2 --images 2 --batch 2 \\
        --plans fora:3,taylor:3,taylor:3:2 --repeats 3

Two sides of the same plans, timed in one process, round-robin (the order within each pair
alternates from round to round), the median of `--repeats` whole sampling runs per plan:

- `before`: forecasts emitted as `sum` (n multiplies and n - 1 adds per branch, then the gate),
  the ONNX Runtime session with every kernel pre-packing its weights (`prepack="all"`) and
  every graph optimizer on (`disabled_optimizers=()`): what the runner did before;
- `after`: the defaults (forecast weights folded into the gate, `prepack="once"`, the slow
  CPU fusions off, work every variant does alike in the combined session's top graph).

A plan without forecasts has the same graphs on both sides (one transform serves both).
Realized speedup = that side's `full` median / the plan's median; predicted = the plan's
FLOP-predicted speedup (`plan_flops`). Also: the largest difference between the two sides'
samples (float tolerance), PSNR against the same side's `full`, and the load average before
and after (a shared machine: ratios within one round are what to read). `l2c:X` and
`tokencache:X` are the plans learned on the demo in benchmarks/results/forecast-plans/ where
they exist, else the structural plans of benchmarks/bench_tokencache.py (speed only), as
`dynamic:X` always is. Writes JSON and a markdown table (`--out`, default
benchmarks/results/realization-<model>.json / .md).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_plans import benchmark_model, is_digits, time_runs  # noqa: E402
from tcgraph import api  # noqa: E402
from tcgraph.eval import compare_samples  # noqa: E402
from tcgraph.export.artifact import load_artifact  # noqa: E402
from tcgraph.plan import Plan, make_plan, plan_flops  # noqa: E402
from tcgraph.runtime.dispatch import ScheduleDispatcher  # noqa: E402
from tcgraph.sampling import SamplerSettings, make_noise, run_batches, sampler_for  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LEARNED = RESULTS / "forecast-plans"
DEMO_PLANS = ("fora:2,fora:3,fora:4,taylor:2,taylor:3,taylor:4,taylor:5,taylor:3:2,l2c:2,l2c:3,l2c:4,"
              "tokencache:2,dynamic:2")
forecast_pass = importlib.import_module("tcgraph.passes.forecast")
SIDES = {
    "before": {"emission": "sum", "runner": {"prepack": "all", "disabled_optimizers": ()}},
    "after": {"emission": None, "runner": {}},
}
PREPACK_SIDES = {"before": {"emission": None, "runner": {"prepack": "all"}}, "after": SIDES["after"]}


def load_plans(model, settings: SamplerSettings, specs: list[str]) -> dict[str, tuple[Plan, str]]:
    """spec -> (plan, where it came from)."""
    from bench_tokencache import speed_plans

    plans = {}
    for spec in specs:
        kind, _, arg = spec.partition(":")
        if kind in ("full", "fora", "taylor"):
            plans[spec] = make_plan(spec, model.config, settings), "fixed"
            continue
        saved = LEARNED / f"{kind}_{float(arg)}.json"
        if kind in ("l2c", "tokencache") and saved.is_file() and settings.num_steps == 50 and \
                model.config.num_tokens == 64:
            plans[spec] = Plan.from_json(saved.read_text()), f"learned ({saved.name})"
        else:
            plans[spec] = speed_plans(model, settings, [f"{kind}:{float(arg)}"])[f"{kind}:{float(arg)}"], "structural"
    return plans


def transform(model, plan: Plan, folder: Path, emission: str | None):
    old = forecast_pass.EMISSION
    forecast_pass.EMISSION = emission or old
    try:
        return load_artifact(api.transform(model, plan, folder, check=False, progress=False))
    finally:
        forecast_pass.EMISSION = old


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits")
    ap.add_argument("--plans", default=DEMO_PLANS)
    ap.add_argument("--images", type=int, default=40, help="images per run (classes round-robin)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-step", type=int, default=0, metavar="CALLS",
                    help="instead of sampling runs: CALLS interleaved calls of every variant on random feeds")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--prepack-only", action="store_true",
                    help="the sides differ in ONNX Runtime pre-packing alone: before prepack='all', after the default")
    args = ap.parse_args(argv)
    if args.prepack_only:
        SIDES.clear()
        SIDES.update(PREPACK_SIDES)
    if args.per_step:
        return per_step(args, argv)
    torch.set_num_threads(args.threads)
    model = benchmark_model(args.model, args.seed)
    cfg = model.config
    settings = SamplerSettings(num_steps=args.steps, cfg_scale=args.guidance, batch=args.batch,
                               resolution=cfg.input_size, clip_x0=True if is_digits(args.model) else None)
    specs = ["full"] + [p.strip() for p in args.plans.split(",") if p.strip() and p.strip() != "full"]
    labels = [i % cfg.num_classes for i in range(args.images)]
    command = "python benchmarks/bench_realization.py " + " ".join(argv if argv is not None else sys.argv[1:])
    config = {"model": args.model, "steps": args.steps, "guidance": args.guidance, "batch": args.batch,
              "images": args.images, "repeats": args.repeats, "threads": args.threads, "backend": "ort-cpu",
              "sides": {k: {"emission": v["emission"] or forecast_pass.EMISSION, **v["runner"]}
                        for k, v in SIDES.items()},
              "torch": torch.__version__, "command": command, "load_before": os.getloadavg(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(json.dumps(config), flush=True)
    plans = load_plans(model, settings, specs)
    sampler = sampler_for(settings, cfg)
    noise = make_noise(len(labels), cfg.in_channels, settings.resolution, args.seed)
    runs, samples = {}, {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        for i, (spec, (plan, _)) in enumerate(plans.items()):
            arts = {}
            for side, how in SIDES.items():
                if side != "before" and not any(r.forecasts() for r in plan.recipes):
                    arts[side] = arts["before"]  # no forecast: the same graphs
                else:
                    arts[side] = transform(model, plan, Path(tmp) / f"p{i}-{side}", how["emission"])
                runner = stack.enter_context(api.make_runner("ort", arts[side], intra_op_threads=args.threads,
                                                             **how["runner"]))
                dispatch = ScheduleDispatcher.for_plan(runner, plan)
                run = functools.partial(run_batches, dispatch, dispatch.reset, sampler, labels, noise,
                                        settings.batch, args.seed)
                samples[(spec, side)] = run()  # warm-up, and the samples compared
                runs[(spec, side)] = run
            print(f"loaded {spec}", flush=True)
        times = {key: [] for key in runs}
        for r in range(args.repeats):
            for spec in plans:
                for side in (SIDES if r % 2 == 0 else reversed(list(SIDES))):
                    times[(spec, side)].extend(time_runs(runs[(spec, side)], 1))
            print(f"round {r + 1}/{args.repeats} done, load {os.getloadavg()}", flush=True)
    config["load_after"] = os.getloadavg()
    rows = []
    for spec, (plan, source) in plans.items():
        row = {"plan": spec, "source": source, "variants": len(plan.variants()),
               "predicted_speedup": plan_flops(cfg, plan)["predicted_speedup"],
               "sides_max_abs_diff": (samples[(spec, "before")] - samples[(spec, "after")]).abs().max().item()}
        for side in SIDES:
            med = statistics.median(times[(spec, side)])
            full = statistics.median(times[("full", side)])
            row[side] = {"median_s": med, "times_s": times[(spec, side)], "realized_speedup": full / med,
                         "realized_over_predicted": full / med / row["predicted_speedup"],
                         "psnr": compare_samples(samples[(spec, side)], samples[("full", side)])["psnr"]}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in SIDES}), flush=True)
    result = {"config": config, "rows": rows}
    out = args.out or RESULTS / f"realization-{args.model.replace('/', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    table = format_table(result)
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return result


def per_step(args, argv) -> dict:
    """One call of every variant of each plan, before and after interleaved, median of `args.per_step`
    calls on random feeds; each variant's time also as a share of the same side's computing step."""
    import numpy as np

    from memory_sharing import variant_feeds

    torch.set_num_threads(args.threads)
    model = benchmark_model(args.model, args.seed)
    settings = SamplerSettings(num_steps=args.steps, cfg_scale=args.guidance, batch=args.batch,
                               resolution=model.config.input_size)
    specs = [p.strip() for p in args.plans.split(",") if p.strip()]
    command = "python benchmarks/bench_realization.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load, rows = os.getloadavg(), []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        for i, (spec, (plan, _)) in enumerate(load_plans(model, settings, specs).items()):
            steps = {vid: plan.schedule().count(vid) for vid in set(plan.schedule())}
            runners = {}
            for side, how in SIDES.items():
                art = transform(model, plan, Path(tmp) / f"p{i}-{side}", how["emission"])
                runners[side] = stack.enter_context(api.make_runner("ort", art, intra_op_threads=args.threads,
                                                                    **how["runner"]))
            times = {}
            for v in art.variants:
                feeds = {k: torch.from_numpy(a) for k, a in variant_feeds(v, np.random.default_rng(0)).items()}
                for side, r in runners.items():
                    times[(v.id, side)] = []
                    r.run(v.id, feeds)
                for c in range(args.per_step):
                    for side in (SIDES if c % 2 == 0 else reversed(list(SIDES))):
                        t0 = time.perf_counter()
                        runners[side].run(v.id, feeds)
                        times[(v.id, side)].append(time.perf_counter() - t0)
            full = art.variants[0].id  # step 0's variant: computes every branch
            for v in art.variants:
                row = {"plan": spec, "variant": v.id, "steps": steps.get(v.id, 0)}
                for side in SIDES:
                    med = statistics.median(times[(v.id, side)])
                    row[side] = {"median_ms": med * 1e3,
                                 "of_computing_step": med / statistics.median(times[(full, side)])}
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"config": {"model": args.model, "batch": args.batch, "calls": args.per_step, "threads": args.threads,
                         "command": command, "load_before": load, "load_after": os.getloadavg()}, "rows": rows}
    lines = [f"One call per variant, before and after interleaved, {args.model}, batch {args.batch} (guidance "
             f"doubles it), median of {args.per_step} calls, {args.threads} threads; load average {load[0]:.1f} "
             f"before, {os.getloadavg()[0]:.1f} after", f"`{command}`", "",
             "| plan | variant | steps | before ms | of computing step | after ms | of computing step |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        b, a = r["before"], r["after"]
        lines.append(f"| {r['plan']} | {r['variant']} | {r['steps']} | {b['median_ms']:.2f} | "
                     f"{b['of_computing_step']:.1%} | {a['median_ms']:.2f} | {a['of_computing_step']:.1%} |")
    table = "\n".join(lines)
    print(table)
    out = args.out or RESULTS / f"step-costs-{args.model.replace('/', '')}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    return result


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [f"Realized / predicted speedup, before and after, {c['model']}: DDIM {c['steps']}, guidance "
             f"{c['guidance']}, batch {c['batch']} ({c['images']} images), {c['backend']}, {c['threads']} threads, "
             f"median of {c['repeats']} interleaved rounds; load average {c['load_before'][0]:.1f} before, "
             f"{c['load_after'][0]:.1f} after (a shared 2-core machine)",
             f"`{c['command']}`", "",
             "| plan | plan from | variants | predicted x | before: s | realized x | real/pred | after: s | realized x "
             "| real/pred | after / before time | samples differ by | PSNR after dB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        b, a = r["before"], r["after"]
        lines.append(f"| {r['plan']} | {r['source']} | {r['variants']} | {r['predicted_speedup']:.2f} "
                     f"| {b['median_s']:.3f} | {b['realized_speedup']:.2f} | {b['realized_over_predicted']:.2f} "
                     f"| {a['median_s']:.3f} | {a['realized_speedup']:.2f} | {a['realized_over_predicted']:.2f} "
                     f"| {a['median_s'] / b['median_s']:.2f} | {r['sides_max_abs_diff']:.1e} | {a['psnr']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
