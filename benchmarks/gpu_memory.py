"""GPU memory of each backend for DiT-XL/2 plans of 1, 2, 4 and 6 variants: COMPUTED, not measured.

    python benchmarks/gpu_memory.py    # writes benchmarks/results/gpu-memory-DiT-XL2.{json,md}

No GPU is used (this machine has none): the model is built on the meta device and every
number is a formula over the shapes of the plans bench_gpu.py runs (256x256 images, batch 8
with guidance 4 = 16 model rows, DDIM 50). The plans: `full` for 1 variant, and for 2, 4
and 6 the structural l2c plan at 2x (bench_tokencache.structural_plans: the l2c planner's
scores-to-recipes function on untrained scores) with its variant cap (`max_variants`) set
to that number; 6 is the cap of the l2c:2 that bench_gpu.py measures. The cap is the
user's lever: the rows show what each variant more costs on each backend.

What each backend's code allocates (read from tcgraph/runtime/; B = model rows, N = tokens,
D = hidden size, E = bytes per element of the precision):

- weights. `torch` (with or without CUDA graphs): `ProgramsFromArtifact` maps the tensors
  of `variants/weights.bin` ONCE for all variants, cast to the precision and moved to the
  device once (runtime/torch/loader.py), so weights = parameters x E at any variant count.
  `ort` (CUDA provider), the runner's default: one session holds every variant behind `If`
  nodes (runtime/ort/combined.py), each weight an initializer of its top graph, copied to
  the device once: weights = parameters x 4 (the ONNX graphs are fp32; there is no bf16 ORT
  row). `ort` with `one_session=False` (`ort-cuda-per-variant`): the sessions share CPU
  OrtValues over a memory map of the weights file, but with the CUDA provider each session
  copies the initializers it reads to the device (runtime/ort/loader.py): weights = sum over
  variants of the weights each reads. `trt`: every engine holds the
  weights it was built with, or refitted with when weight-stripped (runtime/trt/loader.py,
  build.py): the same sum, in the engine precision. A variant reads every weight except
  those of the branches it does not compute: a reused attention or MLP branch reads none of
  its block's attn.* or mlp.* tensors, while the embeddings, every block's adaLN modulation
  (the gates stay fresh) and the final layer are read by every variant.
- caches: `Plan.cache_bytes(D, E)`, every cache tensor the plan carries between steps
  ([B, N, D] each), held once: in a `CacheBank` (CUDA graphs, TensorRT), or as the tensors
  the last step returned (`torch` without graphs, `ort`). While a step runs, the caches it
  writes exist twice: the new outputs beside the old ones (without graphs: the dispatcher
  holds the old ones until the step returns; with graphs: the captured program writes them
  into the graph pool, then copies them into the bank). That is the `transient` term:
  the most cache bytes one variant writes.
- activations, an ESTIMATE: the peak of one step, one transformer block's live tensors at
  the MLP: the residual stream, the modulated input, fc1's and GELU's [B, N, mlp_ratio*D]
  outputs and fc2's output, plus the attention scores where attention is not fused:
      A = ((2 * mlp_ratio + 4) * B * N * D + B * heads * N^2) elements
  (for DiT-XL/2: 73.4 M elements, 147 MB in bf16). Per backend: `torch` without graphs, one
  A (freed between steps, kept by the caching allocator). With CUDA graphs, one graph pool
  shared by every variant's graph (runtime/torch/runner.py passes one `graph_pool_handle()`
  to every capture, captured one after another, so a capture reuses what the one before
  freed): A plus the transient cache outputs, whatever the variant count, held while the
  runner is active; and as much again in the caching allocator's normal pool, left there
  by the two warm-up runs before each capture (until `torch.cuda.empty_cache()`): the
  graphs rows count A and the transient term twice. `ort`: one session, one CUDA memory
  arena, one A; one session per variant: every session has its own arena, up to one A per
  variant. `trt`: one block of activation memory shared
  by every execution context (`share_activations=True`, the default), as large as the
  largest needs: one A.
- static buffers: x, t, y and out, once (every backend); TensorRT adds a scratch buffer per
  variant for each cache it both reads and writes (token-pruning variants; none in l2c).

The eager baseline (bench_gpu's `eager`, not a tcgraph backend) is listed for reference:
fp32 weights, and under bf16 autocast up to a bf16 copy of every weight a step uses (the
autocast weight-cast cache, dropped when the step's autocast region ends).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

from tcgraph.errors import TcgraphError
from tcgraph.models.official.dit import DiT, DiTConfig, build_model
from tcgraph.names import OUT
from tcgraph.plan import Plan, make_plan, plan_flops
from tcgraph.plan.planners.l2c import candidate_intervals, recipes_for_target
from tcgraph.plan.plan import Recipe
from tcgraph.sampling import SamplerSettings

MODEL = "DiT-XL/2"
CAPS = (1, 2, 4, 6)
TARGET = 2.0  # the structural l2c:2 of bench_gpu.py
PRECISIONS = {"bf16": 2, "fp32": 4}  # bytes per element
PIXELS_PER_LATENT = 8  # the SD VAE of the DiT checkpoints: 256x256 images <-> 32x32 latents
MIB, GIB = 2**20, 2**30
RESULTS = Path(__file__).parent / "results"


#################################################################################
#                              Shapes and plans                                 #
#################################################################################


@functools.lru_cache(maxsize=None)
def meta_model(name: str = MODEL) -> DiT:
    """The model with its real shapes and no storage: parameters are all that is read of it (shared: do not
    change it)."""
    with torch.device("meta"):
        return build_model(name)


def structural_l2c(cfg: DiTConfig, settings: SamplerSettings, target: float, max_variants: int) -> Plan:
    """bench_tokencache.structural_plans' l2c plan (untrained scores, seed 0), with another variant cap."""
    probs = torch.rand(settings.num_steps, cfg.depth, 2, generator=torch.Generator().manual_seed(0))
    interval = candidate_intervals(cfg, settings.num_steps, target)[0]
    recipes = recipes_for_target(cfg, probs, interval, target, max_variants)
    return Plan(f"l2c:{target}x", settings, recipes, cfg.num_tokens, {"interval": interval})


def plans_by_cap(cfg: DiTConfig, settings: SamplerSettings, caps=CAPS, target: float = TARGET) -> dict[int, Plan]:
    """Variant count -> plan: `full` for 1, the structural l2c plan capped at the count otherwise."""
    plans = {}
    for cap in caps:
        plan = make_plan("full", cfg, settings) if cap == 1 else structural_l2c(cfg, settings, target, cap)
        if len(plan.variants()) != cap:  # the l2c planner stops merging groups where nothing is left to merge
            raise TcgraphError(f"the structural l2c plan capped at {cap} variants has {len(plan.variants())}; "
                               "choose caps the plan reaches")
        plans[cap] = plan
    return plans


def reads_parameter(name: str, recipe: Recipe) -> bool:
    """Whether the variant of `recipe` reads the model tensor `name` (a block's attn.* / mlp.*
    tensors only where that branch computes; everything else always)."""
    parts = name.split(".")
    if parts[0] == "blocks" and parts[2] in ("attn", "mlp"):
        return recipe.action(int(parts[1]), parts[2]).computes
    return True


def variant_weights(model: DiT, recipe: Recipe) -> int:
    """Elements of the model tensors the variant of `recipe` reads."""
    return sum(p.numel() for name, p in model.named_parameters() if reads_parameter(name, recipe))


def activation_elements(cfg: DiTConfig, rows: int) -> int:
    """Estimated peak of one step (see the module docstring): one block's live tensors at the MLP,
    plus unfused attention scores."""
    bnd = rows * cfg.num_tokens * cfg.hidden_size
    return int((2 * cfg.mlp_ratio + 4) * bnd) + rows * cfg.num_heads * cfg.num_tokens ** 2


#################################################################################
#                                  Memory                                       #
#################################################################################


def plan_memory(model: DiT, plan: Plan, itemsize: int) -> dict[str, dict]:
    """Bytes per backend of `plan` with tensors of `itemsize` bytes (ONNX Runtime: always fp32).

    Each entry: weights, caches, transient_caches, activations, static, total, and
    weights_bound (every variant reading every weight: the most a per-variant copy costs).
    """
    cfg, rows = model.config, plan.settings.model_batch
    params = sum(p.numel() for p in model.parameters())
    variants = plan.variants()
    read = sum(variant_weights(model, r) for r in variants)
    cache_tensor = rows * cfg.num_tokens * cfg.hidden_size  # elements of one [B, N, D] cache
    cache_elements = plan.cache_bytes(cfg.hidden_size, itemsize=1)  # called once: slow on 50 steps
    written = max(len([n for n in plan.variant_io(r)[1] if n != OUT]) for r in variants) * cache_tensor
    aliased = sum(len(set(ins) & set(outs)) for ins, outs in map(plan.variant_io, variants)) * cache_tensor
    act = activation_elements(cfg, rows)
    pixels = cfg.input_size ** 2

    def entry(e: int, weights: int, bound: int, transient: int, activations: int, other: int = 0) -> dict:
        static = rows * pixels * (cfg.in_channels * e + cfg.out_channels * 4) + rows * 16  # x, out (fp32); t, y
        parts = {"weights": weights * e, "caches": cache_elements * e,
                 "transient_caches": transient * e, "activations": activations * e, "static": static + other * e}
        return {**parts, "total": sum(parts.values()), "weights_bound": bound * e}

    e, n = itemsize, len(variants)
    return {
        # weights once; the caches a step writes live beside the old ones until it returns
        "torch": entry(e, params, params, written, act),
        # one graph pool for every graph (the outputs and activations of the largest step), and the
        # same again kept by the caching allocator's normal pool from the warm-up runs before capture
        "torch+cuda-graphs": entry(e, params, params, 2 * written, 2 * act),
        # one session for every variant: each weight copied to the device once, one arena; fp32 graphs
        "ort-cuda": entry(4, params, params, written, act),
        # one session per variant: a device copy of the weights its variant reads and an arena per session
        "ort-cuda-per-variant": entry(4, read, n * params, written, n * act),
        # the weights its variant reads in every engine; one shared activation block; outputs in the bank
        "trt": entry(e, read, n * params, 0, act, aliased),
    }


def compute(model_name: str = MODEL, *, batch: int = 8, guidance: float = 4.0, steps: int = 50,
            caps=CAPS, target: float = TARGET) -> dict:
    """The whole table as a JSON-ready dict."""
    model = meta_model(model_name)
    cfg = model.config
    settings = SamplerSettings(num_steps=steps, cfg_scale=guidance, batch=batch, resolution=cfg.input_size)
    rows = settings.model_batch
    params = sum(p.numel() for p in model.parameters())
    plans = plans_by_cap(cfg, settings, caps, target)
    table = []
    for cap, plan in plans.items():
        variants = plan.variants()
        info = {"variants": cap, "plan": "full" if cap == 1 else f"structural l2c:{target} capped at {cap} variants",
                "predicted_speedup": plan_flops(cfg, plan)["predicted_speedup"],
                "cache_tensors": len(plan.cache_names()),
                "weights_read_per_variant": [variant_weights(model, r) for r in variants]}
        for precision, itemsize in PRECISIONS.items():
            for backend, parts in plan_memory(model, plan, itemsize).items():
                if backend.startswith("ort-cuda") and precision != "fp32":
                    continue  # the ONNX graphs are fp32: ORT has one precision
                table.append({**info, "backend": backend, "precision": precision, **parts})
    act = activation_elements(cfg, rows)
    eager = []
    for precision, itemsize in PRECISIONS.items():
        parts = {"weights": params * 4, "autocast_cast_cache": params * itemsize if itemsize < 4 else 0,
                 "activations": act * itemsize}
        eager.append({"backend": "eager", "precision": "fp32" if itemsize == 4 else f"{precision} autocast",
                      **parts, "total": sum(parts.values())})
    return {
        "note": "COMPUTED from shapes and what the backends' code allocates (see benchmarks/gpu_memory.py); "
                "not measured. Activations are an estimate.",
        "config": {"model": model_name, "parameters": params, "hidden": cfg.hidden_size, "depth": cfg.depth,
                   "heads": cfg.num_heads, "tokens": cfg.num_tokens, "image_side": cfg.input_size * PIXELS_PER_LATENT,
                   "batch": batch, "guidance": guidance, "model_rows": rows, "steps": steps,
                   "activation_formula": "((2 * mlp_ratio + 4) * B * N * D + B * heads * N^2) elements",
                   "activation_elements": act},
        "rows": table,
        "eager_reference": eager,
    }


#################################################################################
#                                  Output                                       #
#################################################################################


def _mib(v: int) -> str:
    return f"{v / MIB:,.0f}"


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [f"# GPU memory per backend: {c['model']} (computed, not measured)", "",
             f"{c['image_side']}x{c['image_side']} images ({c['tokens']} tokens), batch {c['batch']} with guidance "
             f"{c['guidance']} ({c['model_rows']} rows), DDIM {c['steps']}; {c['parameters']:,} parameters. "
             "1 variant: the `full` plan; 2, 4, 6: the structural l2c:2 plan capped at that many variants "
             "(6 = bench_gpu.py's l2c:2). Activations: an estimate, "
             f"A = {c['activation_formula']} = {c['activation_elements'] / 1e6:.1f} M elements.", "",
             "## Total GiB by variant count", ""]
    caps = sorted({r["variants"] for r in result["rows"]})
    lines += ["| backend | precision | " + " | ".join(f"{n} variant{'s' * (n > 1)}" for n in caps) + " |",
              "|---|---|" + "---:|" * len(caps)]
    keys = dict.fromkeys((r["backend"], r["precision"]) for r in result["rows"])
    for backend, precision in keys:
        totals = {r["variants"]: r["total"] for r in result["rows"]
                  if (r["backend"], r["precision"]) == (backend, precision)}
        lines.append(f"| {backend} | {precision} | " + " | ".join(f"{totals[n] / GIB:.2f}" for n in caps) + " |")
    for e in result["eager_reference"]:
        lines.append(f"| eager (reference, no plan) | {e['precision']} | "
                     + " | ".join(f"{e['total'] / GIB:.2f}" if n == 1 else "–" for n in caps) + " |")
    lines += ["", "## Parts, MiB", "",
              "| backend | precision | variants | weights | caches | transient caches | activations | static | total |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['backend']} | {r['precision']} | {r['variants']} | {_mib(r['weights'])} | "
                     f"{_mib(r['caches'])} | {_mib(r['transient_caches'])} | {_mib(r['activations'])} | "
                     f"{_mib(r['static'])} | {_mib(r['total'])} |")
    lines += ["", "Weights: `torch` maps the weights file once for all variants; ONNX Runtime (CUDA provider) copies "
              "each weight to the device once in its default single session (`ort-cuda`), and with one session per "
              "variant every session copies the initializers its variant reads, in fp32; every TensorRT engine holds the "
              "weights its variant reads. Caches: `Plan.cache_bytes`; transient: the most cache bytes one step writes, "
              "alive beside the old ones while it runs. Activations (an estimate): one peak shared by every "
              "variant for `torch` and TensorRT (one shared block), one arena per ONNX Runtime session; the "
              "CUDA-graphs rows count the activations and the transient caches twice (the one graph pool of every "
              "graph, and what the warm-up runs before capture leave in the caching allocator). "
              "See benchmarks/gpu_memory.py for the sources in the code.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu-memory-DiT-XL2",
                    help="output path without suffix; writes .json and .md")
    args = ap.parse_args(argv)
    result = compute()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_name(args.out.name + ".json").write_text(json.dumps(result, indent=1) + "\n")
    text = format_table(result)
    args.out.with_name(args.out.name + ".md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
