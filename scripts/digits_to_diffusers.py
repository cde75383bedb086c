"""Write the demo model as a diffusers pipeline folder: its weights in DiTTransformer2DModel's layout.

    python scripts/digits_to_diffusers.py digits-diffusers            # DDIM scheduler (default)
    python scripts/digits_to_diffusers.py digits-dpm --scheduler dpm  # DPM-Solver++ (2nd order)

The folder holds `model_index.json`, `transformer/` (config.json + safetensors, converted as
diffusers' own DiT conversion does) and `scheduler/scheduler_config.json`. It has no VAE:
the demo model denoises pixels. `tcgraph transform --model FOLDER` reads it and samples with
its scheduler. The DDIM config has DiT's linear betas, "leading" spacing (the timesteps of the
official code's `ddim50`-style respacing) and `set_alpha_to_one`, and does not clip x0
(`clip_sample: false`): diffusers' DDIMScheduler clips x0 but keeps the model's unclipped noise
estimate in its step (`use_clipped_model_output` is off in `step()` and DiTPipeline never sets it),
which greys the background and costs a third of the class accuracy on this pixel-space model
(`python benchmarks/diffusers_haze.py`, docs/diffusers.md). Unclipped, it samples as tcgraph's DDIM
does on this folder. The transformer differs from the official layout by design
(diffusers' timestep frequency shift and MLP norm eps): `benchmarks/diffusers_families.py`
measures by how much.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from tcgraph import api
from tcgraph.errors import TcgraphError
from tcgraph.models.diffusers.dit import save_as_diffusers

BETAS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
SCHEDULERS = {
    "ddim": {"_class_name": "DDIMScheduler", **BETAS, "timestep_spacing": "leading", "steps_offset": 0,
             "set_alpha_to_one": True, "clip_sample": False, "prediction_type": "epsilon"},
    "dpm": {"_class_name": "DPMSolverMultistepScheduler", **BETAS, "algorithm_type": "dpmsolver++",
            "solver_order": 2, "thresholding": False, "prediction_type": "epsilon"},
}


def write_pipeline(out: Path, scheduler: str = "ddim") -> Path:
    """The demo as a diffusers pipeline folder at `out`, written beside it and renamed into place."""
    if out.exists():
        raise TcgraphError(f"{out} exists; remove it or choose another folder")
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        root = Path(tmp) / "pipeline"
        save_as_diffusers(api.load_dit("digits"), root / "transformer")
        (root / "scheduler").mkdir()
        config = SCHEDULERS[scheduler]
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(config, indent=1))
        (root / "model_index.json").write_text(json.dumps(
            {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
             "scheduler": ["diffusers", config["_class_name"]]}, indent=1))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(root), str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="the pipeline folder to write")
    ap.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim")
    args = ap.parse_args(argv)
    try:
        print(write_pipeline(args.out, args.scheduler))
    except TcgraphError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
