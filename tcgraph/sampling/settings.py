"""The sampling run a plan (and its static graphs) is made for.

`SamplerSettings` is the one place that checks sampler settings: `transform` builds them
before it loads the model or plans, a loaded plan rebuilds them (so an edited manifest is
refused on load), and `sample` runs only settings that passed. Each refusal is a
`UsageError` naming the option and its valid range.
"""
from __future__ import annotations

from dataclasses import dataclass

from tcgraph.errors import UsageError
from tcgraph.sampling import checks
from tcgraph.sampling.diffusion import NUM_TRAIN_TIMESTEPS

SAMPLERS = ("ddim",)
# DDIM respaces the 1000 training timesteps: at most one step per timestep.
MAX_STEPS = NUM_TRAIN_TIMESTEPS
# Images per sampling run. The graphs are static in it (2x with guidance), and every cache
# tensor is [batch, tokens, hidden]: past a few thousand no device holds one run.
MAX_BATCH = 4096
# Model input side; DiT-XL/2 at 512x512 has 64 (latent), pixel models a few hundred.
MAX_RESOLUTION = 4096


@dataclass(frozen=True)
class SamplerSettings:
    """Sampler, step count, guidance, batch and resolution: constants of a plan's graphs.

    Valid: `num_steps` an int in 1..1000 (`--steps`), `cfg_scale` a finite number >= 1
    (`--guidance`; 1 = no guidance, > 1 batches the unconditional half too), `eta` a finite
    number in [0, 1] (`--eta`; 0 = deterministic DDIM, 1 = DDPM-like; above 1 the update
    takes the square root of a negative number), `batch` an int in 1..4096 (`--batch`),
    `resolution` an int in 1..4096 (the model's input size; `make_plan` and `load_artifact`
    check that it is), `clip_x0` True, False or None (`--clip-x0 on|off|auto`): whether DDIM
    clips its estimate of x0 to [-1, 1] at every step; None takes the model's default
    (`sampler_for`: on for pixel-space models, where values outside [-1, 1] are isolated
    white or black pixels, off for latent models, whose latents are not bounded).
    """

    sampler: str = "ddim"
    num_steps: int = 50
    cfg_scale: float = 2.0
    eta: float = 0.0
    batch: int = 8  # images per sampling run; the graphs see 2x with guidance
    resolution: int = 16  # model input side (latent side for latent models)
    clip_x0: bool | None = None  # None: the model's default (on in pixel space)

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise UsageError(f"unknown sampler {self.sampler!r}; supported samplers: {', '.join(SAMPLERS)}")
        fixed = {
            "num_steps": checks.integer(self.num_steps, "steps", "--steps", lo=1, hi=MAX_STEPS,
                                        why=f" (DDIM respaces the model's {NUM_TRAIN_TIMESTEPS} training timesteps)"),
            "cfg_scale": checks.real(self.cfg_scale, "guidance", "--guidance", lo=1.0,
                                     why=" (1 = no guidance; classifier-free guidance scales are >= 1)"),
            "eta": checks.real(self.eta, "eta", "--eta", lo=0.0, hi=1.0,
                               why=" (0 = deterministic DDIM, 1 = DDPM-like)"),
            "batch": checks.integer(self.batch, "batch", "--batch", lo=1, hi=MAX_BATCH,
                                    why=" images per sampling run (the graphs are static in it)"),
            "resolution": checks.integer(self.resolution, "resolution", "--resolution", lo=1, hi=MAX_RESOLUTION),
        }
        if self.clip_x0 is not None and not isinstance(self.clip_x0, bool):
            raise UsageError(f"clip_x0 (--clip-x0) must be True, False or None (the model's default), "
                             f"got {self.clip_x0!r}")
        for name, value in fixed.items():  # numpy numbers become Python ones (for JSON); others stay as given
            if type(getattr(self, name)) not in (int, float):
                object.__setattr__(self, name, value)

    @property
    def model_batch(self) -> int:
        return 2 * self.batch if self.cfg_scale > 1.0 else self.batch
