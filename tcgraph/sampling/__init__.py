"""Samplers and sampling runs: noise schedule, DDIM, diffusers' schedulers, the settings a plan is made for.

`SamplerSettings` (and the scheduler-config checks) import no torch; the samplers are
imported on first use (PEP 562), so reading a plan or an artifact's manifest needs no torch.
"""
from __future__ import annotations

import importlib

from tcgraph.sampling.settings import SamplerSettings

# name -> the module that defines it, imported when the name is first asked for
_LAZY = {
    **dict.fromkeys(("NUM_TRAIN_TIMESTEPS", "DDIMSampler", "DDIMSchedule", "StepFn", "guided_eps", "linear_betas",
                     "model_step_fn", "space_timesteps"), "tcgraph.sampling.diffusion"),
    **dict.fromkeys(("Sampler", "is_pixel_space", "make_noise", "run_batches", "sampler_for"), "tcgraph.sampling.runs"),
    **dict.fromkeys(("SUPPORTED_SCHEDULERS", "DiffusersSampler", "DiffusersSchedule", "scheduler_config_from_folder"),
                    "tcgraph.sampling.schedulers"),
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tcgraph.sampling' has no attribute {name!r}")


__all__ = sorted(["SamplerSettings", *_LAZY])
