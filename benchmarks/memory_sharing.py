"""Memory of ONNX Runtime's sessions for 1, 2, 4, 6 variants: one session for all, or one per variant.

    python benchmarks/memory_sharing.py                          # DiT-B/2, 4 variants, batch 2, 32x32
    python benchmarks/memory_sharing.py --model DiT-S/2 --variants 3 --out mem.json
    # a real plan's variants (learned names: their structural shapes), loaded 1, 2, 4, 6 at a time
    python benchmarks/memory_sharing.py --model DiT-S/2 --plan tokencache+l2c:2 --counts 1,2,4,6 \
        --modes one,per-variant,plain --out benchmarks/results/memory-DiT-S2.json

Without `--plan`, exports `--variants` copies of the same full DiT graph (distinct ids;
random weights, so that content deduplication cannot merge the adaLN-Zero zeros) into one
artifact folder (its plan names N distinct recipes, so that the folder loads; every
variant file holds the full graph, because what is measured is the memory of N sessions
over one weights file). With `--plan`, the folder is `tcgraph transform`'s for that plan
(`fora:N`, or a learned planner's structural plan, benchmarks/bench_tokencache.py), and
its first n variants are loaded. Then, for each mode (`one`: the runner's default, every
variant in one session, pre-packing only the weights one kernel reads; `one-packed`: every kernel
pre-packs (one packed copy per kernel); `one-lean`: no pre-packing; `one-lean-noarena`: nor
ONNX Runtime's CPU arena; `per-variant`: one session per variant over shared weights;
`plain`: one session per variant, each with its own weights) and each count n of loaded
variants (`--counts`, default 1 and N), a fresh Python process loads the artifact with
`OrtRunner`, and reports:

- resident memory (VmRSS, and its anonymous/file-mapped split) before loading, after
  activating the sessions, and after one run of every loaded variant (arenas grown; the
  runs' random feeds and outputs freed and `malloc_trim` called first, so that what is
  counted is the sessions' own memory, not garbage glibc keeps);
- the process peak (VmHWM);
- the median latency of one run of the first variant (after warm-up).

The cost of one more variant is (RSS with N - RSS with 1) / (N - 1). Writes JSON (`--out`)
and prints a table with the configuration beside it.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import dataclasses
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from tcgraph.names import BRANCHES

sys.path.insert(0, str(Path(__file__).parent))

MIB = 1024 * 1024


#################################################################################
#                       Child process: load, measure, time                     #
#################################################################################


def proc_status() -> dict[str, float]:
    """VmRSS, RssAnon, RssFile, VmHWM of this process in MiB (Linux /proc)."""
    wanted = {"VmRSS", "RssAnon", "RssFile", "VmHWM"}
    result = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in wanted:
                result[key] = int(rest.split()[0]) / 1024  # kB -> MiB
    result["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


MODES = {"one": {}, "one-lean": {"prepack": False}, "one-packed": {"prepack": True},
         "one-lean-noarena": {"prepack": False, "cpu_arena": False}, "per-variant": {"one_session": False},
         "plain": {"one_session": False, "share_weights": False}}


def measure(artifact_dir: str, mode: str, n: int, threads: int, repeats: int, warmup: int) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from tcgraph.export.artifact import load_artifact
    from tcgraph.runtime.ort import OrtRunner

    art = load_artifact(Path(artifact_dir), verify_hashes=False)
    # A runner over the first n variants only: the same artifact with a shorter variant list.
    art = dataclasses.replace(art, variants=art.variants[:n])
    rng = np.random.default_rng(0)
    feeds = variant_feeds(art.variants[0], rng)

    before = proc_status()
    t0 = time.perf_counter()
    runner = OrtRunner(art, intra_op_threads=threads, **MODES[mode])
    runner.activate()
    activate_s = time.perf_counter() - t0
    activated = proc_status()
    for vid in runner.variant_ids():
        runner.run(vid, variant_feeds(art.variant(vid), rng))
    # The feeds and outputs of those runs are garbage now; glibc keeps freed memory unless
    # asked to return it. What stays is the sessions' own: weights, kernels, arenas.
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    after_runs = proc_status()
    first = runner.variant_ids()[0]
    from bench_plans import time_runs

    time_runs(lambda: runner.run(first, feeds), warmup)
    times = time_runs(lambda: runner.run(first, feeds), repeats)
    return {
        "mode": mode,
        "share_weights": MODES[mode].get("share_weights", True),
        "loaded_variants": n,
        "before": before,
        "activated": activated,
        "after_runs": after_runs,
        "activate_s": activate_s,
        "latency_ms": [t * 1000 for t in times],
        "median_latency_ms": statistics.median(times) * 1000,
    }


def variant_feeds(spec, rng) -> dict:
    """Random feeds of a variant's shapes (token indices in range: kept token ids are 0..k-1)."""
    import numpy as np

    feeds = {}
    for t in spec.inputs:
        if t.dtype == "int64":
            feeds[t.name] = rng.integers(0, 10, size=t.shape).astype(np.int64)
        else:
            feeds[t.name] = rng.standard_normal(t.shape).astype(t.dtype)
    return feeds


#################################################################################
#                      Parent process: export, spawn, report                    #
#################################################################################


def distinct_recipes_plan(cfg, n: int, batch: int):
    """A plan with `n` distinct recipes (step 0 full, step i reuses one more branch), only so
    that the folder of n copies of the full graph is a loadable artifact."""
    from tcgraph.plan.plan import COMPUTE, REUSE, Plan, Recipe
    from tcgraph.sampling import SamplerSettings

    if n > 2 * cfg.depth + 1:
        raise SystemExit(f"--variants {n}: at most {2 * cfg.depth + 1} distinct recipes for {cfg.depth} blocks")
    branches = [(block, branch) for block in range(cfg.depth) for branch in range(2)]
    recipes = []
    for i in range(n):
        reused = set(branches[:i])
        recipes.append(Recipe(tuple(tuple(REUSE if (block, branch) in reused else COMPUTE for branch in range(2))
                                    for block in range(cfg.depth)), BRANCHES))
    settings = SamplerSettings(num_steps=n, cfg_scale=1.0, batch=batch, resolution=cfg.input_size)
    return Plan(planner="benchmark:memory_sharing", settings=settings, recipes=tuple(recipes),
                num_tokens=cfg.num_tokens)


def build_artifact(
    out: Path, model_name: str, n_variants: int, batch: int, input_size: int, seed: int
) -> tuple[Path, int, float]:
    import torch

    from tcgraph.export.artifact import write_artifact
    from tcgraph.compile import VariantGraph
    from tcgraph.models.official.dit import build_model, randomize_weights
    from tcgraph.progress import Progress, Phase

    class Say(Progress):  # one line per tick, with the time since the export started
        def phase(self, desc: str, total: int) -> Phase:
            class _Say(Phase):
                def tick(self, note: str = "") -> None:
                    print(f"  [{time.perf_counter() - t0:6.1f}s] {desc}: {note}", flush=True)
            return _Say()

    torch.manual_seed(seed)
    model = randomize_weights(build_model(model_name, input_size=input_size), seed=seed)
    gm = torch.fx.symbolic_trace(model)
    cfg = model.config
    example = {
        "x": torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size),
        "t": torch.arange(batch, dtype=torch.int64) * 100,
        "y": torch.arange(batch, dtype=torch.int64) % cfg.num_classes,
    }
    variants = [VariantGraph(f"v{i}", gm, ["x", "t", "y"], ["out"], example) for i in range(n_variants)]
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    t0 = time.perf_counter()
    write_artifact(out, model_config=cfg, plan=distinct_recipes_plan(cfg, n_variants, batch), variants=variants,
                   overwrite=True, progress=Say())
    return Path(out), params, time.perf_counter() - t0


def plan_artifact(out: Path, model_name: str, spec: str, batch: int, input_size: int, seed: int
                  ) -> tuple[Path, int, float]:
    """`tcgraph transform`'s folder for a plan (learned names: their structural plans)."""
    from bench_tokencache import speed_plans

    from tcgraph import api
    from tcgraph.models.official.dit import build_model, randomize_weights
    from tcgraph.sampling import SamplerSettings

    model = randomize_weights(build_model(model_name, input_size=input_size), seed=seed)
    settings = SamplerSettings(num_steps=50, cfg_scale=2.0, batch=batch, resolution=model.config.input_size)
    plan = speed_plans(model, settings, [spec])[spec]
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    t0 = time.perf_counter()
    api.transform(model, plan, out, check=False, progress=False, force=True)
    return Path(out), params, time.perf_counter() - t0


def run_child(artifact: Path, mode: str, n: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", str(artifact), "--mode", mode, "--n", str(n),
           "--threads", str(args.threads), "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"measurement process failed ({' '.join(cmd)}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    """One row per (mode, count); `added` = RSS after runs - RSS before loading, `x one` = that
    over the same mode's one-variant row."""
    lines = [
        "| mode | variants loaded | RSS before | RSS activated | RSS after runs (anon / file) | added | x one "
        "| peak (VmHWM) | median latency |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        a = r["after_runs"]
        one = next(o for o in results if o["mode"] == r["mode"] and o["loaded_variants"] == 1)
        added = a["VmRSS"] - r["before"]["VmRSS"]
        base = one["after_runs"]["VmRSS"] - one["before"]["VmRSS"]
        r["added_mib"], r["over_one"] = added, added / base
        lines.append(
            f"| {r['mode']} | {r['loaded_variants']} | {r['before']['VmRSS']:.0f} MiB "
            f"| {r['activated']['VmRSS']:.0f} MiB | {a['VmRSS']:.0f} MiB ({a['RssAnon']:.0f} / {a['RssFile']:.0f}) "
            f"| {added:.0f} MiB | {added / base:.2f} | {a['VmHWM']:.0f} MiB | {r['median_latency_ms']:.1f} ms |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-B/2")
    p.add_argument("--variants", type=int, default=4, help="N: copies of the full graph, distinct ids")
    p.add_argument("--plan", default=None, help="measure this plan's variants instead of N copies of the full graph")
    p.add_argument("--counts", default=None, help="comma list of loaded-variant counts (default: 1 and N)")
    p.add_argument("--modes", default="one,per-variant,plain", help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--input-size", type=int, default=32, help="latent side (32 = 256x256 images)")
    p.add_argument("--threads", type=int, default=1, help="torch and ORT intra-op threads")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="where to write the artifact (default: a temp folder)")
    p.add_argument("--reuse", action="store_true", help="measure an artifact already in --workdir")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    # internal: a measurement in a fresh process
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mode", default="one", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        print(json.dumps(measure(args.child, args.mode, args.n, args.threads, args.repeats, args.warmup)))
        return 0

    import onnxruntime
    import torch

    torch.set_num_threads(args.threads)
    config = {
        "model": args.model, "variants": args.variants, "plan": args.plan, "modes": args.modes, "batch": args.batch, "input_size": args.input_size,
        "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed,
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version(),
        "machine": platform.machine(), "cpus": __import__("os").cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": "python benchmarks/memory_sharing.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print("config: " + ", ".join(f"{k}={v}" for k, v in config.items()), flush=True)
    with tempfile.TemporaryDirectory(prefix="tcgraph-mem-") as tmp:
        workdir = args.workdir or Path(tmp)
        artifact = workdir / "artifact"
        if args.reuse and (artifact / "manifest.json").is_file():
            params, export_s = None, None
            print(f"reusing {artifact}", flush=True)
        elif args.plan:
            print(f"transforming {args.model} for {args.plan} into {artifact}", flush=True)
            artifact, params, export_s = plan_artifact(artifact, args.model, args.plan, args.batch, args.input_size,
                                                       args.seed)
        else:
            print(f"exporting {args.variants} variants of {args.model} to {artifact}", flush=True)
            artifact, params, export_s = build_artifact(
                artifact, args.model, args.variants, args.batch, args.input_size, args.seed
            )
        available = len(json.loads((artifact / "manifest.json").read_text())["variants"])
        counts = sorted({int(c) for c in args.counts.split(",")} if args.counts else {1, available})
        if max(counts) > available:
            raise SystemExit(f"--counts {args.counts}: the artifact has {available} variants")
        config["counts"] = counts
        weights = artifact / "variants" / "weights.bin"
        sizes = {
            "weights_bin_mib": weights.stat().st_size / MIB,
            "param_mib": params / MIB if params else None,
            "onnx_files_mib": sum(f.stat().st_size for f in (artifact / "variants").glob("*.onnx")) / MIB,
            "export_s": export_s,
        }
        print("sizes: " + ", ".join(f"{k}={v:.1f}" for k, v in sizes.items() if v is not None), flush=True)
        results = []
        for mode in args.modes.split(","):
            if mode not in MODES:
                raise SystemExit(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
            for n in counts:
                print(f"measuring {mode}, {n} variant(s) ...", flush=True)
                results.append(run_child(artifact, mode, n, args))
    report = table(results)
    print()
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"config": config, "sizes": sizes, "results": results,
                                        "table": report}, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
