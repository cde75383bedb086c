"""Measured FLOPs (tcgraph.plan.costs) against the formulas of tcgraph.plan.flops, at full model sizes.

    python benchmarks/flop_table.py                     # writes benchmarks/results/flop-table.{json,md}

Models, all built on the meta device (no weights in memory; the counts need shapes only):
- DiT-S/2 and DiT-XL/2 at 256x256 (32x32 latents, patch 2: 256 tokens), official layout;
- DiT-XL/2 in diffusers' layout (DiTTransformer2DModel, same shapes);
- PixArt-alpha 256px's transformer, as README and benchmarks/bench_pixart.py run it: hidden 1152,
  16 heads, 28 blocks, 32x32 latents (256 tokens), text 120 x 4096 (T5-XXL);
- PixArt-alpha 1024px's: the same with 128x128 latents (4096 tokens) and its resolution/aspect
  micro-conditions.

Model batch 2 (one image, guidance doubles it); every number below is per sample. Rows: each
branch's compute cost, its kept-rows line `fixed + per_row·k` (partial/dynamic), a cross branch's
run constants (the text's keys and values), the per-step cost outside the branches with the run
constants read and projected, the full step, and the run totals of `full` and `fora:3` over 20
steps. Relative difference = (measured − formula) / formula; where it is not 0 the markdown says
which products the formula does not name, and checks that they account for all of it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tcgraph.models.official.dit import DiT, DiTConfig, make_config
from tcgraph.plan import COMPUTE, make_plan, partial
from tcgraph.plan.costs import CONVENTION, CostTable, measure_costs, predict_flops
from tcgraph.plan.flops import branch_flops, fixed_flops, plan_flops
from tcgraph.sampling import SamplerSettings

RESULTS = Path(__file__).resolve().parent / "results"
TEXT_LENGTH, CAPTION = 120, 4096  # PixArt-alpha's T5-XXL prompts
STEPS = 20


def pixart_config(side: int, micro: bool) -> DiTConfig:
    return DiTConfig(input_size=side, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                     mlp_ratio=4.0, class_dropout_prob=0.0, num_classes=0, learn_sigma=True, layout="pixart",
                     norm_eps=1e-6, caption_channels=CAPTION, micro_size=side * 8 if micro else 0)


MODELS = {
    "DiT-S/2": lambda: make_config("DiT-S/2"),
    "DiT-XL/2": lambda: make_config("DiT-XL/2"),
    "DiT-XL/2 (diffusers)": lambda: make_config("DiT-XL/2", layout="diffusers", norm_eps=1e-5),
    "PixArt-alpha 256": lambda: pixart_config(32, micro=False),
    "PixArt-alpha 1024": lambda: pixart_config(128, micro=True),
}


def build_on_meta(cfg: DiTConfig) -> torch.nn.Module:
    with torch.device("meta"):
        if cfg.layout == "diffusers":
            from tcgraph.models.diffusers.dit import build_diffusers_dit
            return build_diffusers_dit(cfg)
        if cfg.layout == "pixart":
            from tcgraph.models.diffusers.pixart import build_diffusers_pixart
            return build_diffusers_pixart(cfg)
        return DiT(cfg).eval()


def t_mlp(d: int, features: int = 256) -> int:
    """One timestep-embedding MLP (features -> d -> d) for one row."""
    return 2 * features * d + 2 * d * d


def unnamed(cfg: DiTConfig, batch: int) -> tuple[int, str]:
    """FLOPs (whole model batch) outside the branches that the model runs every step and the formula
    does not name, and why."""
    d = cfg.hidden_size
    if cfg.layout == "diffusers":
        return batch * cfg.depth * t_mlp(d), (
            f"diffusers' DiT embeds the timestep in each of its {cfg.depth} blocks (for the block's adaLN) and once "
            f"more for the final layer: depth + 1 timestep MLPs (256 -> {d} -> {d}); the formula counts one")
    if cfg.micro_size:  # two size rows and one ratio row through (256 -> d/3 -> d/3), once for the whole batch
        return 3 * t_mlp(d // 3), (
            f"PixArt-alpha 1024's micro-condition embeddings (resolution: 2 rows, aspect ratio: 1 row, each "
            f"256 -> {d // 3} -> {d // 3}, once per batch, not per sample); the formula omits them")
    return 0, ""


def rows_of(name: str, cfg: DiTConfig, table: CostTable) -> list[dict]:
    b, n, length = table.batch, cfg.num_tokens, table.text_length
    k1, k2 = table.rows
    extra, why = unnamed(cfg, b)
    out = []

    def row(kind: str, quantity: str, measured: int, formula: int, steps: int = 0) -> None:
        """`steps`: how many times the row holds the per-step work the formula does not name."""
        rel = (measured - formula) / formula if formula else (0.0 if measured == 0 else float("inf"))
        out.append({"model": name, "kind": kind, "quantity": quantity, "measured": measured / b,
                    "formula": formula / b, "rel_diff": rel, "why": why if measured != formula else "",
                    "unexplained": (measured - formula - steps * extra) / b})

    for br in cfg.branches:
        c = table.cost(0, br)
        f = lambda k: branch_flops(cfg, br, partial(range(k)), length, True) * b  # noqa: E731
        per_row = (f(k2) - f(k1)) // (k2 - k1)
        row("branch", f"{br}: compute", c.full + c.constants, branch_flops(cfg, br, COMPUTE, length) * b)
        row("branch", f"{br}: kept rows, fixed part", c.fixed, f(k1) - per_row * k1)
        row("branch", f"{br}: kept rows, per row", c.per_row, per_row)
        if c.constants:
            row("branch", f"{br}: run constants (text K/V)", c.constants,
                (branch_flops(cfg, br, COMPUTE, length) - branch_flops(cfg, br, COMPUTE, length, True)) * b)
    if length:
        row("step", "outside branches, constants read", table.step, fixed_flops(cfg, length, True) * b, 1)
        row("step", "outside branches, constants projected", table.step + table.run_constants,
            fixed_flops(cfg, length) * b, 1)
        row("step", "caption projection (a run constant)", table.run_constants,
            (fixed_flops(cfg, length) - fixed_flops(cfg, length, True)) * b)
    else:
        row("step", "outside branches", table.step, fixed_flops(cfg) * b, 1)
    settings = SamplerSettings(num_steps=STEPS, batch=b // 2, cfg_scale=2.0, resolution=cfg.input_size,
                               text_length=length)
    for spec in ("full", "fora:3"):
        plan = make_plan(spec, cfg, settings)
        got, want = predict_flops(table, plan), plan_flops(cfg, plan)
        if spec == "full":
            row("step", "full step (constants projected)", got["full_step"], want["full_step"], 1)
        row("run", f"{spec} run, {STEPS} steps", got["total"], want["total"], STEPS)
    return out


def fmt(v: float) -> str:
    return f"{v / 1e9:.4f}" if v >= 1e7 else f"{v / 1e6:.3f} M"


def markdown(report: dict) -> str:
    lines = [f"`{report['command']}`", "",
             f"Measured (`tcgraph.plan.costs.measure_costs`, FlopCounterMode on meta/fake tensors) against the formulas "
             f"of `tcgraph.plan.flops`, per sample, GFLOPs (M: MFLOPs); model batch {report['batch']} (one image, "
             f"guidance doubling it); kept-row lines measured at {report['rows_note']}. Convention of both: "
             f"{report['convention']}; element-wise work (biases, softmax, norms, GELU, modulation, gates) counts 0 in "
             "both, and a dynamic branch's token score is 2·N·D in both, so any difference is a product one of them "
             "does not have.", "",
             "Models (meta device, no weights): DiT-S/2 and DiT-XL/2 at 256x256 (32x32 latents, patch 2: 256 tokens), "
             "official layout and (XL) diffusers' DiTTransformer2DModel; PixArt-alpha 256px's transformer as README and "
             "`benchmarks/bench_pixart.py` run it (hidden 1152, 16 heads, 28 blocks, 256 tokens, text 120 x 4096) and "
             "PixArt-alpha 1024px's (4096 tokens, with its micro-conditions). Run totals: the plans' 20 steps, "
             "`fora:3` carrying the text's keys and values (projected at step 0 only).", "",
             "| model | quantity | measured | formula | rel. diff |", "|---|---|---|---|---|"]
    notes = {}
    for r in report["rows"]:
        mark = ""
        if r["why"]:
            notes.setdefault(r["why"], len(notes) + 1)
            mark = f" [{notes[r['why']]}]"
        lines.append(f"| {r['model']} | {r['quantity']} | {fmt(r['measured'])} | {fmt(r['formula'])} | "
                     f"{r['rel_diff']:+.2%}{mark} |")
    lines += ["", f"Largest |rel. diff| over the branch rows: {report['max_branch_rel_diff']:.2%}. Timing: "
              f"{report['seconds']:.1f} s for all tables on {report['machine']}.", ""]
    for why, i in notes.items():
        lines.append(f"[{i}] {why}. The measured minus formula difference equals these products exactly (unexplained "
                     "remainder 0 on every marked row).")
    lines.append("")
    return "\n".join(lines)


def main(args: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    ap.add_argument("--batch", type=int, default=2, help="model batch (guidance doubling included; even)")
    ap.add_argument("--out", default=str(RESULTS / "flop-table"), help="output path without suffix")
    a = ap.parse_args(args)
    unknown = [m for m in a.models.split(",") if m not in MODELS]
    if unknown or a.batch < 2 or a.batch % 2:
        ap.error(f"unknown models {unknown}" if unknown else "--batch must be even and >= 2")
    command = "python benchmarks/flop_table.py" + "".join(f" {x}" for x in (args if args is not None else sys.argv[1:]))
    rows, tables, start = [], {}, time.perf_counter()
    for name in a.models.split(","):
        cfg = MODELS[name]()
        model = build_on_meta(cfg)
        table = measure_costs(model, a.batch, TEXT_LENGTH if cfg.text_conditioned else 0)
        tables[name] = {"config": cfg.to_dict(), "tokens": cfg.num_tokens, "table": table.to_dict()}
        rows += rows_of(name, cfg, table)
        print(f"{name}: measured", flush=True)
    bad = [r for r in rows if r["unexplained"] != 0]
    if bad:
        raise SystemExit(f"differences the named structure does not explain: {bad}")
    report = {"command": command, "convention": CONVENTION, "batch": a.batch, "steps": STEPS,
              "rows_note": "N/4 and N/2 kept rows, checked at N", "seconds": time.perf_counter() - start,
              "machine": f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}",
              "max_branch_rel_diff": max(abs(r["rel_diff"]) for r in rows if r["kind"] == "branch"),
              "rows": rows, "tables": tables}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
