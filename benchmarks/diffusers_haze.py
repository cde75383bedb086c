"""The demo in diffusers' layout, sampled with diffusers' DDIMScheduler: why `clip_sample` greys the background.

    python benchmarks/diffusers_haze.py                 # 100 images, eager PyTorch, 1 thread

diffusers' DDIMScheduler with `clip_sample: true` clips its estimate of x0 to [-1, 1] but keeps the
model's own noise estimate in the step's direction term (`use_clipped_model_output` is a
`step()` argument, False by default, and DiTPipeline never passes it). tcgraph's DDIM derives the noise
again from the clipped x0, as DiT's and ADM's samplers do. Early on, where sqrt(alpha-bar) is
0.006, the estimate of x0 lies far outside [-1, 1] and the two disagree by a lot.

From the same noise and labels: the official demo with tcgraph's DDIM (the README's grid), tcgraph's
DDIM on the diffusers-layout folder (clipping off there by default: it is not a registered pixel-space
config), and diffusers' DDIMScheduler with `clip_sample` true (what `scripts/digits_to_diffusers.py`
wrote before), false (what it writes now), and true with `use_clipped_model_output`. Per row: the
background (the 2-pixel frame around each image; the training images' frame has median -1.000),
the image mean, class accuracy, digits-FD and PSNR against the first two rows.
Writes benchmarks/results/diffusers-haze.json and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from unittest import mock

import torch

from tcgraph import api
from tcgraph.data import load_digits_images
from tcgraph.eval import digits_quality
from tcgraph.eval.quality import compare_samples
from tcgraph.sampling import SamplerSettings, make_noise, run_batches, sampler_for
from tcgraph.sampling.diffusion import model_step_fn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from digits_to_diffusers import SCHEDULERS, write_pipeline  # noqa: E402


def frame(x: torch.Tensor) -> torch.Tensor:
    """The pixels of the 2-pixel frame around each image [N, 1, H, W], flattened."""
    keep = torch.ones(x.shape[-2:], dtype=torch.bool)
    keep[2:-2, 2:-2] = False
    return x[:, 0][:, keep]


def sample(model, labels, noise, clipped_eps: bool = False, **settings) -> torch.Tensor:
    s = SamplerSettings(batch=len(labels), resolution=16, **settings)
    sampler = sampler_for(s, model.config)
    run = lambda: run_batches(model_step_fn(model), lambda: None, sampler, labels, noise, s.batch, 0)  # noqa: E731
    if not clipped_eps:
        return run().clamp(-1, 1)
    from diffusers import DDIMScheduler

    step = DDIMScheduler.step
    with mock.patch.object(DDIMScheduler, "step",
                           lambda self, *a, **k: step(self, *a, use_clipped_model_output=True, **k)):
        return run().clamp(-1, 1)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100, help="a multiple of 10 (default 100)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "diffusers-haze"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    labels = [c for c in range(10) for _ in range(args.images // 10)]
    noise = make_noise(len(labels), 1, 16, 0)
    ddim = SCHEDULERS["ddim"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_pipeline(Path(tmp) / "digits-diffusers")
        layout = api.load_dit(str(folder))
    rows = [
        ("official layout, tcgraph DDIM (x0 clipped)", lambda: sample(api.load_dit("digits"), labels, noise)),
        ("diffusers layout, tcgraph DDIM (`--scheduler ddim`, not clipped)",
         lambda: sample(layout, labels, noise)),
        ("diffusers layout, DDIMScheduler clip_sample true (written before)",
         lambda: sample(layout, labels, noise, sampler="diffusers", scheduler={**ddim, "clip_sample": True})),
        ("diffusers layout, DDIMScheduler clip_sample false (written now)",
         lambda: sample(layout, labels, noise, sampler="diffusers", scheduler={**ddim, "clip_sample": False})),
        ("diffusers layout, DDIMScheduler clip_sample true, use_clipped_model_output",
         lambda: sample(layout, labels, noise, True, sampler="diffusers", scheduler={**ddim, "clip_sample": True})),
    ]
    real, _ = load_digits_images()
    command = "python benchmarks/diffusers_haze.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {"command": command.strip(), "images": len(labels),
              "training_frame_median": float(frame(real).median()), "training_frame_mean": float(frame(real).mean()),
              "rows": []}
    refs = []
    for name, make in rows:
        x = make()
        refs = refs if len(refs) == 2 else refs + [x]
        q = digits_quality(x, labels)
        row = {"setting": name, "frame_median": float(frame(x).median()), "frame_mean": float(frame(x).mean()),
               "image_mean": float(x.mean()), "accuracy": q["accuracy"], "digits_fd": q["digits_fd"],
               "psnr_vs_official": compare_samples(x, refs[0])["psnr"],
               "psnr_vs_tcgraph_ddim_same_layout": compare_samples(x, refs[1])["psnr"] if len(refs) > 1 else None}
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# The diffusers-layout demo's DDIM: background by scheduler config", "",
             f"`{result['command']}`: {len(labels)} images (seed 0, {len(labels) // 10} per class), DDIM 50, "
             f"guidance 2, eager PyTorch. Frame: the 2-pixel border of each image (training images: median "
             f"{result['training_frame_median']:.3f}, mean {result['training_frame_mean']:.3f}).", "",
             "| sampler | frame median | frame mean | image mean | class acc | digits-FD | PSNR vs official dB "
             "| PSNR vs tcgraph DDIM, same layout dB |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        same = r["psnr_vs_tcgraph_ddim_same_layout"]
        same = "—" if same is None else f"{same:.1f}"
        lines.append(f"| {r['setting']} | {r['frame_median']:+.3f} | {r['frame_mean']:+.3f} | {r['image_mean']:+.3f} | "
                     f"{100 * r['accuracy']:.1f} % | {r['digits_fd']:.1f} | {r['psnr_vs_official']:.1f} | {same} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.json')} and .md")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
