"""The forecast emissions of passes/forecast.py side by side: one step of each variant, per backend.

    python benchmarks/forecast_emissions.py                          # demo model, taylor:3:2, batch 8
    python benchmarks/forecast_emissions.py --model DiT-S/2 --batch 2 --plan taylor:3

Transforms the plan once per emission (`gate`, `sum`, `stack`), loads every artifact on each
backend (`ort`: the runner's defaults; `torch`: the torch programs), then times one run of every
variant on random feeds, emissions interleaved round-robin, `--calls` rounds, and reports the
median per (backend, variant, emission). Writes JSON and a markdown table (`--out`).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_plans import benchmark_model  # noqa: E402
from bench_realization import transform  # noqa: E402
from memory_sharing import variant_feeds  # noqa: E402
from tcgraph import api  # noqa: E402
from tcgraph.plan import make_plan  # noqa: E402
from tcgraph.sampling import SamplerSettings  # noqa: E402

forecast_pass = importlib.import_module("tcgraph.passes.forecast")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits")
    ap.add_argument("--plan", default="taylor:3:2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backends", default="ort,torch")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = benchmark_model(args.model)
    settings = SamplerSettings(num_steps=50, cfg_scale=2.0, batch=args.batch, resolution=model.config.input_size)
    plan = make_plan(args.plan, model.config, settings)
    steps = collections.Counter(plan.schedule())
    command = "python benchmarks/forecast_emissions.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        arts = {e: transform(model, plan, Path(tmp) / e, e) for e in forecast_pass.EMISSIONS}
        load = os.getloadavg()
        for backend in args.backends.split(","):
            runners = {e: stack.enter_context(api.make_runner(backend, art, **(
                {"intra_op_threads": args.threads} if backend == "ort" else {}))) for e, art in arts.items()}
            first = next(iter(arts.values()))
            for spec in first.variants:
                if not any(i.name == "forecast.w" for i in spec.inputs):
                    continue
                feeds = variant_feeds(spec, np.random.default_rng(0))
                feeds = {k: torch.from_numpy(v) for k, v in feeds.items()}
                times = {e: [] for e in runners}
                for _ in range(3):
                    for e, r in runners.items():
                        r.run(spec.id, feeds)
                for _ in range(args.calls):
                    for e, r in runners.items():
                        t0 = time.perf_counter()
                        r.run(spec.id, feeds)
                        times[e].append(time.perf_counter() - t0)
                points = 1 + max((int(i.name.rsplit(".h", 1)[1]) for i in spec.inputs
                                  if i.name.rsplit(".h", 1)[-1].isdigit()), default=0)
                row = {"backend": backend, "variant": spec.id, "history_points": points, "steps": steps[spec.id],
                       **{f"{e}_ms": statistics.median(t) * 1e3 for e, t in times.items()}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {"config": {"model": args.model, "plan": args.plan, "batch": args.batch, "calls": args.calls,
                         "threads": args.threads, "command": command, "load_before": load,
                         "load_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M:%S")},
              "rows": rows}
    lines = [f"Forecast emissions, {args.model} {args.plan}, batch {args.batch} (guidance doubles it), one step of "
             f"each forecasting variant, median of {args.calls} interleaved calls, {args.threads} threads; load "
             f"average {load[0]:.1f} before, {result['config']['load_after'][0]:.1f} after",
             f"`{command}`", "",
             "| backend | variant | history points | steps | " + " | ".join(f"{e} ms" for e in forecast_pass.EMISSIONS)
             + " |", "|---|---|---|---|" + "---|" * len(forecast_pass.EMISSIONS)]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['variant']} | {r['history_points']} | {r['steps']} | "
                     + " | ".join(f"{r[e + '_ms']:.2f}" for e in forecast_pass.EMISSIONS) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(table + "\n")
    return result


if __name__ == "__main__":
    main()
