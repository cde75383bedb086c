"""Samplers and sampling runs: noise schedule, DDIM, the settings a plan is made for."""
from tcgraph.sampling.diffusion import (
    NUM_TRAIN_TIMESTEPS,
    DDIMSampler,
    DDIMSchedule,
    StepFn,
    guided_eps,
    linear_betas,
    model_step_fn,
    space_timesteps,
)
from tcgraph.sampling.runs import is_pixel_space, make_noise, run_batches, sampler_for
from tcgraph.sampling.settings import SamplerSettings

__all__ = [
    "NUM_TRAIN_TIMESTEPS", "DDIMSampler", "DDIMSchedule", "SamplerSettings", "StepFn", "guided_eps", "linear_betas",
    "is_pixel_space", "make_noise", "model_step_fn", "run_batches", "sampler_for", "space_timesteps",
]
