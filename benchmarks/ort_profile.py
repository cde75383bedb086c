"""Where ONNX Runtime's time goes, per variant: op times from its profiler.

    python benchmarks/ort_profile.py                                  # demo model, tokencache:2 shape
    python benchmarks/ort_profile.py --model DiT-S/2 --plan tokencache+l2c:2 --batch 2
    python benchmarks/ort_profile.py --plan adaptive        # the gated step, forced to compute (vs --plan full)

Transforms the model for the plan (learned-planner names: their structural plans, see
bench_tokencache.structural_plans) and then, per variant, in a session of its own with ONNX
Runtime's profiler on: the median latency of `--runs` runs on random feeds, and the kernel
time per op type per run (the top `--top`), with the node count, and the share of kernel time in
matrix products (`products_share`: Gemm, MatMul, Conv; what the FLOP count is made of; the
rest is element-wise, normalization, layout and index work). Prints JSON lines; writes
nothing but the profiler's files in a temporary folder. Each variant's line carries its FLOP
fraction of a full step; where the plan has a full variant, a last line gives the plan's speedup
from the variants' medians (steps x median, against every step at the full variant's) beside its
FLOP prediction: the realization of the graphs alone, without the sampler around them.
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_plans import benchmark_model, time_runs  # noqa: E402
from bench_tokencache import speed_plans  # noqa: E402
from memory_sharing import variant_feeds  # noqa: E402

from tcgraph import api  # noqa: E402
from tcgraph.export.artifact import load_artifact  # noqa: E402
from tcgraph.plan.flops import plan_flops  # noqa: E402
from tcgraph.runtime.ort.loader import SLOW_CPU_FUSIONS  # noqa: E402
from tcgraph.sampling import SamplerSettings  # noqa: E402


PRODUCTS = ("Gemm", "MatMul", "FusedMatMul", "FusedGemm", "Conv", "FusedConv")  # the work FLOPs count


def profile_variant(ort, art, spec, runs: int, top: int, threads: int, folder: str) -> dict:
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(folder) / spec.id)
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(art.variant_path(spec.id)), options, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=list(SLOW_CPU_FUSIONS))  # as the runner asks on the CPU
    feeds = variant_feeds(spec, np.random.default_rng(0))
    if "gate.params" in feeds:  # a gated step forced to compute: step 10, threshold below 0, M 4, the shares
        feeds["gate.params"] = np.array([10.0, -1.0, 4.0, 1.0, 0.0], dtype=np.float32)
    time_runs(lambda: session.run(None, feeds), 3)  # warm-up
    times = time_runs(lambda: session.run(None, feeds), runs)
    events = json.loads(Path(session.end_profiling()).read_text())
    total_runs = runs + 3
    by_op, count = collections.defaultdict(float), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_op[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    ops = sorted(by_op, key=by_op.get, reverse=True)[:top]
    products = sum(by_op[op] for op in by_op if op in PRODUCTS)
    return {"variant": spec.id, "median_ms": statistics.median(times) * 1e3,
            "kernel_ms_per_run": sum(by_op.values()) / total_runs / 1e3,
            "products_share": products / max(sum(by_op.values()), 1e-9),
            "nodes_per_run": sum(count.values()) // total_runs,
            "top_ops": {op: {"ms": by_op[op] / total_runs / 1e3, "nodes": count[op] // total_runs} for op in ops}}


def profile_plan(model, settings, spec: str):
    """A fixed plan (`full`, `fora:N`, `taylor:N[:order]`) as `make_plan` makes it, `adaptive` with a
    given threshold (its one gated variant is profiled forced to compute: the gate's cost beside `full`),
    a learned planner's name as its structural plan (bench_tokencache.speed_plans)."""
    from tcgraph.plan import make_plan

    if spec.split(":")[0] in ("full", "fora", "taylor"):
        return make_plan(spec, model.config, settings)
    if spec == "adaptive":
        return make_plan(spec, model.config, settings, threshold=0.1)
    return speed_plans(model, settings, [spec])[spec]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits")
    ap.add_argument("--plan", default="tokencache:2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--top", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    import onnxruntime as ort

    model = benchmark_model(args.model)
    settings = SamplerSettings(num_steps=50, cfg_scale=2.0, batch=args.batch, resolution=model.config.input_size)
    plan = profile_plan(model, settings, args.plan)
    with tempfile.TemporaryDirectory() as tmp:
        art = load_artifact(api.transform(model, plan, Path(tmp) / "art", check=False, progress=False))
        steps = collections.Counter(plan.schedule())
        flops = plan_flops(model.config, plan)
        rows = []
        for spec in art.variants:
            row = profile_variant(ort, art, spec, args.runs, args.top, args.threads, tmp)
            rows.append({"steps": steps[spec.id], "flop_fraction": flops["fraction"][spec.id], **row})
            print(json.dumps(rows[-1]), flush=True)
    full = [r["median_ms"] for r in rows if r["flop_fraction"] == 1.0]
    if full:  # the run's time from the variants' medians, against every step at the full variant's
        run_ms = sum(r["steps"] * r["median_ms"] for r in rows)
        realized = full[0] * len(plan.recipes) / run_ms
        print(json.dumps({"plan": args.plan, "realized_from_steps": realized,
                          "predicted": flops["predicted_speedup"],
                          "realized_over_predicted": realized / flops["predicted_speedup"]}), flush=True)


if __name__ == "__main__":
    main()
