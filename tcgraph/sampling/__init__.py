"""Samplers and sampling runs: noise schedule, DDIM, diffusers' schedulers, the settings a plan is made for."""
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
from tcgraph.sampling.runs import Sampler, is_pixel_space, make_noise, run_batches, sampler_for
from tcgraph.sampling.schedulers import (
    SUPPORTED_SCHEDULERS,
    DiffusersSampler,
    DiffusersSchedule,
    scheduler_config_from_folder,
)
from tcgraph.sampling.settings import SamplerSettings

__all__ = [
    "NUM_TRAIN_TIMESTEPS", "SUPPORTED_SCHEDULERS", "DDIMSampler", "DDIMSchedule", "DiffusersSampler",
    "DiffusersSchedule", "Sampler", "SamplerSettings", "StepFn", "guided_eps", "linear_betas", "is_pixel_space",
    "make_noise", "model_step_fn", "run_batches", "sampler_for", "scheduler_config_from_folder", "space_timesteps",
]
