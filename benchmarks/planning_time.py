"""Planning time of the learned planners at 2x on the demo, before (a commit's tree) and after (this
checkout), with the quality of each plan.

    python benchmarks/planning_time.py --before 6eaabaf              # l2c, tokencache, tokencache+l2c
    python benchmarks/planning_time.py --before 6eaabaf --runs 3 --planners l2c

Each timed run is a fresh `python -m tcgraph transform --model digits --plan P --target-speedup 2
--out DIR` (everything else at its default: DDIM 50, guidance 2, batch 8, ONNX export with its
checks), in the tree of commit `--before` (a `git worktree` in /tmp, made once and kept) or in
this one; the wall time, the CPU time of the process (user + system: a busy machine stretches the
wall time, much less the CPU time) and the load average around it. Before and after run in turn
(before first in even runs, after first in odd ones) so that a busy machine slows both alike;
medians over `--runs`.

Quality, per tree and planner: the held-out PSNR the planner itself reports (plan.json: the
chosen candidate's score on held-out calibration images), and the PSNR against `full` of 40
images (classes 0-9, 4 each, seed 0) sampled with ONNX Runtime, each tree sampling its own
artifact and its own `full` artifact (`python -m tcgraph sample`).

DiT-S/2 shapes (`--dit-s2`): measured runs are out of reach on 2 cores (a DiT-S/2 model row
is about 11 GFLOP, 67 times the demo's: calibration alone, 4,800 rows, takes tens of minutes),
so the script projects them instead: the work of each planner's phases in model rows (the after tree's cost
model, `tcgraph.plan.learning.common`, applied to the before tree's settings too), times the
measured time of one DiT-S/2 row (random weights) on this machine. A projection, labelled so.

Writes benchmarks/results/planning-time.json and planning-time.md (`--out` without suffix).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's tcgraph computes PSNRs and writes the results

from tcgraph.files import atomic_write_text  # noqa: E402

PLANNERS = ("l2c", "tokencache", "tokencache+l2c")
TARGET = 2.0
CLASSES, PER_CLASS, SEED = "0-9", 4, 0


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def worktree(rev: str) -> Path:
    """A git worktree of `rev` in /tmp (made once, reused by later runs of this script)."""
    sha = git("rev-parse", "--short", rev)
    path = Path(tempfile.gettempdir()) / f"planning-tree-{sha}"
    if not (path / "tcgraph").is_dir():
        git("worktree", "add", "--detach", str(path), sha)
    return path


def run(tree: Path, argv: list[str], cwd: Path) -> dict:
    """One `python -m tcgraph ARGV` with `tree` first on the path: wall and CPU seconds, load, exit code."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tcgraph", *argv], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: tcgraph {' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "load_before": round(load, 2),
            "load_after": round(os.getloadavg()[0], 2)}


def transform_argv(planner: str, out: Path) -> list[str]:
    argv = ["transform", "--model", "digits", "--plan", planner, "--out", str(out), "--force"]
    return argv + (["--target-speedup", str(TARGET)] if planner != "full" else [])


def samples_of(tree: Path, artifact: Path, work: Path) -> np.ndarray:
    npy = work / f"{artifact.name}.npy"
    run(tree, ["sample", str(artifact), "--classes", CLASSES, "--per-class", str(PER_CLASS), "--seed", str(SEED),
               "--npy", str(npy), "--png", str(work / f"{artifact.name}.png")], work)
    return np.load(npy)


def held_out_psnr(artifact: Path) -> dict:
    """What the planner recorded: the chosen candidate, its held-out PSNR and predicted speedup."""
    params = json.loads((artifact / "plan.json").read_text())["params"]
    chosen = next(e for e in params["selection"] if e["candidate"] == params["selected"])
    return {"selected": params["selected"], "held_out_psnr": chosen["held_out_psnr"],
            "predicted_speedup": params["predicted_speedup"], "held_out_error": params.get("held_out_error")}


def measure(args: argparse.Namespace) -> dict:
    from tcgraph.eval.metrics import psnr

    sides = [x for x in args.sides.split(",") if x]
    trees = {side: tree for side, tree in (("before", lambda: worktree(args.before)),
                                          ("after", lambda: worktree(args.after) if args.after else ROOT))
             if side in sides}
    trees = {side: make() for side, make in trees.items()}
    work = Path(tempfile.mkdtemp(prefix="planning-time-"))
    planners = [p for p in args.planners.split(",") if p]
    timings: dict = {p: {side: [] for side in trees} for p in planners}
    quality: dict = {p: {} for p in planners}
    references = {}
    for side, tree in trees.items():  # not timed: each tree's own full reference
        art = work / f"{side}-full"
        run(tree, transform_argv("full", art), work)
        references[side] = samples_of(tree, art, work)
    for r in range(args.runs):
        for planner in planners:
            for side in [x for x in (("before", "after") if r % 2 == 0 else ("after", "before")) if x in trees]:
                art = work / f"{side}-{planner.replace('+', '-')}"
                timing = run(trees[side], transform_argv(planner, art), work)
                timings[planner][side].append(timing)
                print(f"run {r + 1} {planner:15s} {side:6s} wall {timing['wall_s']:6.1f} s  "
                      f"cpu {timing['cpu_s']:6.1f} s  load {timing['load_before']:.1f}", flush=True)
                if r == 0:  # the plans are deterministic: quality once
                    q = held_out_psnr(art)
                    q["psnr_40"] = round(psnr(samples_of(trees[side], art, work), references[side]), 2)
                    quality[planner][side] = q
                    print(f"      held-out PSNR {q['held_out_psnr']} dB ({q['selected']}), 40-image PSNR vs full "
                          f"{q['psnr_40']} dB, predicted {q['predicted_speedup']}x", flush=True)
    rows = {}
    for planner in planners:
        rows[planner] = {side: {"median_wall_s": statistics.median(t["wall_s"] for t in timings[planner][side]),
                                "median_cpu_s": statistics.median(t["cpu_s"] for t in timings[planner][side]),
                                "runs": timings[planner][side], **quality[planner][side]} for side in trees}
    return {"rows": rows}


#################################################################################
#                 DiT-S/2 shapes: a projection from the work model              #
#################################################################################


def cpu_seconds_per_row(model, settings, images: int = 4, repeats: int = 3) -> float:
    """CPU time of one model row (no gradients) on one thread: the work, whatever else the machine does."""
    import torch

    from tcgraph.calibrate import mixed_step
    from tcgraph.sampling import sampler_for

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sampler = sampler_for(settings, model.config)
        x = torch.randn(images, model.config.in_channels, settings.resolution, settings.resolution)
        inputs = sampler.model_inputs(x, 0, torch.zeros(images, dtype=torch.long))
        with torch.no_grad():
            mixed_step(model, *inputs, {}, {})
            start = time.process_time()
            for _ in range(repeats):
                mixed_step(model, *inputs, {}, {})
        return (time.process_time() - start) / repeats / inputs[0].shape[0]
    finally:
        torch.set_num_threads(threads)


def dit_s2_projection() -> dict:
    """Each planner's phases in model rows (after: its own outline; before: the same cost model with
    the settings of the earlier tree), times the measured time of one DiT-S/2 row here."""
    import torch

    from tcgraph.models import build_model
    from tcgraph.models.config import CONFIGS
    from tcgraph.plan.learning import common
    from tcgraph.plan.learning.predictor import training_rounds
    from tcgraph.plan.planners import combined, l2c, tokencache
    from tcgraph.sampling import SamplerSettings

    torch.manual_seed(0)
    model = build_model(CONFIGS["DiT-S/2"]).eval()
    settings = SamplerSettings(num_steps=50, cfg_scale=2.0, batch=8, resolution=model.config.input_size)
    per_row = cpu_seconds_per_row(model, settings)
    S, rows, cfg = settings.num_steps, common.rows_per_image(settings), model.config
    out = {"cpu_seconds_per_row": per_row, "planners": {}}

    lcfg = l2c.L2CConfig(target_speedup=TARGET)
    intervals = common.candidate_intervals(cfg, S, TARGET)
    trained = [(k, j) for k in intervals for j in range(len(l2c.LAMBDA_GRID))]
    after = dict(l2c.plan_outline(settings, lcfg, trained, True))
    # before: 12 epochs of 8 images, one plan_error per candidate, the forecast Grams and the
    # full reference sampled again
    held = lcfg.num_held_out * rows
    before = {"calibrate": after["calibrate"],
              "train router": sum(12 * common.training_cost(common.rounds(S, k), 8 * rows) for k, _ in trained),
              "score candidates": len(trained) * common.scoring_cost(S, held, 1),
              "forecast weights": after["calibrate"],
              "choose by sampling runs": common.selection_cost(settings) * 4 / 3}
    out["planners"]["l2c"] = {"before_rows": before, "after_rows": after}

    tcfg = tokencache.TokenCacheConfig(target_speedup=TARGET)
    from tcgraph.plan.learning.tprr import tprr_search_space

    space = tprr_search_space(cfg, S, TARGET, min_keep=tcfg.min_keep, max_stale=tcfg.max_stale,
                              max_variants=tcfg.max_variants)
    cands = tokencache.reachable(cfg, S, space, tcfg)
    after = dict(tokencache.plan_outline(settings, tcfg, cfg.depth, cands, True))
    tc_before = {"calibrate": after["calibrate"],
                 "train predictor": 8 * common.training_cost(training_rounds(S, 3), 8 * rows),
                 "block sensitivity": (sum(1 + cfg.depth for _, cs in common.rounds(S, 2) if cs)
                                       * tcfg.num_held_out * rows),
                 "TPRR search": (cands + 1) * common.scoring_cost(S, tcfg.num_held_out * rows, 1),
                 "forecast weights": after["calibrate"],
                 "choose by sampling runs": common.selection_cost(settings) * 4 / 3}
    out["planners"]["tokencache"] = {"before_rows": tc_before, "after_rows": after}

    ccfg = combined.CombinedConfig(target_speedup=TARGET)
    interval = combined.skeleton_interval(cfg, S, TARGET, combined.token_floor(cfg.num_tokens, ccfg.min_keep))
    lc = combined.L2CConfig(target_speedup=TARGET ** 0.5, interval=interval)
    after_steps = combined.plan_outline(settings, ccfg, tcfg, cfg.depth, lc, interval, 2, True, False)
    after = {}
    for d, c in after_steps:
        after[d] = after.get(d, 0.0) + c
    routers = 4 * 12 * common.training_cost(common.rounds(S, interval), 8 * rows)  # 2 λ per share, per share
    before = {**{k: v for k, v in tc_before.items() if k not in ("TPRR search",)},
              "train router": routers, "score candidates": 6 * common.scoring_cost(S, held, 1)}
    out["planners"]["tokencache+l2c"] = {"before_rows": before, "after_rows": after}
    for entry in out["planners"].values():
        for side in ("before", "after"):
            entry[f"{side}_cpu_s"] = round(sum(entry[f"{side}_rows"].values()) * per_row, 1)
    return out


#################################################################################
#                                    Report                                     #
#################################################################################


def markdown(result: dict) -> str:
    c = result["config"]
    lines = ["# Planning time of the learned planners", "",
             f"`{c['command']}`, before = {c['before']} (a git worktree), after = {c['after']}; "
             f"Python {c['python']}, {c['cpus']} CPUs, torch threads {c['threads']}.", ""]
    if "rows" in result:
        lines += [f"Demo model (`--model digits`), target 2x, every other setting at its default; one fresh "
                  f"`tcgraph transform` process per run (planning, rewriting, ONNX export and its checks), "
                  f"median of {c['runs']} run(s), before and after in turn. **The machine was shared with other "
                  f"work during the runs** (load average {c['load_min']:.1f} to {c['load_max']:.1f} on "
                  f"{c['cpus']} CPUs), so wall times are stretched; the CPU time of the process is the steadier "
                  "measure of the work. Run alone, the wall time is about the CPU time divided by the threads "
                  "that are busy (2 here), plus nothing for waiting.", "",
                  "| planner | before wall | after wall | before CPU | after CPU | held-out PSNR before → after "
                  "| 40-image PSNR vs full before → after | chosen before / after | predicted x before / after |",
                  "|---|---:|---:|---:|---:|---|---|---|---|"]
        missing = {"median_wall_s": None, "median_cpu_s": None, "held_out_psnr": "—", "psnr_40": "—",
                   "selected": "—", "predicted_speedup": "—"}  # a side not measured (--sides)

        def sec(v) -> str:
            return "—" if v is None else f"{v:.0f} s"

        for planner, row in result["rows"].items():
            b, a = row.get("before", missing), row.get("after", missing)
            lines.append(f"| {planner}:2 | {sec(b['median_wall_s'])} | {sec(a['median_wall_s'])} | "
                         f"{sec(b['median_cpu_s'])} | {sec(a['median_cpu_s'])} | "
                         f"{b['held_out_psnr']} → {a['held_out_psnr']} dB | {b['psnr_40']} → {a['psnr_40']} dB | "
                         f"{b['selected']} / {a['selected']} | {b['predicted_speedup']} / {a['predicted_speedup']} |")
        lines.append("")
    if "dit_s2" in result:
        d = result["dit_s2"]
        lines += ["## DiT-S/2 shapes: a projection, not a measurement", "",
                  "Measured runs at DiT-S/2 shapes (256 tokens, width 384, depth 12; random weights) are out of "
                  "reach on 2 cores: one model row is about 11 GFLOP, 67 times the demo's. The table is each "
                  "planner's work in model rows (after: the planner's own phase estimates; before: the same cost "
                  "model with the earlier settings: 12 and 8 epochs of 8 images, one scoring run per candidate, a "
                  "second pass for the forecast Grams and for the full reference) times the CPU time of one "
                  f"DiT-S/2 row on one thread here ({d['cpu_seconds_per_row'] * 1000:.0f} ms): CPU time of the "
                  "planning alone (no export), comparable to the CPU column above.", "",
                  "| planner | before (projected CPU) | after (projected CPU) | after: work by phase (model rows) |",
                  "|---|---:|---:|---|"]
        for planner, entry in d["planners"].items():
            phases = ", ".join(f"{k} {v:,.0f}" for k, v in entry["after_rows"].items())
            lines.append(f"| {planner}:2 | {entry['before_cpu_s'] / 60:.0f} min | {entry['after_cpu_s'] / 60:.0f} min "
                         f"| {phases} |")
        lines.append("")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    import torch

    result: dict = {"config": {
        "command": "python benchmarks/planning_time.py " + " ".join(sys.argv[1:]),
        "before": git("rev-parse", "--short", args.before),
        "after": git("rev-parse", "--short", args.after) if args.after else git("rev-parse", "--short", "HEAD") + (
            " + uncommitted changes" if git("status", "--porcelain", "--", "tcgraph") else ""),
        "runs": args.runs, "python": platform.python_version(), "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(), "machine": platform.machine()}}
    if not args.skip_demo:
        result.update(measure(args))
        loads = [t[k] for row in result["rows"].values() for side in row.values() for t in side["runs"]
                 for k in ("load_before", "load_after")]
        result["config"].update(load_min=min(loads), load_max=max(loads))
    if args.dit_s2:
        result["dit_s2"] = dit_s2_projection()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=1) + "\n")
    atomic_write_text(out.with_suffix(".md"), markdown(result))
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="the commit to compare with (e.g. 6eaabaf)")
    p.add_argument("--after", help="a commit for the after side too (a worktree: the checkout may change while this "
                                   "runs); default: this checkout as it is")
    p.add_argument("--runs", type=int, default=1, help="timed runs of each planner and tree (default 1)")
    p.add_argument("--sides", default="before,after", help="which trees to time: before, after or both (default both)")
    p.add_argument("--planners", default=",".join(PLANNERS), help=f"comma-separated (default {','.join(PLANNERS)})")
    p.add_argument("--dit-s2", action="store_true", help="add the projection at DiT-S/2 shapes")
    p.add_argument("--skip-demo", action="store_true", help="only the DiT-S/2 projection")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "planning-time"),
                   help="output path without suffix (default benchmarks/results/planning-time)")
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
