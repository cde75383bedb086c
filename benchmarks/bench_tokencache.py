"""TokenCache beside FORA, Learning-to-Cache, dynamic tokens and the combined plan, at matched
FLOP-predicted compute, in one run on ONNX Runtime CPU; plus the ablations.

    python benchmarks/bench_tokencache.py                          # demo model, targets 1.5 2 2.5 3
    python benchmarks/bench_tokencache.py --model DiT-S/2 --classes 0-1 --per-class 1 --batch 2 --repeats 2

**Demo model** (trained): one calibration (48 images, 16 held out) and one Cache Predictor
serve every target; for each target X the planners `tokencache:X`, `dynamic:X` (the same
schedule and token counts, tokens picked per sample in the graph), `l2c:X` and
`tokencache+l2c:X` run as `tcgraph transform` runs them. Ablations, by the held-out
teacher-forced eps error (`plan.evaluate.plan_error`) at the same predicted speedup:
the predictor vs random token rankings (3 seeds), block selection vs uniform pruning (every
block the same keep count, the largest that meets X), TPRR (the best two-phase schedule)
vs the best single fixed interval, each with its own block selection.

**DiT-S/2 shapes** (`--model DiT-S/2`, 256 tokens, random weights: speed only). Learning
on a random model would measure nothing, so the plans are built from the same planner
functions with untrained scores and equal block sensitivities (the first TPRR candidate,
random L2C probabilities). Speed depends on the plan's structure (which branches, how many
tokens), not on which tokens, so the timings stand for learned plans of the same shape.

Writes JSON and prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_l2c import format_l2c, l2c_diagnostics  # noqa: E402
from bench_plans import compare_plans, format_table, labels_for, with_baselines  # noqa: E402

from tcgraph import api  # noqa: E402
from tcgraph.calibrate import calibrate  # noqa: E402
from tcgraph.models.official.dit import DiT, make_config, randomize_weights  # noqa: E402
from tcgraph.errors import TcgraphError  # noqa: E402
from tcgraph.plan import Plan, plan_flops  # noqa: E402
from tcgraph.plan.planners.combined import (  # noqa: E402
    SHARES,
    CombinedConfig,
    make_combined,
    prune_to_target,
    skeleton_interval,
    token_floor,
)
from tcgraph.plan.learning.evaluate import plan_error, speedup_of  # noqa: E402
from tcgraph.plan.planners.l2c import L2CConfig, make_l2c, recipes_for_target  # noqa: E402
from tcgraph.plan.learning.common import candidate_intervals  # noqa: E402
from tcgraph.plan.learning.predictor import init_predictor  # noqa: E402
from tcgraph.plan.planners.tokencache import TokenCacheConfig, learn_predictor, make_tokencache, to_dynamic  # noqa: E402
from tcgraph.plan.learning.tprr import (  # noqa: E402
    keep_floor,
    layout_speedup,
    tprr_candidates,
    tprr_choices,
    tprr_layout,
    tprr_recipes,
)
from tcgraph.sampling import SamplerSettings  # noqa: E402


# TokenCache settings tried in order until a target is reachable: (min_keep, max_stale). Token
# pruning alone saves less than reuse (keys/values of every token are still projected), so
# high targets need lower floors or longer rounds without rotation; the row records which.
LADDER = ((0.25, 2), (0.1, 2), (0.1, 6), (0.0, 6))


def tokencache_config(cfg, S, target, calib_images) -> TokenCacheConfig:
    for min_keep, max_stale in LADDER:
        tcfg = TokenCacheConfig(target_speedup=target, min_keep=min_keep, max_stale=max_stale,
                                calib_images=calib_images)
        try:
            tprr_candidates(cfg, S, target, min_keep, max_stale, tcfg.max_variants)
            return tcfg
        except TcgraphError:
            continue
    raise TcgraphError(f"TokenCache cannot reach {target}x with any of {LADDER}")


def uniform_keep(cfg, S, slots, floor, target) -> list[int] | None:
    """The largest keep count, the same in every block, whose plan meets `target`."""
    n, depth = cfg.num_tokens, cfg.depth
    if layout_speedup(cfg, S, slots, [floor] * depth) < target:
        return None
    lo, hi = floor, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if layout_speedup(cfg, S, slots, [mid] * depth) >= target:
            lo = mid
        else:
            hi = mid - 1
    return [lo] * depth


def ablations(model, held, tc: Plan, scores, tcfg: TokenCacheConfig) -> dict:
    cfg, S = model.config, tc.settings.num_steps
    p = tc.params
    tp, keep = (p["b"], p["K1"], p["K2"]), p["keep_counts"]
    kw = dict(max_stale=tcfg.max_stale, max_variants=tcfg.max_variants)
    out = {"learned": p["held_out_error"], "predicted_speedup": p["predicted_speedup"]}
    out["random_tokens"] = [plan_error(model, held, tprr_recipes(
        init_predictor(S, cfg.depth, cfg.num_tokens, tcfg.keep_ratio, seed), keep, *tp, **kw)) for seed in (1, 2, 3)]
    slots = tprr_layout(S, *tp, tcfg.max_stale, tcfg.max_variants)
    uk = uniform_keep(cfg, S, slots, keep_floor(cfg, tcfg.min_keep), p["target_speedup"])
    if uk is not None:
        rec = tprr_recipes(scores, uk, *tp, **kw)
        out["uniform_pruning"] = {"keep": uk[0], "predicted_speedup": speedup_of(cfg, rec),
                                  "held_out_error": plan_error(model, held, rec)}
    rows = [r for r in p["search"] if "held_out_error" in r]
    single = [r for r in rows if r["b"] == 0 or r["K1"] == r["K2"]]
    two = [r for r in rows if not (r["b"] == 0 or r["K1"] == r["K2"])]
    if single:
        out["best_single_interval"] = min(single, key=lambda r: r["held_out_error"])
    if two:
        out["best_tprr"] = min(two, key=lambda r: r["held_out_error"])
    return out


def learned_plans(model, settings, targets, calib_images, png_dir: Path) -> tuple[dict, dict]:
    info = {}
    t0 = time.perf_counter()
    traj = calibrate(model, settings, calib_images, seed=0)
    info["calibration_s"] = time.perf_counter() - t0
    tcfg = TokenCacheConfig(calib_images=calib_images)
    train, held = traj.split(tcfg.num_held_out)
    t0 = time.perf_counter()
    learned = learn_predictor(tcfg, model, train, held)
    info["predictor_s"] = time.perf_counter() - t0
    info["sensitivity"] = learned[1]
    info["predictor_loss"] = learned[0].history
    plans, info["targets"] = {}, []
    for x in targets:
        row = {"target": x}
        t0 = time.perf_counter()
        xcfg = tokencache_config(model.config, settings.num_steps, x, calib_images)
        row["tokencache_settings"] = {"min_keep": xcfg.min_keep, "max_stale": xcfg.max_stale}
        tc = make_tokencache(xcfg, model.config, settings, weights=model, traj=traj, learned=learned)
        row["tokencache_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        l2c = make_l2c(L2CConfig(target_speedup=x, calib_images=calib_images), model.config, settings,
                       weights=model, traj=traj)
        row["l2c_s"] = time.perf_counter() - t0
        row["l2c"] = l2c_diagnostics(model, held, l2c, png_dir)
        t0 = time.perf_counter()
        comb = make_combined(CombinedConfig(target_speedup=x, calib_images=calib_images), model.config, settings,
                             weights=model, traj=traj, learned=learned)
        row["combined_s"] = time.perf_counter() - t0
        dyn = to_dynamic(tc)
        for name, plan in ((f"tokencache:{x}", tc), (f"dynamic:{x}", dyn), (f"l2c:{x}", l2c),
                           (f"tokencache+l2c:{x}", comb)):
            plans[name] = plan
            row[name] = {"predicted_speedup": speedup_of(model.config, plan.recipes),
                         "variants": len(plan.variants()), "held_out_error": plan_error(model, held, plan.recipes)
                         if name.startswith(("tokencache", "l2c")) else None}
        row["tokencache_params"] = {k: tc.params[k] for k in ("b", "K1", "K2", "keep_counts", "pruned_blocks")}
        row["ablations"] = ablations(model, held, tc, learned[0].logits, xcfg)
        print(json.dumps(row), flush=True)
        info["targets"].append(row)
    return plans, info


def structural_plans(model, settings, targets) -> dict:
    """Plans of the learned planners' shapes without learning (random models: speed only): the
    planners' own scores-to-recipes functions on untrained scores and equal sensitivities."""
    cfg, S, n = model.config, settings.num_steps, model.config.num_tokens
    scores = init_predictor(S, cfg.depth, n, 0.5, 0)
    sens = [1.0] * cfg.depth
    plans = {}
    for x in targets:
        tcfg = tokencache_config(cfg, S, x, 48)
        choices = tprr_choices(cfg, scores, sens, x, tprr_candidates(cfg, S, x, tcfg.min_keep, tcfg.max_stale,
                                                                     tcfg.max_variants),
                               min_keep=tcfg.min_keep, max_stale=tcfg.max_stale, max_variants=tcfg.max_variants)
        c = next((c for c in choices if c.recipes is not None), None)  # the first reachable TPRR candidate
        if c is None:
            raise TcgraphError(f"no TPRR candidate reaches {x}x on {args_model(cfg)}")
        tp, keep = c.tprr, c.keep
        tc = Plan(f"tokencache:{x}x", settings, c.recipes, n,
                  {"b": tp[0], "K1": tp[1], "K2": tp[2], "keep_counts": keep, "structural": True,
                   "min_keep": tcfg.min_keep, "max_stale": tcfg.max_stale})
        probs = torch.rand(S, cfg.depth, 2, generator=torch.Generator().manual_seed(0))
        k = candidate_intervals(cfg, S, x)[0]
        l2c = Plan(f"l2c:{x}x", settings, recipes_for_target(cfg, probs, k, x, 6), n, {"interval": k})
        ccfg = CombinedConfig(target_speedup=x)
        floor = token_floor(n, ccfg.min_keep)
        for share in SHARES:  # the first share that reaches the target (the planner keeps the best)
            base = recipes_for_target(cfg, probs, skeleton_interval(cfg, S, x, floor), x ** share,
                                      ccfg.max_variants)
            pruned = prune_to_target(cfg, base, scores, sens, floor, x)
            if pruned is not None:
                break
        if pruned is None:
            raise TcgraphError(f"no L2C share reaches {x}x with token pruning on {args_model(cfg)}")
        ck, comb_recipes = pruned
        comb = Plan(f"tokencache+l2c:{x}x", settings, comb_recipes, n, {"keep_counts": ck, "l2c_share": share})
        for name, plan in ((f"tokencache:{x}", tc), (f"dynamic:{x}", to_dynamic(tc)), (f"l2c:{x}", l2c),
                           (f"tokencache+l2c:{x}", comb)):
            plans[name] = plan
    return plans


def speed_plans(model, settings, names: list[str]) -> dict:
    """Plans by name for speed measurements: `full` and `fora:N` as `make_plan` makes them, the
    learned planners' names (`l2c:X`, `tokencache:X`, `dynamic:X`, `tokencache+l2c:X`) as their
    structural plans (`structural_plans`: shapes without learning)."""
    from tcgraph.plan import make_plan

    targets = sorted({float(n.partition(":")[2]) for n in names if n != "full" and not n.startswith("fora:")})
    learned = structural_plans(model, settings, targets) if targets else {}
    plans = {}
    for name in names:
        if name == "full" or name.startswith("fora:"):
            plans[name] = make_plan(name, model.config, settings)
            continue
        kind, _, target = name.partition(":")
        key = f"{kind}:{float(target)}"  # structural_plans' keys: targets as floats
        if key not in learned:
            raise TcgraphError(f"no structural plan {name!r} (have {sorted(learned)}); use full, fora:N or "
                               "l2c/tokencache/dynamic/tokencache+l2c:X")
        plans[name] = learned[key]
    return plans


def args_model(cfg) -> str:
    return f"a {cfg.depth}-block model with {cfg.num_tokens} tokens"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="digits", help="'digits' (trained) or DiT-S/2 (random weights, speed only)")
    ap.add_argument("--targets", default="1.5,2.0,2.5,3.0")
    ap.add_argument("--fora", default="2,3")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--calib-images", type=int, default=48)
    ap.add_argument("--classes", default=None)
    ap.add_argument("--per-class", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    digits = args.model == "digits"
    model = api.load_dit("digits") if digits else randomize_weights(DiT(make_config(args.model)), seed=0)
    cfg = model.config
    settings = SamplerSettings(num_steps=args.steps, cfg_scale=2.0, batch=args.batch, resolution=cfg.input_size)
    targets = [float(x) for x in args.targets.split(",")]
    config = {"model": args.model, "steps": args.steps, "guidance": 2.0, "batch": args.batch,
              "threads": torch.get_num_threads(), "backend": "ort-cpu", "repeats": args.repeats,
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "command": "python benchmarks/bench_tokencache.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print(json.dumps(config), flush=True)
    out = args.out or Path(__file__).parent / "results" / f"tokencache-{args.model.replace('/', '')}.json"
    if digits:
        learned, info = learned_plans(model, settings, targets, args.calib_images, out.parent)
    else:
        learned, info = structural_plans(model, settings, targets), {"structural": True}
    plans = with_baselines(cfg, settings, args.fora, learned)
    labels = labels_for(args.classes, args.per_class, cfg.num_classes)
    config["images"] = len(labels)
    result = compare_plans(model, settings, plans, labels, config, repeats=args.repeats, digits=digits)
    result["planning"] = info
    result["predicted"] = {n: plan_flops(cfg, p)["predicted_speedup"] for n, p in plans.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(format_table(result))
    if digits:
        print(format_ablations(result))
        print(format_l2c({"config": {**config, "calib_images": args.calib_images},
                          "calibration_s": info["calibration_s"],
                          "l2c": [{"target": r["target"], "train_s": r["l2c_s"], **r["l2c"]} for r in info["targets"]]}))
    print(f"\nwrote {out}")
    return result


def format_ablations(result: dict) -> str:
    lines = ["", "ablations: held-out eps error at the same predicted speedup (lower is better)",
             "| target | learned tokencache | random tokens (3 seeds) | uniform pruning | best TPRR | "
             "best single interval |", "|---|---|---|---|---|---|"]
    for row in result["planning"]["targets"]:
        a = row["ablations"]
        rnd = ", ".join(f"{e:.2e}" for e in a["random_tokens"])
        uni = a.get("uniform_pruning")
        uni_s = f"{uni['held_out_error']:.2e} (k={uni['keep']})" if uni else "out of reach"
        two, one = a.get("best_tprr"), a.get("best_single_interval")
        two_s = f"{two['held_out_error']:.2e} (b={two['b']}, K1={two['K1']}, K2={two['K2']})" if two else "-"
        one_s = f"{one['held_out_error']:.2e} (K={one['K2'] if one['b'] == 0 else one['K1']})" if one else "-"
        lines.append(f"| {row['target']} | {a['learned']:.2e} | {rnd} | {uni_s} | {two_s} | {one_s} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
