"""PixArt at PixArt-alpha's width on CPU: full vs cached plans, ONNX Runtime, whole sampling runs.

    python benchmarks/bench_pixart.py                      # hidden 1152, 16 heads, 256 tokens, depth 4
    python benchmarks/bench_pixart.py --depth 2 --steps 6 --repeats 2 --out /tmp/x   # a quick look

A random `PixArtTransformer2DModel` of PixArt-alpha 256px's shapes (hidden 1152, 16 heads of
72, 32x32 latents of 4 channels in patches of 2: 256 tokens, T5-XXL's text width 4096 at 120
tokens), with fewer blocks than its 28 so that this 2-core CPU can time it (`--depth`,
stated in the results). Weights are random: speed depends on the shapes only.

One process; every plan's artifact loaded at once and timed round-robin (eager PyTorch
`full`, then each plan, then again), so that the machine's drift spreads over all rows
alike; medians of `--repeats`. Realized speedup = ORT `full` / the plan's median, predicted =
the plan's FLOP ratio (`plan_flops`, cross-attention to the text counted), and their ratio.
Writes JSON and a markdown table (`--out` without suffix).

Plans carry the text's keys and values (projected at step 0, read after; `Plan.carry_constants`).
A plan name ending in `@recompute` is the same plan projecting them at every step, as the
model's own forward does: `full@recompute` against `full` measures what carrying them gains.
Every row's prediction is against `full` (carried): FLOPs of its run over the row's. Whole runs
of 10 steps spread by several percent; `--step-repeats` also times one later full step of each
(`full`: it reads the keys and values; `full@recompute`: it projects them), interleaved, on the
same inputs, which isolates the per-step gain.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench_plans import write_result
from tcgraph import api
from tcgraph.export.artifact import load_artifact
from tcgraph.plan import make_plan, plan_flops
from tcgraph.runtime.dispatch import ScheduleDispatcher
from tcgraph.sampling import SamplerSettings, make_noise, run_batches, sampler_for
from tcgraph.sampling.conditioning import Text

DEFAULT_PLANS = "full,full@recompute,fora:2,fora:2@recompute,fora:3,taylor:3:1"
RECOMPUTE = "@recompute"


def pixart_model(depth: int, hidden: int, heads: int, side: int, caption: int, seed: int):
    """A random PixArtTransformer2DModel (std-0.02 weights, the position table kept), wrapped."""
    from diffusers import PixArtTransformer2DModel

    from tcgraph.models.diffusers.pixart import DiffusersPixArt

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=4,
                                     out_channels=8, num_layers=depth, sample_size=side, patch_size=2,
                                     caption_channels=caption, cross_attention_dim=hidden,
                                     use_additional_conditions=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    return DiffusersPixArt(model).eval()


def prompts(n: int, length: int, width: int, seed: int) -> Text:
    """n random prompt embeddings, padded after 20..length tokens, and an empty negative prompt."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(n, length)
    for i in range(n):
        mask[i, : 20 + (i * 37) % (length - 20)] = 1
    neg = torch.zeros(n, length)
    neg[:, 0] = 1
    return Text(torch.randn(n, length, width, generator=g), mask,
                torch.randn(1, length, width, generator=g).expand(n, -1, -1).clone(), neg)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", default=DEFAULT_PLANS)
    ap.add_argument("--depth", type=int, default=4, help="blocks (PixArt-alpha has 28)")
    ap.add_argument("--hidden", type=int, default=1152)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--side", type=int, default=32, help="latent side (32: 256 tokens)")
    ap.add_argument("--caption", type=int, default=4096, help="text embedding width (T5-XXL: 4096)")
    ap.add_argument("--text-length", type=int, default=120)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-eager", action="store_true", help="do not time eager PyTorch full")
    ap.add_argument("--step-repeats", type=int, default=0,
                    help="also time one later full step of `full` and `full@recompute` this many times each")
    ap.add_argument("--out", type=Path, default=None,
                    help="output path without suffix (default benchmarks/results/pixart-width-d<depth>)")
    args = ap.parse_args(argv)

    model = pixart_model(args.depth, args.hidden, args.heads, args.side, args.caption, args.seed)
    cfg = model.config
    settings = SamplerSettings(num_steps=args.steps, cfg_scale=args.guidance, batch=args.batch,
                               resolution=cfg.input_size, text_length=args.text_length)
    names = [p.strip() for p in args.plans.split(",")]
    names = ["full"] + [n for n in names if n != "full"]
    plans = {name: make_plan(name.removesuffix(RECOMPUTE), cfg, settings) for name in names}
    plans = {name: dataclasses.replace(plan, carry_constants=False) if name.endswith(RECOMPUTE) else plan
             for name, plan in plans.items()}
    full_flops = plan_flops(cfg, plans["full"])["total"]
    config = {"model": f"PixArt (random) depth {args.depth}, hidden {args.hidden}, heads {args.heads}, "
                       f"{cfg.num_tokens} tokens, text {args.text_length} x {args.caption}",
              "steps": args.steps, "guidance": args.guidance, "batch": args.batch, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "python": sys.version.split()[0], "torch": torch.__version__,
              "command": "python benchmarks/bench_pixart.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(config), flush=True)

    sampler = sampler_for(settings, cfg)
    text = prompts(args.batch, args.text_length, args.caption, args.seed)
    noise = make_noise(args.batch, cfg.in_channels, settings.resolution, args.seed)
    rows, runs, dispatchers = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        for i, (name, plan) in enumerate(plans.items()):
            t0 = time.perf_counter()
            art = load_artifact(api.transform(model, plan, Path(tmp) / f"p{i}", progress=False, check=False))
            runner = stack.enter_context(api.make_runner("ort", art))
            dispatch = ScheduleDispatcher.for_plan(runner, plan)
            run = functools.partial(run_batches, dispatch, dispatch.reset, sampler, text, noise, settings.batch,
                                    args.seed)
            run()  # warm-up
            runs[name] = run
            dispatchers[name] = dispatch
            flops = plan_flops(cfg, plan)
            rows.append({"plan": name, "variants": len(plan.variants()), "carry_constants": plan.carry_constants,
                         "predicted_speedup": full_flops / flops["total"],
                         "constants_speedup": flops["constants_speedup"]})
            print(json.dumps({"plan": name, "ready_s": round(time.perf_counter() - t0, 1)}), flush=True)
        if not args.no_eager:
            runs["eager full"] = lambda: api.sample_eager(model, settings, text, args.seed)
        times = {key: [] for key in runs}
        for r in range(args.repeats):
            for key, run in runs.items():
                t0 = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - t0)
            print(f"round {r + 1}/{args.repeats} done", flush=True)
        step_times = {}
        if args.step_repeats and {"full", "full" + RECOMPUTE} <= set(dispatchers):
            pair = {name: dispatchers[name] for name in ("full", "full" + RECOMPUTE)}
            step_times = time_later_full_step(pair, plans, settings, cfg, text, args.step_repeats)
    full = statistics.median(times["full"])
    for row in rows:
        row["times_s"] = times[row["plan"]]
        row["median_s"] = statistics.median(row["times_s"])
        row["realized_speedup"] = full / row["median_s"]
        row["realized_over_predicted"] = row["realized_speedup"] / row["predicted_speedup"]
    eager = statistics.median(times["eager full"]) if "eager full" in times else None
    result = {"config": config, "eager_times_s": times.get("eager full"), "eager_median_s": eager,
              "ort_full_over_eager": None if eager is None else full / eager, "rows": rows}
    by_name = {r["plan"]: r for r in rows}
    if "full" + RECOMPUTE in by_name:  # what carrying the text's keys and values gains, full vs full
        recomputed = by_name["full" + RECOMPUTE]
        result["constants_gain"] = {"measured": recomputed["median_s"] / full,
                                    "predicted": by_name["full"]["constants_speedup"]}
        if step_times:
            f = {name: plan_flops(cfg, plans[name]) for name in step_times}
            read_vid, recompute_vid = plans["full"].schedule()[1], plans["full" + RECOMPUTE].schedule()[1]
            result["constants_gain"]["step"] = {
                "times_s": step_times,
                "median_s": {name: statistics.median(ts) for name, ts in step_times.items()},
                "measured": statistics.median(step_times["full" + RECOMPUTE]) / statistics.median(step_times["full"]),
                "predicted": f["full" + RECOMPUTE]["per_variant"][recompute_vid] / f["full"]["per_variant"][read_vid]}
    out = args.out or Path(__file__).parent / "results" / f"pixart-width-d{args.depth}"
    return write_result(result, out, format_table(result))


def time_later_full_step(dispatchers: dict, plans: dict, settings: SamplerSettings, cfg, text: Text,
                         repeats: int) -> dict[str, list[float]]:
    """Seconds of step 1 of each (full) plan's schedule, on the same inputs, interleaved: the
    carried plan's variant reads the keys and values its step 0 wrote, the other projects them."""
    from tcgraph.names import model_input_count
    from tcgraph.sampling.conditioning import as_inputs

    g = torch.Generator().manual_seed(0)
    b = settings.model_batch
    x = torch.randn(b, cfg.in_channels, settings.resolution, settings.resolution, generator=g)
    t = torch.full((b,), 500, dtype=settings.timestep_dtype)
    y = text.model_inputs(guided=settings.model_batch > settings.batch)
    feeds = {}
    for name, dispatch in dispatchers.items():
        dispatch.reset()
        dispatch(0, x, t, y)  # step 0: the carried plan writes its keys and values
        vid = plans[name].schedule()[1]
        inputs, _ = dispatch.io[vid]
        own = model_input_count(inputs)
        feeds[name] = (vid, {**dict(zip(inputs[:own], (x, t, *as_inputs(y)))),
                             **{n: dispatch.caches[n] for n in inputs[own:]}})
    times = {name: [] for name in dispatchers}
    for _ in range(repeats):
        for name, dispatch in dispatchers.items():
            vid, f = feeds[name]
            t0 = time.perf_counter()
            dispatch.run(vid, f)
            times[name].append(time.perf_counter() - t0)
    return times


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [f"# {c['model']}", "",
             f"{c['steps']} steps, guidance {c['guidance']}, batch {c['batch']}, ONNX Runtime (CPU, "
             f"{c['threads']} threads), medians of {c['repeats']}; `{c['command']}`", "",
             (f"eager PyTorch full: {result['eager_median_s']:.2f} s; ORT full / eager: "
              f"{result['ort_full_over_eager']:.2f}" if result.get("eager_median_s") else "eager PyTorch: not timed"),
             ""]
    if result.get("constants_gain"):
        g = result["constants_gain"]
        lines += [f"carrying the text's keys and values (full@recompute / full): {g['measured']:.3f}x measured, "
                  f"{g['predicted']:.3f}x predicted (whole runs)", ""]
        if g.get("step"):
            st = g["step"]
            lines += [f"one later full step, median of {len(st['times_s']['full'])} interleaved: "
                      f"{st['median_s']['full@recompute'] * 1e3:.0f} ms projecting the text, {st['median_s']['full'] * 1e3:.0f} "
                      f"ms reading its keys and values: {st['measured']:.3f}x measured, {st['predicted']:.3f}x predicted", ""]
    lines += ["| plan | variants | median s | realized | predicted | realized/predicted |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['plan']} | {r['variants']} | {r['median_s']:.2f} | {r['realized_speedup']:.2f}x | "
                     f"{r['predicted_speedup']:.2f}x | {r['realized_over_predicted']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
