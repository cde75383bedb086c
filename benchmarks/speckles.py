"""Specks in the digits demo's samples: how often, where they come from, what removes them.

    python benchmarks/speckles.py                      # 400 images per setting, eager PyTorch, 1 thread
    python benchmarks/speckles.py --images 40 --settings default,eta1

The demo model (16x16 pixels) was trained on scikit-learn's 8x8 digits upsampled 2x
bilinearly (`tcgraph/data.py`), so every training image lies in the 64-dimensional space of
such upsamplings: projected onto it, a training image is unchanged (residual below 1e-14).
A speck is what no upsampled 8x8 image can draw: a group of 8-connected pixels each brighter,
by more than SPECK_RESIDUAL, than the image's projection onto that space. Clean samples
stay below about 0.1 everywhere; a lone white pixel on black is about 1.

Per setting, from the same initial noise (seed 0) and labels (images / 10 per class):
images with a speck, specks per image, the narrower count of `benchmarks/clipping.py`
(a pixel above 0 whose 8 neighbours are all below -0.5), the share of specks with initial noise
above NOISE_TAIL at or next to one of their pixels (against the share of all pixels so placed)
and the share of noise values above NOISE_TAIL that end with a speck at or next to them,
class accuracy and digits-FD. Then, for the default setting's first step (t = 999), the
model's noise estimate against the noise itself by noise value: where the estimate falls
short of the noise, DDIM's x0 estimate, (x - sqrt(1 - a) eps) / sqrt(a) with sqrt(a) = 0.0064,
is far above 1 at that pixel.

Writes benchmarks/results/speckles-digits.json and .md (or --out PREFIX).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tcgraph import api
from tcgraph.data import load_digits_images
from tcgraph.eval import digits_quality
from tcgraph.sampling import SamplerSettings, make_noise, run_batches, sampler_for
from tcgraph.sampling.diffusion import model_step_fn

ROOT = Path(__file__).resolve().parents[1]
SPECK_RESIDUAL = 0.3  # brighter than the nearest upsampled 8x8 image by more than this (range [-1, 1])
NOISE_TAIL = 3.5  # initial noise values above this (0.023 % of pixels)
SEED = 0

# name -> (description, sampler settings beyond the default, noise truncation or None)
SETTINGS = {
    "default": ("DDIM 50, guidance 2, x0 clipped (the demo's default)", {}, None),
    "steps100": ("DDIM 100", {"num_steps": 100}, None),
    "steps250": ("DDIM 250", {"num_steps": 250}, None),
    "eta1": ("eta 1 (fresh noise at every step)", {"eta": 1.0}, None),
    "noclip": ("x0 not clipped (`--clip-x0 off`)", {"clip_x0": False}, None),
    "guidance1": ("no guidance (`--guidance 1`)", {"cfg_scale": 1.0}, None),
    "truncated3": ("initial noise truncated to [-3, 3] (values outside redrawn)", {}, 3.0),
    "truncated3.5": ("initial noise truncated to [-3.5, 3.5] (values outside redrawn)", {}, 3.5),
}


def upsampling_projection(side: int = 16) -> torch.Tensor:
    """The orthogonal projection (side^2 x side^2) onto bilinear 2x upsamplings of (side/2)^2 images."""
    n = side // 2
    basis = torch.eye(n * n).reshape(n * n, 1, n, n)
    up = F.interpolate(basis, size=(side, side), mode="bilinear", align_corners=False).reshape(n * n, -1).T.double()
    return up @ torch.linalg.pinv(up)


def residual(x: torch.Tensor) -> torch.Tensor:
    """x [N, 1, H, W] minus its projection onto the upsampled 8x8 images, [N, H, W]."""
    flat = x.reshape(len(x), -1).double()
    return (flat - flat @ upsampling_projection(x.shape[-1]).T).reshape(len(x), *x.shape[-2:]).float()


def specks(x: torch.Tensor) -> list[list[list[tuple[int, int]]]]:
    """Per image, its specks: groups of 8-connected pixels whose residual exceeds SPECK_RESIDUAL."""
    from scipy import ndimage

    out = []
    for r in residual(x).numpy():
        lab, n = ndimage.label(r > SPECK_RESIDUAL, structure=np.ones((3, 3)))
        out.append([[tuple(int(v) for v in p) for p in np.argwhere(lab == k)] for k in range(1, n + 1)])
    return out


def isolated_bright(x: torch.Tensor) -> torch.Tensor:
    """benchmarks/clipping.py's count per image: pixels above 0 whose 8 neighbours are all below -0.5."""
    img = x[:, 0]
    h, w = img.shape[1:]
    pad = F.pad(img, (1, 1, 1, 1), value=-1.0)
    neighbours = torch.stack([pad[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                              for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])
    return ((img > 0) & (neighbours < -0.5).all(0)).sum((1, 2))


def truncated_noise(noise: torch.Tensor, bound: float, seed: int) -> torch.Tensor:
    """`noise` with every value outside [-bound, bound] redrawn from N(0, 1) until inside."""
    g = torch.Generator().manual_seed(seed + 12345)
    out = noise.clone()
    bad = out.abs() > bound
    while bad.any():
        out[bad] = torch.randn(int(bad.sum()), generator=g)
        bad = out.abs() > bound
    return out


def run_setting(model, name: str, images: int, batch: int) -> dict:
    desc, overrides, bound = SETTINGS[name]
    settings = SamplerSettings(**{"num_steps": 50, "cfg_scale": 2.0, "batch": batch, "resolution": 16, **overrides})
    labels = [c for c in range(10) for _ in range(images // 10)]
    noise = make_noise(len(labels), 1, 16, SEED)
    if bound is not None:
        noise = truncated_noise(noise, bound, SEED)
    start = time.perf_counter()
    x = run_batches(model_step_fn(model), lambda: None, sampler_for(settings, model.config), labels, noise,
                    settings.batch, SEED).clamp(-1, 1)
    seconds = time.perf_counter() - start
    found = specks(x)
    per_image = torch.tensor([len(s) for s in found], dtype=torch.float32)
    # a noise tail within one pixel of the speck (8-neighbourhood), against the share of all pixels so placed
    near_tail = F.max_pool2d(noise, 3, stride=1, padding=1)[:, 0] > NOISE_TAIL
    tails = [any(bool(near_tail[i, r, c]) for r, c in group) for i, groups in enumerate(found) for group in groups]
    speck_mask = torch.zeros(len(x), 1, 16, 16)
    for i, groups in enumerate(found):
        for group in groups:
            for r, c in group:
                speck_mask[i, 0, r, c] = 1
    near_speck = F.max_pool2d(speck_mask, 3, stride=1, padding=1)[:, 0] > 0
    tail_pixels = noise[:, 0] > NOISE_TAIL
    narrow = isolated_bright(x)
    quality = digits_quality(x, labels)
    row = {
        "setting": name,
        "description": desc,
        "images": len(labels),
        "images_with_speck": float((per_image > 0).float().mean()),
        "specks_per_image": float(per_image.mean()),
        "specks": int(per_image.sum()),
        "specks_near_noise_tail": float(np.mean(tails)) if tails else None,
        "pixels_near_noise_tail": float(near_tail.float().mean()),
        "noise_tail_pixels": int(tail_pixels.sum()),
        "noise_tails_giving_speck": float(near_speck[tail_pixels].float().mean()) if tail_pixels.any() else None,
        "images_with_noise_tail": float((noise > NOISE_TAIL).flatten(1).any(1).float().mean()),
        "images_with_isolated_bright": float((narrow > 0).float().mean()),
        "accuracy": quality["accuracy"],
        "digits_fd": quality["digits_fd"],
        "seconds": round(seconds, 1),
        "speck_images": [i for i, s in enumerate(found) if s][:20],
    }
    return row


def first_step(model, images: int) -> list[dict]:
    """The default setting's first step: the model's guided noise estimate against the noise, by noise value."""
    settings = SamplerSettings(num_steps=50, cfg_scale=2.0, batch=images, resolution=16)
    sampler = sampler_for(settings, model.config)
    labels = torch.tensor([c for c in range(10) for _ in range(images // 10)])
    x = make_noise(len(labels), 1, 16, SEED)
    index = sampler.schedule.generation_order()[0]
    a = float(sampler.schedule.alphas_cumprod[index])
    with torch.no_grad():
        eps = sampler.eps_from_output(model_step_fn(model)(0, *sampler.model_inputs(x, index, labels)))
    x0 = ((x - (1 - a) ** 0.5 * eps) / a ** 0.5).flatten()
    z, e = x.flatten(), eps.flatten()
    edges = [-np.inf, -3.5, -3.0, -2.0, 2.0, 3.0, 3.5, np.inf]
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (z >= lo) & (z < hi)
        rows.append({"noise_from": lo, "noise_to": hi, "pixels": int(m.sum()),
                     "mean_noise_minus_estimate": float((z - e)[m].mean()),
                     "mean_x0_estimate": float(x0[m].mean()), "x0_estimate_above_1": float((x0[m] > 1).float().mean())})
    return rows


def training_data() -> dict:
    x, _ = load_digits_images()
    return {"images": len(x), "max_residual": float(residual(x).abs().max()),
            "images_with_isolated_bright": float((isolated_bright(x) > 0).float().mean())}


def fmt(v, pct=False) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.1f} %" if pct else f"{v:.3f}"


def markdown(result: dict) -> str:
    lines = [
        "# Specks in the digits demo's samples", "",
        "Made by " + ", then ".join(f"`{c}`" for c in result["commands"]) + f": per setting the images "
        f"(seed {SEED}, a tenth per class) that its row says, eager PyTorch, 1 thread. "
        "A speck: 8-connected pixels each brighter by more "
        f"than {SPECK_RESIDUAL} than the image's projection onto bilinear 2x upsamplings of 8x8 images "
        f"(the training data's space: {result['training_data']['images']} training images, largest residual "
        f"{result['training_data']['max_residual']:.1e}). 'Narrow': a pixel above 0 whose 8 neighbours are all "
        f"below -0.5. 'Near a noise tail': the initial noise was above {NOISE_TAIL} at a speck pixel or one of "
        f"its 8 neighbours (for all pixels: the chance of that anywhere).", "",
        "| setting | images | images with a speck | specks / image | narrow | specks near a noise tail "
        "| pixels near a noise tail "
        "| noise tails giving a speck | class acc | digits-FD | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["settings"]:
        lines.append(f"| {r['description']} | {r['images']} | {fmt(r['images_with_speck'], True)} | "
                     f"{r['specks_per_image']:.3f} | "
                     f"{fmt(r['images_with_isolated_bright'], True)} | {fmt(r['specks_near_noise_tail'], True)} | "
                     f"{100 * r['pixels_near_noise_tail']:.2f} % | "
                     f"{fmt(r['noise_tails_giving_speck'], True)} of {r['noise_tail_pixels']} | "
                     f"{fmt(r['accuracy'], True)} | "
                     f"{r['digits_fd']:.1f} | {r['seconds']:.0f} |")
    if result.get("first_step"):
        lines += ["", "First step of the default setting (t = 999, sqrt(a) = 0.0064), by initial noise value "
                  f"(every pixel of {sum(r['pixels'] for r in result['first_step']) // 256} images):", "",
                  "| noise | pixels | mean (noise - estimate) | mean x0 estimate | x0 estimate > 1 |",
                  "|---|---|---|---|---|"]
        for r in result["first_step"]:
            lines.append(f"| [{r['noise_from']}, {r['noise_to']}) | {r['pixels']} | "
                         f"{r['mean_noise_minus_estimate']:+.4f} | {r['mean_x0_estimate']:+.2f} | "
                         f"{fmt(r['x0_estimate_above_1'], True)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=400, help="images per setting, a multiple of 10 (default 400)")
    p.add_argument("--batch", type=int, default=200, help="images per sampling run (default 200)")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of: {', '.join(SETTINGS)}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--append", action="store_true",
                   help="add these settings' rows to the results already at --out (each row keeps its image count)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "speckles-digits"),
                   help="output prefix (.json and .md are written)")
    args = p.parse_args(argv)
    names = [s for s in args.settings.split(",") if s]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown or args.images % 10 or args.images <= 0:
        p.error(f"unknown settings {unknown}" if unknown else "--images must be a positive multiple of 10")
    torch.set_num_threads(args.threads)
    model = api.load_dit("digits")
    command = "python benchmarks/speckles.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    result = {"commands": [], "speck_residual": SPECK_RESIDUAL, "noise_tail": NOISE_TAIL, "settings": []}
    if args.append and out.with_suffix(".json").is_file():
        result = json.loads(out.with_suffix(".json").read_text())
    result["commands"].append(command.strip())
    result["training_data"] = training_data()
    if "default" in names and "first_step" not in result:
        result["first_step"] = first_step(model, args.images)
        result["first_step_images"] = args.images
    for name in names:
        row = run_setting(model, name, args.images, min(args.batch, args.images))
        result["settings"] = [r for r in result["settings"]
                              if (r["setting"], r["images"]) != (name, row["images"])] + [row]
        result["settings"].sort(key=lambda r: (list(SETTINGS).index(r["setting"]), -r["images"]))
        print(json.dumps(row), flush=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {Path(args.out).with_suffix('.json')} and .md")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
