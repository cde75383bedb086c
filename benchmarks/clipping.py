"""DDIM with and without clipping x0 on the demo model: speckles, range, quality.

    python benchmarks/clipping.py          # 360 images (36 per class), DDIM 50, guidance 2, eager PyTorch

The pixel-space demo model's samples, from the same noise, with `clip_x0` off (as before
issue 15) and on (the default for pixel-space models now). Per setting: isolated bright
pixels (a pixel above 0 whose 8 neighbours are all below -0.5: the white specks of the
README grid) per image and the share of images with any, the share of pixel values outside
[-1, 1] (clamped when an image is saved), class accuracy and digits-FD. Writes
benchmarks/results/clipping-digits.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from tcgraph import api
from tcgraph.eval import digits_quality
from tcgraph.sampling import SamplerSettings

ROOT = Path(__file__).resolve().parents[1]


def isolated_bright(x: torch.Tensor) -> torch.Tensor:
    """Per image of x [N, 1, H, W]: pixels above 0 whose 8 neighbours are all below -0.5."""
    img = x[:, 0]
    h, w = img.shape[1:]
    pad = torch.nn.functional.pad(img, (1, 1, 1, 1), value=-1.0)
    neighbours = torch.stack([pad[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                              for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx])
    return ((img > 0) & (neighbours < -0.5).all(0)).sum((1, 2))


def main(argv: list[str] | None = None) -> dict:
    model = api.load_dit("digits")
    labels = [c for c in range(10) for _ in range(36)]
    result = {"command": "python benchmarks/clipping.py", "images": len(labels), "steps": 50, "guidance": 2.0}
    for clip in (False, True):
        settings = SamplerSettings(num_steps=50, cfg_scale=2.0, batch=60, resolution=16, clip_x0=clip)
        x = api.sample_eager(model, settings, labels, 0)
        specks = isolated_bright(x)
        quality = digits_quality(x, labels)
        result["clip" if clip else "no_clip"] = {
            "isolated_bright_per_image": specks.float().mean().item(),
            "images_with_isolated_bright": (specks > 0).float().mean().item(),
            "pixels_outside_range": (x.abs() > 1).float().mean().item(),
            **{k: v for k, v in quality.items() if isinstance(v, (int, float))},
        }
        print(json.dumps({"clip_x0": clip, **result["clip" if clip else "no_clip"]}), flush=True)
    out = ROOT / "benchmarks" / "results" / "clipping-digits.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
