"""Runtime overhead on CPU: ONNX Runtime with one session for all variants vs one per variant.

    python benchmarks/bench_runtime.py                                   # demo model
    python benchmarks/bench_runtime.py --model DiT-S/2 --batch 2 --images 2   # 256 tokens, random weights

One process, every plan's artifact folder loaded under every mode at once, timed
round-robin (eager PyTorch, then each (mode, plan) pair, then again): a shared machine
drifts, and interleaving spreads the drift over all rows alike. Medians of `--repeats`.

Modes (`--modes`): `one` (OrtRunner's default: the variants behind `If` nodes in one
session, runtime/ort/combined.py), `one-lean` (the same without pre-packed weights),
`per-variant` (one session per variant over shared
weights, the runner's default before), `plain` (one session per variant, each with its own
pre-packed weights), `torch` (the variants' torch programs: the reference for how little
alternating between variants should cost).

Measured:
- the alternation penalty, directly: the step time of the fora:2 plan's computing variant
  run alone (the same feeds again and again) vs alternating with its reusing variant (only
  the computing variant's calls are timed); medians of 4 blocks of `--calls` calls of
  each kind, in turn;
- whole sampling runs of every plan (`run_batches`, as `tcgraph sample` runs them):
  realized speedup = the same mode's `full` / the plan's median, predicted = the plan's FLOP
  ratio (`plan_flops`), and their ratio;
- eager PyTorch `full` (tcgraph's own DiT, same sampler, noise, labels) beside it, and each
  mode's `full` relative to it.

Plans: `full` and `fora:N` from `make_plan`; learned-planner names (`l2c:X`, `tokencache:X`,
`dynamic:X`, `tokencache+l2c:X`) are the planners' structural plans (their shapes without
learning, benchmarks/bench_tokencache.structural_plans): speed depends on the shape only.
Writes JSON and a markdown table (`--out` without suffix).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_plans import benchmark_model, write_result  # noqa: E402
from bench_tokencache import speed_plans  # noqa: E402

from tcgraph import api  # noqa: E402
from tcgraph.errors import TcgraphError  # noqa: E402
from tcgraph.export.artifact import load_artifact  # noqa: E402
from tcgraph.plan import plan_flops  # noqa: E402
from tcgraph.runtime.dispatch import ScheduleDispatcher  # noqa: E402
from tcgraph.sampling import SamplerSettings, make_noise, run_batches, sampler_for  # noqa: E402

DEFAULT_PLANS = "full,fora:2,fora:3,l2c:2,tokencache:2,dynamic:2,tokencache+l2c:2"
MODES = {
    "one": ("ort", {}),
    "one-lean": ("ort", {"prepack": False}),
    "per-variant": ("ort", {"one_session": False}),
    "plain": ("ort", {"one_session": False, "share_weights": False}),
    "torch": ("torch", {}),
}


BLOCKS = 4  # alternation penalty: blocks of `calls` calls of each kind, interleaved


def alternation(runner, plan, calls: int) -> dict:
    """Step time of the computing variant alone vs alternating with the reusing one (fora:2):
    medians over BLOCKS blocks of each kind in turn."""
    schedule = plan.schedule()
    first, second = schedule[0], schedule[1]
    dispatch = ScheduleDispatcher.for_plan(runner, plan)
    cfg = runner.artifact.model_config
    b = plan.settings.model_batch
    x = torch.randn(b, cfg.in_channels, cfg.input_size, cfg.input_size)
    t = torch.full((b,), 500)
    y = torch.zeros(b, dtype=torch.long)
    dispatch.reset()
    dispatch(0, x, t, y)  # writes the caches the reusing variant reads
    inputs = runner.io_names()
    feeds_first = {"x": x, "t": t, "y": y}
    feeds_second = {**feeds_first, **{n: dispatch.caches[n] for n in inputs[second][0][3:]}}

    def timed(alternate: bool) -> list[float]:
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            runner.run(first, feeds_first)
            times.append(time.perf_counter() - t0)
            if alternate:
                runner.run(second, feeds_second)
        return times

    timed(True)  # warm-up
    alone, alternating = [], []
    for _ in range(BLOCKS):  # blocks of each kind in turn: the machine's drift hits both alike
        alone += timed(False)
        alternating += timed(True)
    alone, alternating = statistics.median(alone) * 1e3, statistics.median(alternating) * 1e3
    return {"alone_ms": alone, "alternating_ms": alternating, "penalty": alternating / alone}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits", help="'digits' (trained) or a config name (random weights)")
    ap.add_argument("--plans", default=DEFAULT_PLANS)
    ap.add_argument("--modes", default="one,one-lean,per-variant,torch", help=f"comma list of {', '.join(MODES)}")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--images", type=int, default=8, help="images per timed run (whole batches)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calls", type=int, default=30, help="timed calls for the alternation penalty")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None,
                    help="output path without suffix (default benchmarks/results/runtime-<model>)")
    ap.add_argument("--report", type=Path, default=None, help="only rewrite the table of this earlier run's JSON")
    args = ap.parse_args(argv)
    if args.report:
        rewrite(args.report)
        return json.loads(args.report.read_text())
    modes = [m.strip() for m in args.modes.split(",")]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise TcgraphError(f"unknown modes {unknown}; choose from {', '.join(MODES)}")

    model = benchmark_model(args.model, args.seed)
    cfg = model.config
    settings = SamplerSettings(num_steps=args.steps, cfg_scale=args.guidance, batch=args.batch,
                               resolution=cfg.input_size)
    names = [p.strip() for p in args.plans.split(",")]
    if names[0] != "full":
        names = ["full"] + [n for n in names if n != "full"]
    if "fora:2" not in names:
        names.append("fora:2")  # the alternation penalty is measured on it
    plans = speed_plans(model, settings, names)
    config = {"model": args.model, "steps": args.steps, "guidance": args.guidance, "batch": args.batch,
              "images": args.images, "repeats": args.repeats, "calls": args.calls, "modes": modes,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "python": sys.version.split()[0], "torch": torch.__version__,
              "command": "python benchmarks/bench_runtime.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(config), flush=True)

    sampler = sampler_for(settings, cfg)
    labels = [i % cfg.num_classes for i in range(args.images)]
    noise = make_noise(len(labels), cfg.in_channels, settings.resolution, args.seed)
    rows, runs, penalties = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        for i, (name, plan) in enumerate(plans.items()):
            art = load_artifact(api.transform(model, plan, Path(tmp) / f"p{i}", progress=False, check=False))
            predicted = plan_flops(cfg, plan)["predicted_speedup"]
            for mode in modes:
                backend, options = MODES[mode]
                runner = stack.enter_context(api.make_runner(backend, art, **options))
                dispatch = ScheduleDispatcher.for_plan(runner, plan)
                run = functools.partial(run_batches, dispatch, dispatch.reset, sampler, labels, noise,
                                        settings.batch, args.seed)
                run()  # warm-up
                runs[(mode, name)] = run
                rows.append({"mode": mode, "plan": name, "variants": len(plan.variants()),
                             "predicted_speedup": predicted})
                if name == "fora:2":
                    penalties[mode] = alternation(runner, plan, args.calls)
                    print(json.dumps({"mode": mode, "alternation": penalties[mode]}), flush=True)
        runs[("eager", "full")] = lambda: api.sample_eager(model, settings, labels, args.seed)
        times = {key: [] for key in runs}
        for r in range(args.repeats):
            for key, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{args.repeats} done", flush=True)
    for row in rows:
        row["times_s"] = times[(row["mode"], row["plan"])]
    result = derive({"config": config, "eager_times_s": times[("eager", "full")], "alternation": penalties,
                     "rows": rows})
    out = args.out or Path(__file__).parent / "results" / f"runtime-{args.model.replace('/', '')}"
    return write_result(result, out, format_table(result))


def derive(result: dict) -> dict:
    """Medians and speedups from the raw times. `realized_speedup` = the mode's `full` median over
    the plan's; `paired_speedup` = the median over rounds of (that round's `full` / that round's
    plan): the machine drifts between rounds, and a round's rows ran minutes apart at most."""
    eager = result["eager_times_s"]
    result["eager_full_median_s"] = statistics.median(eager)
    rows = result["rows"]
    full = {row["mode"]: row["times_s"] for row in rows if row["plan"] == "full"}
    for row in rows:
        times, ref = row["times_s"], full[row["mode"]]
        row["median_s"] = statistics.median(times)
        row["realized_speedup"] = statistics.median(ref) / row["median_s"]
        row["realized_over_predicted"] = row["realized_speedup"] / row["predicted_speedup"]
        row["paired_speedup"] = statistics.median(f / t for f, t in zip(ref, times))
        row["paired_over_predicted"] = row["paired_speedup"] / row["predicted_speedup"]
        row["vs_eager_full"] = row["median_s"] / result["eager_full_median_s"]
        row["paired_vs_eager"] = statistics.median(t / e for t, e in zip(times, eager))
        row["spread"] = (max(times) - min(times)) / row["median_s"]
    return result


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [f"Runtime overhead, {c['model']}: DDIM {c['steps']}, guidance {c['guidance']}, batch {c['batch']}, "
             f"{c['images']} images, median of {c['repeats']} interleaved runs, {c['threads']} threads "
             f"({c['machine']}); eager PyTorch `full` {result['eager_full_median_s']:.3f} s",
             f"`{c['command']}`", "",
             "| mode | alone (ms/step) | alternating (ms/step) | penalty |", "|---|---|---|---|"]
    for mode, a in result["alternation"].items():
        lines.append(f"| {mode} | {a['alone_ms']:.2f} | {a['alternating_ms']:.2f} | {a['penalty']:.2f}x |")
    lines += ["", "| mode | plan | variants | time (s) | spread | vs eager full (paired) | realized | paired | "
              "predicted | realized/predicted | paired/predicted |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['mode']} | {r['plan']} | {r['variants']} | {r['median_s']:.3f} | {r['spread']:.0%} "
                     f"| {r['vs_eager_full']:.2f}x ({r['paired_vs_eager']:.2f}x) | {r['realized_speedup']:.2f}x "
                     f"| {r['paired_speedup']:.2f}x | {r['predicted_speedup']:.2f}x | "
                     f"{r['realized_over_predicted']:.2f} | {r['paired_over_predicted']:.2f} |")
    lines += ["", "spread = (slowest - fastest) / median of the row's runs; paired = the median over rounds of the "
              "round's ratio (drift between rounds cancels)."]
    return "\n".join(lines)


def rewrite(path: Path) -> None:
    """Recompute the derived columns and the table of an earlier run's JSON (`--report`)."""
    result = derive(json.loads(path.read_text()))
    path.write_text(json.dumps(result, indent=1))
    path.with_suffix(".md").write_text(format_table(result) + "\n")
    print(format_table(result))


if __name__ == "__main__":
    main()
