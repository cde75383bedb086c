"""Low precision on the demo model: how far bf16 / fp16 samples of the torch backend land
from float32, for the full model and for token plans (static and dynamic tokens).

    python benchmarks/precision.py            # CPU; add --device cuda on a GPU

Every row compares samples from the same noise and labels (PSNR, dB, higher is closer):
- `full` (10 DDIM steps): the torch backend in bf16 / fp16, and eager PyTorch under bf16
  autocast (what users run today), against float32 eager;
- `tokencache:2` and `dynamic:2` (20 steps; the planners' structural shapes from
  bench_tokencache.structural_plans): the torch backend in bf16 / fp16 against the same
  plan in float32. A dynamic plan picks tokens per sample by how much they changed, so
  rounding changes the pick; a static plan's tokens are fixed at compile time.

tests/runtime/test_torch_runner.py states its tolerances from these numbers. Writes
benchmarks/results/precision-digits.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_tokencache import structural_plans  # noqa: E402

from tcgraph import api  # noqa: E402
from tcgraph.eval.metrics import psnr  # noqa: E402
from tcgraph.sampling import SamplerSettings, make_noise, run_batches, sampler_for

LOW = ("bf16", "fp16")


def autocast_samples(model, settings, labels, device: str) -> torch.Tensor:
    @torch.no_grad()
    def step(_i, x, t, y):
        with torch.autocast(device, dtype=torch.bfloat16):
            return model(x, t, y).float()

    noise = make_noise(len(labels), model.config.in_channels, settings.resolution, 0)
    return run_batches(step, lambda: None, sampler_for(settings, model.config), labels, noise,
                           settings.batch, 0, device=device)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/precision-digits"))
    args = ap.parse_args(argv)
    model = api.load_dit("digits")  # on the CPU: transform exports from it, the float32 reference runs on it
    labels = [c for c in range(10) for _ in range(2)]
    rows = []

    def sample(path, dtype):
        return api.sample(path, classes=labels, per_class=1, backend="torch", device=args.device,
                          runner_options={"precision": dtype}, progress=False)[0]

    with tempfile.TemporaryDirectory() as tmp:
        s10 = SamplerSettings(num_steps=10, cfg_scale=2.0, batch=8, resolution=16)
        full = api.transform(model, "full", Path(tmp) / "full", steps=10, guidance=2.0, batch=8, check=False,
                             progress=False)
        ref = api.sample_eager(model, s10, labels)
        for dtype in LOW:
            rows.append({"plan": "full", "steps": 10, "run": f"torch {dtype}", "against": "eager float32",
                         "psnr": psnr(sample(full, dtype), ref)})

        s20 = SamplerSettings(num_steps=20, cfg_scale=2.0, batch=8, resolution=16)
        plans = structural_plans(model, s20, [2.0])
        for name in ("tokencache:2.0", "dynamic:2.0"):
            path = api.transform(model, plans[name], Path(tmp) / name.replace(":", "-"), check=False, progress=False)
            f32 = sample(path, "float32")
            for dtype in LOW:
                rows.append({"plan": f"{name.split(':')[0]}:2 shape", "steps": 20, "run": f"torch {dtype}",
                             "against": "torch float32", "psnr": psnr(sample(path, dtype), f32)})
    rows.insert(2, {"plan": "full", "steps": 10, "run": "eager bf16 autocast", "against": "eager float32",
                    "psnr": psnr(autocast_samples(model.to(args.device), s10, labels, args.device), ref)})
    result = {"device": args.device, "torch": torch.__version__, "labels": labels,
              "command": "python benchmarks/precision.py" + "".join(f" {a}" for a in (argv or sys.argv[1:])),
              "rows": rows}
    table = ["| plan | steps | run | against | PSNR dB |", "|---|---|---|---|---|"]
    table += [f"| {r['plan']} | {r['steps']} | {r['run']} | {r['against']} | {r['psnr']:.1f} |" for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(f"`{result['command']}` ({args.device})\n\n" + "\n".join(table) + "\n")
    print("\n".join(table))
    return result


if __name__ == "__main__":
    main()
