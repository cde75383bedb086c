"""Samplers and sampling runs: noise schedule, DDIM, diffusers' schedulers, the settings a plan is made for.

`SamplerSettings` (and the scheduler-config checks) import no torch; the samplers are
imported on first use (PEP 562), so reading a plan or an artifact's manifest needs no torch.
"""
from __future__ import annotations

from tcgraph.sampling.settings import SamplerSettings
from tcgraph.lazy import lazy_names

# name -> the module that defines it, imported when the name is first asked for
_LAZY = {
    **dict.fromkeys(("NUM_TRAIN_TIMESTEPS", "DDIMSampler", "DDIMSchedule", "StepFn", "guided_eps", "linear_betas",
                     "model_step_fn", "space_timesteps"), "tcgraph.sampling.diffusion"),
    **dict.fromkeys(("Sampler", "is_pixel_space", "make_noise", "run_batches", "sampler_for"), "tcgraph.sampling.runs"),
    **dict.fromkeys(("SUPPORTED_SCHEDULERS", "DiffusersSampler", "DiffusersSchedule", "scheduler_config_from_folder"),
                    "tcgraph.sampling.schedulers"),
}


__getattr__ = lazy_names('tcgraph.sampling', _LAZY, globals())


__all__ = sorted(["SamplerSettings", *_LAZY])
