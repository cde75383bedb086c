"""FLUX.1 and SD3.5-Medium at their real width on CPU: full vs cached plans, ONNX Runtime, whole sampling runs.

    python benchmarks/bench_mmdit.py                  # FLUX.1-dev's width, 1 double + 2 single blocks, 1024 tokens
    python benchmarks/bench_mmdit.py --family sd3     # SD3.5-Medium's width, 4 blocks, 1024 tokens, CFG
    python benchmarks/bench_mmdit.py --family flux --double 1 --single 1 --latent 16 --text-length 16 \\
        --steps 4 --repeats 1 --plans full,fora:2,taylor:2 --out /tmp/mmdit-quick          # a quick look

What it measures: the seconds of whole sampling runs (`--steps` steps of the model's flow-matching
scheduler, batch `--batch`) of each plan's artifact on ONNX Runtime (CPU), against the `full`
plan's. Realized speedup = ORT `full` median / the plan's median; predicted = the plan's FLOP
ratio (`plan_flops`); realized/predicted is the share of the predicted gain the runtime delivers.
The goal: realized/predicted >= 0.9 for the fora, taylor and l2c plans. Nothing here is tuned to
reach it. At few tokens (the quick look: 64) the per-step work the plans do not remove (adaLN
modulations of 6-12 x hidden^2 weights per block, embeddings, the sampler) dominates: only runs
at 1024 tokens speak to the goal.

Models: random weights (std 0.02; speed depends on the shapes alone) at the real width, with
fewer blocks so that a 2-core CPU can time them; the depth is stated in the results.
- `--family flux`: diffusers' FluxTransformer2DModel of FLUX.1-dev's shapes: hidden 3072 = 24
  heads x 128, 16 latent channels packed 2x2 (in_channels 64), T5-XXL text (4096 wide, 128
  tokens), CLIP pooled 768, the guidance embedding (guidance is an input: one pass per step,
  `--guidance` 3.5), RoPE axes (16, 56, 56); `--double` 1 of its 19 double-stream blocks and
  `--single` 2 of its 38 single-stream ones (FLUX.1's proportion). At this width a double block
  is 340 M parameters (1.36 GB in float32), a single block 142 M (0.57 GB): 2 + 4 blocks would
  not fit in 8 GB (see Memory).
- `--family sd3`: diffusers' SD3Transformer2DModel of SD3.5-Medium's shapes: hidden 1536 = 24
  heads x 64, patch 2, 16 channels, text 4096 wide (77 CLIP + 256 T5 tokens), pooled 2048,
  qk-norm "rms_norm", the extra image attention in its first blocks (13 of 24 there, the same
  share here, never the last), position table of 384 patches; `--depth` 4 of its 24 blocks
  (a joint block is 85 M parameters, 340 MB; the position table 0.9 GB, in the weights file too).
  Guidance is classifier-free: `--guidance` 4.5 doubles the model batch, 1 halves the work.
Both: a 64x64 latent (512 px, 1024 image tokens; `--latent`), the schedulers of the models'
own pipeline folders (FLUX's with its dynamic shift). `--heads` narrows the model, for a quick
check of this script only.

How: every plan is planned and transformed (`check=False`) into a temporary folder (`--tmp`: one
weights file per plan, sizes below). The PyTorch model is then dropped unless `--eager` also
times eager PyTorch `full`. As in bench_pixart.py the plans are timed round-robin (full, each
plan, then again), so that the machine's drift spreads over all rows alike, medians of
`--repeats`. Every ONNX Runtime session holds its own copy of the weights, so bench_pixart's
way, every session open at once (`--load all`), needs a copy per plan; by default (`--load
each`) one session is open at a time, reopened every round and warmed up by running each of its
variants once before its timed run.

Memory (peak resident set, measured on the 2-core machine): an artifact's export holds about 2.3
times the model's float32 weights; a session open for timing holds one copy of them, two for a
plan of 3 or more variants (taylor:2 at 4 steps). The default FLUX (687 M parameters, a 2.56 GiB
weights file per artifact): 6.1 GiB over full and fora:2, ~8 GiB expected with the taylor plans
(at 1 + 1 blocks, 2.03 GiB file: 5.0 GiB for the exports, 6.7 GiB with taylor:2's session); the
default SD3 (362 M parameters; 2.20 GiB file, 0.84 GiB of it the position table, which no
session reads): 4.4 GiB over full and fora:2. `--double 2 --single 4` (1.31 B parameters) would
need ~12-14 GiB; `--load all`, one or two copies per plan.

Plans: `--plans`, default full,fora:2,fora:3,taylor:2,taylor:3. `l2c:2` is opt-in: it calibrates
on eager sampling runs of the model and trains its router (`--calib-images` prompts, default 4;
the planner's default is 48): at these widths its calibration alone is 4 eager 10-step runs
(~10 minutes for the default FLUX on 2 cores), and training its routers takes longer still, far
over the few minutes a plan should take here (checked on a narrowed model only, `--heads 2`).
With random weights its choice of branches is arbitrary; its speed is what is timed.

Time (2 shared cores, load average 2-4): a full step at 1024 tokens took 8-12.5 s (default FLUX)
and ~12 s (default SD3, CFG), a transform 1-2 minutes; a default run, ~25-35 minutes for either.

Writes JSON and a markdown table (`--out` without suffix; default benchmarks/results/
mmdit-<family>-<depth>): the table as bench_pixart's, plus the model's size, the weights file's,
the peak resident memory, the load averages before and after, torch and onnxruntime versions
and the command line.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pixart import format_table as pixart_table  # noqa: E402
from bench_plans import SharedLearning, peak_rss_mib, rss_mib, time_runs, write_result  # noqa: E402
from tcgraph import api  # noqa: E402
from tcgraph.export.artifact import load_artifact  # noqa: E402
from tcgraph.plan import plan_flops  # noqa: E402
from tcgraph.runtime.dispatch import ScheduleDispatcher  # noqa: E402
from tcgraph.sampling import SamplerSettings, make_noise, run_batches, sampler_for  # noqa: E402
from tcgraph.sampling.conditioning import Text  # noqa: E402

DEFAULT_PLANS = "full,fora:2,fora:3,taylor:2,taylor:3"
WEIGHT_STD = 0.02
# The real models' sizes (their transformer/config.json), and what each family's prompts are.
FLUX_DEV = dict(heads=24, head_dim=128, channels=16, text_width=4096, pooled=768, axes=(16, 56, 56),
                guidance=3.5, text_length=128, double_blocks=19, single_blocks=38)
SD35_MEDIUM = dict(heads=24, head_dim=64, channels=16, text_width=4096, pooled=2048, depth=24, dual_blocks=13,
                   pos_embed_max_size=384, guidance=4.5, text_length=77 + 256)
# The schedulers of the pipeline folders (scheduler/scheduler_config.json).
FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                  "max_image_seq_len": 4096}
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn anew, N(0, WEIGHT_STD^2): diffusers zero-initialises some gates and outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * WEIGHT_STD)
    return model.eval()


def flux_model(double: int, single: int, heads: int, latent: int, seed: int):
    """A random FluxTransformer2DModel of FLUX.1-dev's shapes (`heads` of 128), wrapped."""
    from diffusers import FluxTransformer2DModel

    from tcgraph.models.diffusers.flux import wrap
    from tcgraph.models.diffusers.flux_config import FluxConfig, flux_kwargs

    f = FLUX_DEV
    config = FluxConfig(input_size=latent, in_channels=f["channels"], hidden_size=heads * f["head_dim"],
                        depth=double + single, num_heads=heads, single_depth=single, caption_channels=f["text_width"],
                        pooled_channels=f["pooled"], guidance_embeds=True, axes_dims_rope=f["axes"])
    return wrap(randomize(FluxTransformer2DModel(**flux_kwargs(config)), seed), config)


def sd3_model(depth: int, heads: int, latent: int, seed: int):
    """A random SD3Transformer2DModel of SD3.5-Medium's shapes (`heads` of 64), wrapped; its first blocks
    have the extra image attention in SD3.5-Medium's share (13 of 24), the last one never."""
    from diffusers import SD3Transformer2DModel

    from tcgraph.models.diffusers.sd3 import DiffusersSD3
    from tcgraph.models.diffusers.sd3_config import SD3Config, sd3_kwargs

    s = SD35_MEDIUM
    dual = min(depth - 1, round(depth * s["dual_blocks"] / s["depth"]))
    config = SD3Config(input_size=latent, patch_size=2, in_channels=s["channels"], hidden_size=heads * s["head_dim"],
                       depth=depth, num_heads=heads, caption_channels=s["text_width"], pooled_channels=s["pooled"],
                       dual_attention_layers=tuple(range(dual)), qk_norm="rms_norm",
                       pos_embed_max_size=s["pos_embed_max_size"])
    return DiffusersSD3(randomize(SD3Transformer2DModel(**sd3_kwargs(config)), seed), input_size=latent).eval()


def prompts(n: int, length: int, width: int, pooled: int, guided: bool, seed: int) -> Text:
    """n random prompts (every token read: FLUX and SD3 take no mask) with pooled embeddings; with
    guidance, one negative prompt for all, as pipelines repeat it."""
    g = torch.Generator().manual_seed(seed)
    text = dict(embeddings=torch.randn(n, length, width, generator=g), mask=torch.ones(n, length),
                pooled=torch.randn(n, pooled, generator=g))
    if guided:
        text.update(negative_embeddings=torch.randn(1, length, width, generator=g).expand(n, -1, -1).clone(),
                    negative_mask=torch.ones(n, length),
                    negative_pooled=torch.randn(1, pooled, generator=g).expand(n, -1).clone())
    return Text(**text)


class _WarmedUp(Exception):
    """Raised by `warm_up`'s step function once every variant has run."""


def warm_up(sample, dispatch: ScheduleDispatcher, schedule: list[str]) -> None:
    """`sample(step_fn)`, a sampling run, until every variant of `schedule` has run once: the first call of a
    session's variant pays its allocations and page faults (measured: a first whole run ~30 % slower)."""
    last = max(schedule.index(v) for v in set(schedule))

    def step(i: int, *inputs):
        if i > last:
            raise _WarmedUp
        return dispatch(i, *inputs)

    with contextlib.suppress(_WarmedUp):
        sample(step)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", choices=("flux", "sd3"), default="flux")
    ap.add_argument("--plans", default=DEFAULT_PLANS, help="comma list; `full` is always timed, first")
    ap.add_argument("--double", type=int, default=1, help="flux: double-stream blocks (FLUX.1 has 19)")
    ap.add_argument("--single", type=int, default=2, help="flux: single-stream blocks (FLUX.1 has 38)")
    ap.add_argument("--depth", type=int, default=4, help="sd3: blocks (SD3.5-Medium has 24)")
    ap.add_argument("--heads", type=int, default=24, help="attention heads (both models: 24); fewer narrows the "
                                                          "model, for a quick check of this script only")
    ap.add_argument("--latent", type=int, default=64, help="latent side (64: 512 px, 1024 image tokens)")
    ap.add_argument("--text-length", type=int, default=None, help="text tokens (flux: 128; sd3: 77 + 256)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=None, help="flux: the guidance input (3.5); sd3: the CFG "
                                                                  "scale (4.5; 1: no negative half)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--load", choices=("each", "all"), default="each",
                    help="each: one session open at a time, reopened every round; all: every session open at once")
    ap.add_argument("--eager", action="store_true", help="also time eager PyTorch full (keeps the model in memory)")
    ap.add_argument("--calib-images", type=int, default=4, help="l2c: calibration prompts (planner default: 48)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", type=Path, default=None, help="folder for the artifacts (default: the system's)")
    ap.add_argument("--out", type=Path, default=None, help="output path without suffix "
                                                           "(default benchmarks/results/mmdit-<family>-<depth>)")
    args = ap.parse_args(argv)
    load_before = os.getloadavg()
    flux = args.family == "flux"
    real = FLUX_DEV if flux else SD35_MEDIUM
    length = args.text_length or real["text_length"]
    guidance = real["guidance"] if args.guidance is None else args.guidance

    t0 = time.perf_counter()
    if flux:
        model = flux_model(args.double, args.single, args.heads, args.latent, args.seed)
        depth = (f"{args.double} double + {args.single} single blocks (FLUX.1: {real['double_blocks']} + "
                 f"{real['single_blocks']})")
    else:
        model = sd3_model(args.depth, args.heads, args.latent, args.seed)
        depth = (f"{args.depth} blocks, {len(model.config.dual_attention_layers)} with the image attention "
                 f"(SD3.5-Medium: {real['depth']}, {real['dual_blocks']})")
    cfg = model.config
    settings = SamplerSettings(sampler="diffusers", scheduler=FLUX_SCHEDULER if flux else SD3_SCHEDULER,
                               num_steps=args.steps, cfg_scale=guidance, batch=args.batch, resolution=cfg.input_size,
                               text_length=length, pooled=True, guidance="input" if flux else "cfg")
    guided = settings.model_batch > settings.batch
    params = sum(p.numel() for p in model.parameters())
    config = {"model": f"{'FLUX.1-dev' if flux else 'SD3.5-Medium'} (random) {depth}, hidden {cfg.hidden_size}, "
                       f"heads {cfg.num_heads}, {cfg.num_tokens} image tokens, text {length} x {cfg.caption_channels}",
              "family": args.family, "depth": depth, "parameters": params, "steps": args.steps, "guidance": guidance,
              "guidance_mode": settings.guidance, "model_batch": settings.model_batch, "batch": args.batch,
              "repeats": args.repeats, "load": args.load, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "python": sys.version.split()[0],
              "torch": torch.__version__, "onnxruntime": _ort_version(), "load_average_before": load_before,
              "model_s": round(time.perf_counter() - t0, 1),
              "command": "python benchmarks/bench_mmdit.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(config), flush=True)

    text = prompts(args.batch, length, cfg.caption_channels, cfg.pooled_channels, guided, args.seed)
    names = [p.strip() for p in args.plans.split(",") if p.strip()]
    names = ["full"] + [n for n in names if n != "full"]
    learned = any(n.split(":")[0] == "l2c" for n in names)  # calibrated on prompts of their own
    calibration = (prompts(args.calib_images, length, cfg.caption_channels, cfg.pooled_channels, guided,
                           args.seed + 1) if learned else None)
    shared = SharedLearning(model, settings, calibration)
    plans = {}
    for name in names:
        t0 = time.perf_counter()
        options = {"calib_images": args.calib_images} if name.split(":")[0] == "l2c" else {}
        plans[name] = shared.plan(name, **options)
        print(json.dumps({"plan": name, "planned_s": round(time.perf_counter() - t0, 1)}), flush=True)
    del shared
    full_flops = plan_flops(cfg, plans["full"])["total"]
    rows = [{"plan": name, "variants": len(plan.variants()),
             "predicted_speedup": full_flops / plan_flops(cfg, plan)["total"]} for name, plan in plans.items()]

    sampler = sampler_for(settings, cfg)
    noise = make_noise(args.batch, cfg.in_channels, settings.resolution, args.seed)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        paths = {}
        for i, (name, plan) in enumerate(plans.items()):
            t0 = time.perf_counter()
            paths[name] = api.transform(model, plan, Path(tmp) / f"p{i}", progress=False, check=False)
            print(json.dumps({"plan": name, "transform_s": round(time.perf_counter() - t0, 1),
                              "rss_mib": round(rss_mib())}), flush=True)
        arts = {name: load_artifact(path) for name, path in paths.items()}  # every file's hash checked, once
        config["weights_bytes"] = arts["full"].weights_path.stat().st_size
        eager = functools.partial(api.sample_eager, model, settings, text, args.seed) if args.eager else None
        del model
        gc.collect()  # without --eager the PyTorch weights leave: only the sessions' copies stay
        print(json.dumps({"weights_gib": round(config["weights_bytes"] / 2**30, 2), "rss_mib": round(rss_mib())}),
              flush=True)

        def opened(stack: contextlib.ExitStack, name: str):
            """The sampling run of `name`'s artifact, its session opened (closed with `stack`) and warmed up."""
            t0 = time.perf_counter()
            runner = stack.enter_context(api.make_runner("ort", arts[name]))
            dispatch = ScheduleDispatcher.for_plan(runner, plans[name])

            def sample(step_fn):
                return run_batches(step_fn, dispatch.reset, sampler, text, noise, settings.batch, args.seed)

            t1 = time.perf_counter()
            warm_up(sample, dispatch, plans[name].schedule())
            print(json.dumps({"plan": name, "load_s": round(t1 - t0, 1),
                              "warm_up_s": round(time.perf_counter() - t1, 1), "rss_mib": round(rss_mib())}),
                  flush=True)
            return functools.partial(sample, dispatch)

        times = {name: [] for name in plans} | ({"eager full": []} if eager else {})
        with contextlib.ExitStack() as kept:  # --load all: every session for the whole run, as bench_pixart
            runs = {name: opened(kept, name) for name in plans} if args.load == "all" else {}
            if eager:
                eager()  # its warm-up
            for r in range(args.repeats):  # round-robin, so that drift spreads over every row alike
                for name in times:
                    with contextlib.ExitStack() as once:  # --load each: one session at a time
                        run = eager if name == "eager full" else runs.get(name) or opened(once, name)
                        times[name] += time_runs(run, 1)
                    gc.collect()  # the closed session's buffers, before the next one opens
                print(json.dumps({"round": r + 1, "times_s": {k: round(v[-1], 2) for k, v in times.items()}}),
                      flush=True)
    config["load_average_after"] = os.getloadavg()
    full = statistics.median(times["full"])
    for row in rows:
        row["times_s"] = times[row["plan"]]
        row["median_s"] = statistics.median(row["times_s"])
        row["realized_speedup"] = full / row["median_s"]
        row["realized_over_predicted"] = row["realized_speedup"] / row["predicted_speedup"]
    eager_s = statistics.median(times["eager full"]) if eager else None
    result = {"config": config, "peak_rss_mib": peak_rss_mib(), "eager_times_s": times.get("eager full"),
              "eager_median_s": eager_s, "ort_full_over_eager": None if eager_s is None else full / eager_s,
              "rows": rows}
    tag = f"d{args.double}-s{args.single}" if flux else f"d{args.depth}"
    out = args.out or Path(__file__).parent / "results" / f"mmdit-{args.family}-{tag}"
    return write_result(result, out, format_table(result))


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def format_table(result: dict) -> str:
    """bench_pixart's table, then what this machine and run were."""
    c = result["config"]
    before, after = (", ".join(f"{v:.2f}" for v in c[k]) for k in ("load_average_before", "load_average_after"))
    loading = ("every session open at once" if c["load"] == "all" else
               "one session open at a time, reopened and warmed up every round")
    return "\n".join([
        pixart_table(result), "",
        f"- model: {c['parameters'] / 1e6:.0f} M parameters (float32); weights file (variants/weights.bin) "
        f"{c['weights_bytes'] / 2**30:.2f} GiB per artifact; peak resident memory "
        f"{result['peak_rss_mib'] / 1024:.1f} GiB",
        f"- guidance {c['guidance']} as {'an input, one pass per step' if c['guidance_mode'] == 'input' else 'CFG'} "
        f"(model batch {c['model_batch']}); plans timed round-robin, {loading}",
        f"- load average (1, 5, 15 min) before: {before}; after: {after}",
        f"- torch {c['torch']}, onnxruntime {c['onnxruntime']}, Python {c['python']}, {c['machine']}",
    ])


if __name__ == "__main__":
    main()
