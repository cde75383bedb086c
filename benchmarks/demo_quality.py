"""Quality of the demo model itself: class accuracy, digits-FD vs real digits and the FD floor.

    python benchmarks/demo_quality.py                # DDIM 50, guidance 2, 36 images per class

Samples with the eager PyTorch model (the uncached reference every plan is compared
with), writes a PNG grid with one row per class (docs/digits-grid.png), JSON and a table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tcgraph import api
from tcgraph.data import digits_split
from tcgraph.eval import digits_quality, fd_floor
from tcgraph.sampling import SamplerSettings

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--per-class", type=int, default=36, help="36 x 10 = 360 images, the size of the test split")
    ap.add_argument("--batch", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", type=Path, help="digits weights to judge (default: the committed ones), "
                    "e.g. from `python scripts/train_demo.py --out FILE`")
    ap.add_argument("--grid", type=Path, default=ROOT / "docs" / "digits-grid.png")
    ap.add_argument("--grid-per-class", type=int, default=12)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo-quality.json")
    args = ap.parse_args(argv)

    model = api.load_dit(str(args.weights), config="digits") if args.weights else api.load_dit("digits")
    s = SamplerSettings(num_steps=args.steps, cfg_scale=args.guidance, batch=args.batch, resolution=16)
    labels = [c for c in range(10) for _ in range(args.per_class)]
    t0 = time.perf_counter()
    samples = api.sample_eager(model, s, labels, seed=args.seed)
    seconds = time.perf_counter() - t0
    q = digits_quality(samples, labels)
    # The same metrics for real images, to read the numbers against.
    x_train, y_train = digits_split()["train"]
    real = digits_quality(x_train, y_train)
    preds_ok = {}
    from tcgraph.eval.quality import _features_and_predictions  # per-class accuracy

    _, preds = _features_and_predictions(samples.clamp(-1, 1))
    for c in range(10):
        idx = torch.tensor(labels) == c
        preds_ok[c] = float((preds[idx] == c).float().mean())
    keep = [i for i, y in enumerate(labels) if i % args.per_class < args.grid_per_class]
    api.save_grid(samples[keep], args.grid, nrow=args.grid_per_class)
    result = {
        "command": "python benchmarks/demo_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {"steps": args.steps, "guidance": args.guidance, "images": len(labels), "seed": args.seed},
        "class_accuracy": q["accuracy"],
        "per_class_accuracy": preds_ok,
        "digits_fd_vs_test": q["digits_fd"],
        "fd_floor_train_vs_test": fd_floor(),
        "train_split_accuracy": real["accuracy"],
        "sampling_seconds": seconds,
        "grid": str(args.grid.relative_to(ROOT)) if args.grid.is_relative_to(ROOT) else str(args.grid),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"demo model, DDIM {args.steps}, guidance {args.guidance}, {len(labels)} images, seed {args.seed}")
    print("| metric | value |\n|---|---|")
    print(f"| class accuracy (digits classifier) | {q['accuracy']:.1%} |")
    print(f"| digits-FD vs real test split | {q['digits_fd']:.2f} |")
    print(f"| FD floor (real train vs real test) | {result['fd_floor_train_vs_test']:.2f} |")
    print(f"| worst class accuracy | {min(preds_ok.values()):.1%} (class {min(preds_ok, key=preds_ok.get)}) |")
    print(f"\nwrote {args.out} and {args.grid}")
    return result


if __name__ == "__main__":
    main()
