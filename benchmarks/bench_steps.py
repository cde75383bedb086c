"""One step of each variant of an artifact folder, timed alone: what a step costs beside its FLOPs.

    python benchmarks/bench_steps.py tcgraph-out/digits-text-fora2 --calls 40

Loads the folder with the ONNX Runtime runner, runs the schedule's step 0 (it writes the caches
and, for a text model, the text's keys and values), then calls each variant `--calls` times on
the same inputs, round-robin, and reports the median milliseconds of each beside its FLOP
share of a full step (`plan_flops`). Inputs are random at the plan's shapes (class 0, or random
text embeddings with a full mask): speed depends on the shapes only. Writes JSON (`--out`) and
prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from tcgraph import api
from tcgraph.export.artifact import load_artifact
from tcgraph.names import model_input_count
from tcgraph.plan import plan_flops
from tcgraph.runtime.dispatch import ScheduleDispatcher
from tcgraph.sampling.conditioning import as_inputs


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: print only)")
    args = ap.parse_args(argv)
    art = load_artifact(args.artifact)
    plan, cfg, s = art.plan, art.model_config, art.plan.settings
    b = s.model_batch
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, cfg.in_channels, s.resolution, s.resolution, generator=g)
    t = torch.full((b,), 500, dtype=s.timestep_dtype)
    y = ((torch.randn(b, s.text_length, cfg.caption_channels, generator=g), torch.ones(b, s.text_length))
         if s.text_length else torch.zeros(b, dtype=torch.long))
    flops = plan_flops(cfg, plan)
    with api.make_runner("ort", art) as runner:
        dispatch = ScheduleDispatcher.for_plan(runner, plan)
        dispatch.reset()
        dispatch(0, x, t, y)
        feeds = {}
        for step, vid in enumerate(plan.schedule()):
            if vid in feeds:
                continue
            inputs, _ = dispatch.io[vid]
            own = model_input_count(inputs)
            given = dispatch.step_feeds[step]
            feeds[vid] = {**dict(zip(inputs[:own], (x, t, *as_inputs(y)))),
                          **{n: given[n] if n in given else dispatch._read(n) for n in inputs[own:]}}
        times: dict[str, list[float]] = {vid: [] for vid in feeds}
        for _ in range(args.calls):
            for vid, f in feeds.items():
                t0 = time.perf_counter()
                dispatch.run(vid, f)
                times[vid].append(time.perf_counter() - t0)
    rows = [{"variant": vid, "median_ms": statistics.median(ts) * 1e3, "flop_fraction": flops["fraction"][vid],
             "times_s": ts} for vid, ts in times.items()]
    slowest = max(r["median_ms"] for r in rows)
    for r in rows:
        r["time_fraction"] = r["median_ms"] / slowest
    result = {"artifact": str(args.artifact), "plan": plan.planner, "calls": args.calls,
              "threads": torch.get_num_threads(),
              "command": "python benchmarks/bench_steps.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(format_table(result))
    return result


def format_table(result: dict) -> str:
    lines = [f"{result['plan']}: one step per variant, median of {result['calls']} calls; `{result['command']}`", "",
             "| variant | median ms | of the slowest | FLOPs of a full step |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['median_ms']:.2f} | {r['time_fraction']:.1%} | {r['flop_fraction']:.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
