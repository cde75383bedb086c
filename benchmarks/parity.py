"""ONNX Runtime vs eager PyTorch on the `full` plan: max abs difference of final samples.

    python benchmarks/parity.py

The demo model (DDIM 50, guidance 2, 20 images) and DiT-S/2 shapes (random weights,
DDIM 10, 2 images; random weights give samples of large magnitude, so the scale is
printed beside the difference). The tests assert the same bound on shorter runs.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tcgraph import api
from tcgraph.models.official.dit import DiT, make_config, randomize_weights
from tcgraph.plan import make_plan
from tcgraph.sampling import SamplerSettings


def parity(model, settings: SamplerSettings, labels: list[int], tmp: Path, name: str) -> dict:
    path = api.transform(model, make_plan("full", model.config, settings), tmp / name, progress=False)
    eager = api.sample_eager(model, settings, labels, seed=0)
    ort, _ = api.sample(path, classes=labels, per_class=1, seed=0, progress=False)
    return {"model": name, "steps": settings.num_steps, "images": len(labels),
            "max_abs_diff": (eager - ort).abs().max().item(), "sample_max_abs": eager.abs().max().item()}


def main(argv: list[str] | None = None) -> list[dict]:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        digits = api.load_dit("digits")
        rows.append(parity(digits, SamplerSettings(num_steps=50, cfg_scale=2.0, batch=8, resolution=16),
                           list(range(10)) * 2, Path(tmp), "digits"))
        s2 = randomize_weights(DiT(make_config("DiT-S/2")))
        rows.append(parity(s2, SamplerSettings(num_steps=10, cfg_scale=2.0, batch=2, resolution=32),
                           [1, 2], Path(tmp), "DiT-S2"))
    print("| model | DDIM steps | images | max abs diff ORT vs eager | max abs sample |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['steps']} | {r['images']} | {r['max_abs_diff']:.2e} | {r['sample_max_abs']:.3g} |")
    out = Path(__file__).parent / "results" / "parity.json"
    out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
