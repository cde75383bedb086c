"""Several plans, one process, one backend: speed, predicted speedup, quality vs `full`.

    python benchmarks/bench_plans.py                                  # demo model, full/fora:2/fora:3
    python benchmarks/bench_plans.py --model DiT-S/2 --per-class 1 --classes 0-1   # 256 tokens, random weights

Every plan is transformed into a temporary folder and loaded with the ONNX Runtime
runner, with one warm-up sampling run. Then `--repeats` rounds time the whole sampling
loop of each plan and of eager PyTorch, interleaved round-robin, and the median is reported. Quality is measured against the `full` plan's samples from the same noise and
labels (PSNR/SSIM), plus class accuracy and digits-FD on the demo model. Also reported:
eager PyTorch `full` time (same batching), FLOP-predicted speedup, realized/predicted
ratio, resident memory added by each plan's sessions after one run, and the process peak RSS.
Writes JSON (`--out`) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tcgraph import api
from tcgraph.errors import TcgraphError
from tcgraph.export.artifact import load_artifact
from tcgraph.models.official.dit import CONFIGS, DiT, make_config, randomize_weights
from tcgraph.plan import Plan, make_plan, plan_flops
from tcgraph.plan.registry import PLANNERS
from tcgraph.sampling import SamplerSettings, make_noise, run_batches, sampler_for
from tcgraph.progress import QUIET, Progress
from tcgraph.runtime.dispatch import ScheduleDispatcher


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_result(result: dict, out: Path, table: str) -> dict:
    """Write a benchmark's `result` as `out`.json and its `table` as `out`.md, print the table; returns `result`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    print(table)
    print(f"\nwrote {out.with_suffix('.json')} and .md")
    return result


def time_runs(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits", help="'digits' (trained), 'digits-diffusers' (the same weights in diffusers' layout), a diffusers folder, or a config name (random weights)")
    ap.add_argument("--plans", default="full,fora:2,fora:3")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--classes", default=None)
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch and ORT intra-op threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-share-weights", action="store_true", help="one weight copy per ORT session")
    ap.add_argument("--no-cpu-arena", action="store_true", help="ORT sessions without their CPU memory arenas")
    ap.add_argument("--allow-spinning", action="store_true", help="let idle ORT threads spin (runner default: off)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/plans-<model>.json)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    model = benchmark_model(args.model, args.seed)
    cfg = model.config
    text_length, conditioning, calibration = 0, None, None
    if args.model == "digits-text":  # prompts "a handwritten <digit>", judged as that digit
        from tcgraph.demos.digits_text import calibration_prompts, load_prompt_encoder, prompt_for

        encoder = load_prompt_encoder()
        text_length, calibration = encoder.length, calibration_prompts(encoder)
    settings = SamplerSettings(num_steps=args.steps, cfg_scale=args.guidance, batch=args.batch,
                               resolution=cfg.input_size, clip_x0=True if is_digits(args.model) else None,
                               text_length=text_length)
    plans = [p.strip() for p in args.plans.split(",")]
    if plans[0] != "full":
        plans.insert(0, "full")
    labels = labels_for(args.classes, args.per_class, 10 if cfg.text_conditioned else cfg.num_classes)
    if cfg.text_conditioned:
        conditioning = encoder.encode([prompt_for(d) for d in labels], negative="")
    config = {"model": args.model, "steps": args.steps, "guidance": args.guidance, "batch": args.batch,
              "images": len(labels), "repeats": args.repeats, "threads": torch.get_num_threads(),
              "backend": "ort-cpu", "share_weights": not args.no_share_weights,
              "cpu_arena": not args.no_cpu_arena, "allow_spinning": args.allow_spinning, "machine": platform.processor() or platform.machine(),
              "python": sys.version.split()[0], "torch": torch.__version__,
              "command": "python benchmarks/bench_plans.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(config), flush=True)

    t0 = time.perf_counter()
    named = make_plans(plans, model, settings, calibration)
    config["planning_s"] = round(time.perf_counter() - t0, 1)
    runner_opts = {"share_weights": not args.no_share_weights, "cpu_arena": not args.no_cpu_arena,
                   "allow_spinning": args.allow_spinning}
    if args.threads:
        runner_opts["intra_op_threads"] = args.threads
    result = compare_plans(model, settings, named, labels, config, seed=args.seed, repeats=args.repeats,
                           runner_opts=runner_opts, digits=is_digits(args.model), conditioning=conditioning)
    out = args.out or Path(__file__).parent / "results" / f"plans-{args.model.replace('/', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(format_table(result))
    print(f"\nwrote {out}")
    return result


def make_plans(specs: list[str], model, settings: SamplerSettings, calibration=None, options: dict | None = None,
               progress: Progress = QUIET) -> dict:
    """spec -> `make_plan(spec, ...)` for every spec, the learned ones sharing their work (`SharedLearning`)."""
    shared = SharedLearning(model, settings, calibration, progress)
    return {spec: shared.plan(spec, **(options or {})) for spec in specs}


class SharedLearning:
    """Learned plans of one model and sampler settings that share what does not depend on their target.

    Each plan is the one `make_plan(spec, model.config, settings, weights=model,
    calibration_text=...)` returns (the same computations on the same inputs), but what
    several specs would each recompute is made once: the calibration trajectories (one set per
    calib_images and seed: l2c, tokencache, tokencache+l2c and dynamic calibrate alike), the
    forecast Grams of `select.finish_learned`, TokenCache's Cache Predictor and block
    sensitivities (target-independent), and L2C's routers of an (interval, λ) that two targets
    both search (`make_l2c(routers=...)`). Measured on digits-text: calibration and Grams are
    ~13 % of one learned plan, the predictor ~65 % of a tokencache plan.
    """

    def __init__(self, model, settings: SamplerSettings, calibration=None, progress: Progress = QUIET):
        self.model, self.settings, self.text, self.progress = model, settings, calibration, progress
        self._traj, self._grams, self._predictors, self._routers = {}, {}, {}, {}

    def plan(self, spec: str, **options) -> Plan:
        from tcgraph.plan.planners.l2c import make_l2c
        from tcgraph.plan.learning.select import finish_learned
        from tcgraph.plan.planners.tokencache import learn_predictor, make_tokencache

        name, *args = spec.split(":")
        planner = PLANNERS.get(name)
        cfg = self.model.config
        text = {"calibration_text": self.text} if self.text is not None else {}
        if planner is None or not planner.learned or getattr(planner.configure(spec, args, options), "router", None):
            return make_plan(spec, cfg, self.settings, weights=self.model, progress=self.progress,
                             **(text if planner is not None and planner.learned else {}), **options)
        config = planner.configure(spec, args, options)
        traj = self.trajectories(config)
        common = dict(weights=self.model, progress=self.progress, traj=traj, **text)
        if name == "l2c":
            base = make_l2c(config, cfg, self.settings, finish=False,
                            routers=self._routers.setdefault(id(traj), {}), **common)
        elif name == "tokencache":
            base = make_tokencache(config, cfg, self.settings, finish=False,
                                   learned=self.predictor(config, traj, learn_predictor), **common)
        else:  # tokencache+l2c, dynamic: their own make, on the shared trajectories
            return planner.make(config, cfg, self.settings, **common)
        train, held = traj.split(config.num_held_out)
        grams = self.grams(traj, config.num_held_out, train, held) if config.forecast else None
        return finish_learned(self.model, train, held, base.planner, base.recipes, base.params,
                              forecast=config.forecast, max_cache_mb=config.max_cache_mb,
                              max_variants=config.max_variants, compete=config.compete, grams=grams,
                              progress=self.progress)

    def trajectories(self, config):
        """The calibration `calibration_split` makes for `config` (once per calibration images, seed and
        the image where its forecast Grams are cut: the same chunks as a plan made alone)."""
        from tcgraph.plan.learning.common import calibration_of

        grams_at = config.calib_images - config.num_held_out if getattr(config, "forecast", False) else None
        key = (config.calib_images, config.seed, grams_at)
        if key not in self._traj:
            self._traj[key] = calibration_of(self.model, self.settings, config, None, self.progress, self.text)
        return self._traj[key]

    def grams(self, traj, held_out: int, train, held) -> tuple:
        """`finish_learned`'s forecast Grams of (train, held) = traj.split(held_out), once per split."""
        from tcgraph.plan.learning.forecast import output_grams

        key = (id(traj), held_out)
        if key not in self._grams:
            steps = self.settings.num_steps
            with self.progress.phase("forecast weights", (train.num_images + 3) // 4 * steps
                                     + (held.num_images + 3) // 4 * steps) as phase:
                self._grams[key] = output_grams(self.model, train, phase=phase), output_grams(self.model, held,
                                                                                              phase=phase)
        return self._grams[key]

    def predictor(self, config, traj, learn_predictor) -> tuple:
        """TokenCache's (Cache Predictor, block sensitivities) for `config`'s learning options, once each."""
        key = (id(traj), config.num_held_out, config.keep_ratio, config.mu, config.train_window, config.epochs,
               config.batch_images, config.lr, config.seed)
        if key not in self._predictors:
            train, held = traj.split(config.num_held_out)
            self._predictors[key] = learn_predictor(config, self.model, train, held, self.progress)
        return self._predictors[key]


def benchmark_model(name: str, seed: int = 0) -> DiT:
    """'digits' (the trained demo model), 'digits-diffusers' (the demo's weights converted to
    diffusers' DiTTransformer2DModel), a diffusers folder, or a registered config with random
    weights (speed only)."""
    if name in ("digits", "digits-text"):
        return api.load_dit(name)
    if name == "digits-diffusers":
        from tcgraph.models.diffusers.dit import save_as_diffusers

        with tempfile.TemporaryDirectory() as tmp:
            return api.load_dit(str(save_as_diffusers(api.load_dit("digits"), Path(tmp) / "m")))
    if name in CONFIGS:
        return randomize_weights(DiT(make_config(name)), seed=seed)
    if Path(name).is_dir():
        return api.load_dit(name)
    raise TcgraphError(f"unknown model {name!r}; use 'digits', 'digits-diffusers', a diffusers folder or one of "
                       f"{', '.join(CONFIGS)}")


def is_digits(name: str) -> bool:
    """Whether the model is the demo's weights (either layout): judged by the digits classifier."""
    return name in ("digits", "digits-diffusers", "digits-text")


def labels_for(classes: str | None, per_class: int, num_classes: int) -> list[int]:
    return [c for c in api.parse_classes(classes, num_classes) for _ in range(per_class)]


def with_baselines(cfg, settings: SamplerSettings, fora: str, learned: dict) -> dict:
    """`full` first (the quality reference), then `fora:N` for N in the comma list, then `learned`."""
    plans = {"full": make_plan("full", cfg, settings)}
    plans.update({f"fora:{n}": make_plan(f"fora:{n}", cfg, settings) for n in fora.split(",")})
    return {**plans, **learned}


def compare_plans(model, settings: SamplerSettings, plans: dict, labels: list[int], config: dict, *, seed: int = 0,
                  repeats: int = 3, runner_opts: dict | None = None, digits: bool = False, conditioning=None) -> dict:
    """Transform and load every plan (the first must be `full`), then time all of them and eager
    PyTorch round-robin; quality of each against the first plan's samples. `conditioning` (a `Text`
    of one prompt per label, for a text-conditioned model) is what the sampler is conditioned on;
    `labels` are then the digits the prompts ask for."""
    conditioning = labels if conditioning is None else conditioning
    # Load every plan first, then time them round-robin (eager, full, plan 2, …, eager, full, …):
    # a shared machine drifts, and interleaving spreads the drift over all plans alike.
    cfg = model.config
    sampler = sampler_for(settings, cfg)
    noise = make_noise(len(labels), cfg.in_channels, settings.resolution, seed)
    rows, runs = [], {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        for i, (name, plan) in enumerate(plans.items()):
            path = api.transform(model, plan, Path(tmp) / f"p{i}", progress=False)
            art = load_artifact(path)
            rss_before = rss_mib()
            runner = stack.enter_context(api.make_runner("ort", art, **(runner_opts or {})))
            dispatch = ScheduleDispatcher.for_plan(runner, plan)
            run = functools.partial(run_batches, dispatch, dispatch.reset, sampler, conditioning, noise,
                                    settings.batch, seed)
            samples = run()  # warm-up, and the samples we judge
            rss_loaded = rss_mib() - rss_before  # after a run: mapped weights are resident once touched
            runs[name] = run
            rows.append({"plan": name, "variants": len(plan.variants()),
                         "predicted_speedup": plan_flops(cfg, plan)["predicted_speedup"],
                         "sessions_rss_mib": rss_loaded, "samples": samples})
        runs["eager"] = lambda: api.sample_eager(model, settings, conditioning, seed)
        times = {name: [] for name in runs}
        for _ in range(repeats):
            for name, run in runs.items():
                times[name].extend(time_runs(run, 1))
    reference = rows[0].pop("samples")
    for row in rows[1:] + rows[:1]:
        samples = row.pop("samples", reference)
        row.update(median_s=statistics.median(times[row["plan"]]), times_s=times[row["plan"]])
        row.update(_quality(samples, reference, labels, digits))
        print(json.dumps(row), flush=True)
    eager_times = times["eager"]
    full_time = rows[0]["median_s"]
    for row in rows:
        row["realized_speedup"] = full_time / row["median_s"]
        row["realized_over_predicted"] = row["realized_speedup"] / row["predicted_speedup"]
    return {"config": config, "eager_full_median_s": statistics.median(eager_times),
            "eager_times_s": eager_times, "peak_rss_mib": peak_rss_mib(), "rows": rows}


def _quality(samples, reference, labels, digits: bool) -> dict:
    from tcgraph.eval import compare_samples

    q = compare_samples(samples, reference)
    if digits:
        from tcgraph.eval import digits_quality

        q.update(digits_quality(samples, torch.tensor(labels)))
    return q


def format_table(result: dict) -> str:
    c = result["config"]
    head = (f"model {c['model']}, DDIM {c['steps']}, guidance {c['guidance']}, batch {c['batch']} "
            f"({c['images']} images), {c['backend']}, {c['threads']} threads, median of {c['repeats']}\n"
            f"eager PyTorch full: {result['eager_full_median_s']:.3f} s; peak RSS {result['peak_rss_mib']:.0f} MiB\n")
    cols = ["plan", "variants", "median s", "realized x", "predicted x", "real/pred", "PSNR dB", "SSIM"]
    digits = "accuracy" in result["rows"][0]
    if digits:
        cols += ["class acc", "digits-FD"]
    cols.append("sessions MiB")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in result["rows"]:
        vals = [r["plan"], str(r["variants"]), f"{r['median_s']:.3f}", f"{r['realized_speedup']:.2f}",
                f"{r['predicted_speedup']:.2f}", f"{r['realized_over_predicted']:.2f}", f"{r['psnr']:.1f}",
                f"{r['ssim']:.3f}"]
        if digits:
            vals += [f"{r['accuracy']:.1%}", f"{r['digits_fd']:.2f}"]
        vals.append(f"{r['sessions_rss_mib']:.0f}")
        lines.append("| " + " | ".join(vals) + " |")
    return head + "\n".join(lines)


if __name__ == "__main__":
    main()
