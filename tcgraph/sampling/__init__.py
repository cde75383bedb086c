from tcgraph.sampling.diffusion import (
    NUM_TRAIN_TIMESTEPS,
    DDIMSampler,
    DDIMSchedule,
    guided_eps,
    linear_betas,
    make_noise,
    model_step_fn,
    space_timesteps,
)

__all__ = [
    "NUM_TRAIN_TIMESTEPS",
    "DDIMSampler",
    "DDIMSchedule",
    "guided_eps",
    "linear_betas",
    "make_noise",
    "model_step_fn",
    "space_timesteps",
]
