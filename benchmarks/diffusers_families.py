"""The same weights in both DiT layouts: how far the official and the diffusers families' samples differ.

    python benchmarks/diffusers_families.py                 # the demo model, 80 images, DDIM 50, guidance 2

The demo model (official facebookresearch/DiT layout) is converted to diffusers'
DiTTransformer2DModel as diffusers' own DiT conversion does (q/k/v split, embedders copied
into every block). The two families then differ by design in two places: diffusers' timestep
features use a frequency shift of 1 (the official: 0), and its MLP norm has eps 1e-5 (the
official: 1e-6). Each family samples with tcgraph's DDIM from the same noise and labels, in
eager PyTorch; rows:

- `official`: tcgraph's official-layout DiT (the reference);
- `diffusers`: the converted model as diffusers builds it (shift 1, eps 1e-5);
- `diffusers, eps 1e-6`: only the frequency shift differs;
- `diffusers, shift 0, eps 1e-6`: both differences undone: equal to `official` up to rounding,
  which shows the conversion itself is exact.

PSNR/SSIM against `official`, class accuracy and digits-FD for each. Writes JSON and a
markdown table (`benchmarks/results/diffusers-families.{json,md}`).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tcgraph import api  # noqa: E402
from tcgraph.eval import compare_samples, digits_quality  # noqa: E402
from tcgraph.models.diffusers import dit as diffusers_dit  # noqa: E402
from tcgraph.models.diffusers.dit import save_as_diffusers  # noqa: E402
from tcgraph.sampling import SamplerSettings  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "diffusers-families.json")
    args = ap.parse_args(argv)

    official = api.load_dit("digits")
    labels = [c for c in range(official.config.num_classes) for _ in range(args.per_class)]
    settings = SamplerSettings(num_steps=args.steps, cfg_scale=args.guidance, batch=len(labels),
                               resolution=official.config.input_size, clip_x0=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {
            "official": (official, diffusers_dit.TIME_SHIFT),
            "diffusers": (api.load_dit(str(save_as_diffusers(official, Path(tmp) / "a"))), 1.0),
            "diffusers, eps 1e-6": (api.load_dit(str(save_as_diffusers(official, Path(tmp) / "b", 1e-6))), 1.0),
            "diffusers, shift 0, eps 1e-6": (api.load_dit(str(save_as_diffusers(official, Path(tmp) / "c", 1e-6))),
                                             0.0),
        }
        reference = None
        for name, (model, shift) in models.items():
            diffusers_dit.TIME_SHIFT = shift
            try:
                samples = api.sample_eager(model, settings, labels, seed=args.seed)
            finally:
                diffusers_dit.TIME_SHIFT = 1.0
            reference = samples if reference is None else reference
            row = {"family": name, "layout": model.config.layout, "norm_eps": model.config.norm_eps,
                   "time_shift": shift if model.config.layout == "diffusers" else 0.0,
                   "max_abs_diff": float((samples - reference).abs().max()),
                   **compare_samples(samples, reference), **digits_quality(samples, torch.tensor(labels))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"config": {"model": "digits", "steps": args.steps, "guidance": args.guidance, "images": len(labels),
                         "sampler": "tcgraph DDIM, x0 clipped", "seed": args.seed,
                         "command": "python benchmarks/diffusers_families.py " + " ".join(argv or sys.argv[1:])},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    table = format_table(result)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return result


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [f"Demo weights in both layouts, {c['images']} images, DDIM {c['steps']}, guidance {c['guidance']}, "
             "eager PyTorch, same noise and labels; PSNR/SSIM against the official layout.", "",
             "| family | norm eps | time shift | max abs diff | PSNR dB | SSIM | class acc | digits-FD |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['family']} | {r['norm_eps']:g} | {r['time_shift']:g} | {r['max_abs_diff']:.3g} | "
                     f"{r['psnr']:.1f} | {r['ssim']:.3f} | {r['accuracy']:.3f} | {r['digits_fd']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
