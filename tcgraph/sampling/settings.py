"""The sampling run a plan (and its static graphs) is made for.

`SamplerSettings` is the one place that checks sampler settings: `transform` builds them
before it loads the model or plans, a loaded plan rebuilds them (so an edited manifest is
refused on load), and `sample` runs only settings that passed. Each refusal is a
`UsageError` naming the option and its valid range.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from tcgraph.errors import UsageError
from tcgraph.names import GUIDANCE, GUIDANCE_MODES, MODEL_INPUTS, POOLED_INPUTS, TEXT_INPUTS
from tcgraph.sampling import checks
from tcgraph.sampling.scheduler_config import CLASS_KEY, check_scheduler_config, timestep_dtype_name

if TYPE_CHECKING:
    import torch

# DDPM's training timesteps, which DDIM respaces (DiT's schedule).
NUM_TRAIN_TIMESTEPS = 1000

# "ddim": tcgraph's own DDIM (DiT's schedule, ADM respacing); "diffusers": the diffusers
# scheduler class that `scheduler` (a pipeline's scheduler_config.json) names.
SAMPLERS = ("ddim", "diffusers")
# DDIM respaces the 1000 training timesteps: at most one step per timestep.
MAX_STEPS = NUM_TRAIN_TIMESTEPS
# Images per sampling run. The graphs are static in it (2x with guidance), and every cache
# tensor is [batch, tokens, hidden]: past a few thousand no device holds one run.
MAX_BATCH = 4096
# Model input side; DiT-XL/2 at 512x512 has 64 (latent), pixel models a few hundred.
MAX_RESOLUTION = 4096
# Text tokens a text-conditioned model reads (PixArt-alpha: 120, PixArt-Sigma: 300; T5 allows 512).
MAX_TEXT_LENGTH = 4096


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

    `text_length` is the number of text tokens of a text-conditioned model (its graphs read
    `encoder_hidden_states` [B, L, D_text] and `encoder_attention_mask` [B, L]; prompts are
    padded to L), an int in 1..4096 (`--text-length`); 0 for a class-conditional model (the
    graphs read class ids `y`).

    `scheduler` is the contents of a diffusers `scheduler_config.json` (see
    `tcgraph.sampling.schedulers.scheduler_config_from_folder`), set exactly when `sampler`
    is "diffusers": the deterministic diffusers scheduler it names samples then. Such a
    scheduler is deterministic by itself, so `eta` must be 0, and its config decides any
    clipping (`clip_sample`, `thresholding`), so `clip_x0` must be None.
    """

    sampler: str = "ddim"
    num_steps: int = 50
    cfg_scale: float = 2.0
    eta: float = 0.0
    batch: int = 8  # images per sampling run; the graphs see 2x with guidance
    resolution: int = 16  # model input side (latent side for latent models)
    clip_x0: bool | None = None  # None: the model's default (on in pixel space)
    # a diffusers scheduler_config.json (plain JSON); not hashed: a dict has no hash
    scheduler: dict | None = field(default=None, hash=False)
    text_length: int = 0  # text tokens of a text-conditioned model; 0: class ids
    guidance: str = "cfg"  # how guidance reaches the model (tcgraph.names.GUIDANCE_MODES), as its family says
    # the model reads pooled text embeddings (`pooled_projections`) in place of the text mask (FLUX, SD3)
    pooled: bool = False

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise UsageError(f"unknown sampler {self.sampler!r}; supported samplers: {', '.join(SAMPLERS)}")
        if self.guidance not in GUIDANCE_MODES:
            raise UsageError(f"unknown guidance mode {self.guidance!r}; modes: {', '.join(GUIDANCE_MODES)}")
        if self.guidance == "none" and self.cfg_scale != 1.0:
            raise UsageError(f"this model takes no guidance: use guidance 1 (--guidance 1), got {self.cfg_scale!r}")
        fixed = {
            "num_steps": checks.integer(self.num_steps, "steps", "--steps", lo=1, hi=MAX_STEPS,
                                        why=f" (DDIM respaces the model's {NUM_TRAIN_TIMESTEPS} training timesteps)"
                                        if self.sampler == "ddim" else
                                        f" (at most one step per training timestep; the model has "
                                        f"{NUM_TRAIN_TIMESTEPS})"),
            "cfg_scale": checks.real(self.cfg_scale, "guidance", "--guidance", lo=1.0,
                                     why=" (1 = no guidance; classifier-free guidance scales are >= 1)"),
            "eta": checks.real(self.eta, "eta", "--eta", lo=0.0, hi=1.0,
                               why=" (0 = deterministic DDIM, 1 = DDPM-like)"),
            "batch": checks.integer(self.batch, "batch", "--batch", lo=1, hi=MAX_BATCH,
                                    why=" images per sampling run (the graphs are static in it)"),
            "resolution": checks.integer(self.resolution, "resolution", "--resolution", lo=1, hi=MAX_RESOLUTION),
            "text_length": checks.integer(self.text_length, "text length", "--text-length", lo=0, hi=MAX_TEXT_LENGTH,
                                          why=" (0 for a class-conditional model)"),
        }
        if self.clip_x0 is not None and not isinstance(self.clip_x0, bool):
            raise UsageError(f"clip_x0 (--clip-x0) must be True, False or None (the model's default), "
                             f"got {self.clip_x0!r}")
        for name, value in fixed.items():  # numpy numbers become Python ones (for JSON); others stay as given
            if type(getattr(self, name)) not in (int, float):
                object.__setattr__(self, name, value)
        self._check_scheduler()

    def _check_scheduler(self) -> None:
        if self.sampler == "ddim":
            if self.scheduler is not None:
                raise UsageError('a diffusers scheduler config was given with sampler "ddim"; pass '
                                 'sampler="diffusers" to sample with it, or scheduler=None for tcgraph\'s DDIM')
            return
        if self.scheduler is None:
            raise UsageError('sampler "diffusers" needs scheduler: the contents of the pipeline\'s '
                             'scheduler/scheduler_config.json (tcgraph.sampling.scheduler_config_from_folder reads it)')
        scheduler = check_scheduler_config(self.scheduler, where="scheduler")
        name = scheduler[CLASS_KEY]
        if self.eta != 0:
            raise UsageError(f"eta (--eta) must be 0 with the diffusers scheduler {name}, got {self.eta!r}: "
                             "tcgraph runs only deterministic schedulers")
        if self.clip_x0 is not None:
            raise UsageError(f"clip_x0 (--clip-x0) must be None (auto) with the diffusers scheduler {name}, got "
                             f"{self.clip_x0!r}: its config decides clipping (clip_sample, thresholding); "
                             "edit scheduler_config.json instead")
        object.__setattr__(self, "scheduler", scheduler)  # a plain-JSON copy: the caller's dict may change

    def to_dict(self) -> dict:
        """The fields as plain JSON; `text_length` and `pooled` only when set, `guidance` only when not "cfg", so
        that plans written before they existed read (and hash) the same."""
        d = asdict(self)
        if not d["text_length"]:
            del d["text_length"]
        if d["guidance"] == "cfg":
            del d["guidance"]
        if not d["pooled"]:
            del d["pooled"]
        return d

    @property
    def model_inputs(self) -> tuple[str, ...]:
        """The model's own inputs of every variant graph: x, t, its conditioning, then the guidance
        scale where guidance is an input. A text-conditioned model's conditioning is its text embeddings
        and their mask, or, with `pooled`, its text embeddings and pooled embeddings."""
        text = POOLED_INPUTS if self.pooled else TEXT_INPUTS
        return (text if self.text_length else MODEL_INPUTS) + ((GUIDANCE,) if self.guidance == "input" else ())

    @property
    def doubles_batch(self) -> bool:
        """Whether each step runs the conditional and unconditional halves in one batch (CFG)."""
        return self.guidance == "cfg" and self.cfg_scale > 1.0

    @property
    def model_batch(self) -> int:
        return 2 * self.batch if self.doubles_batch else self.batch

    @property
    def timestep_dtype_name(self) -> str:
        """The dtype of the graphs' `t` input: "int64", "float32" under a flow-matching scheduler."""
        return "int64" if self.scheduler is None else timestep_dtype_name(self.scheduler)

    @property
    def timestep_dtype(self) -> "torch.dtype":
        """`timestep_dtype_name` as a torch dtype."""
        import torch

        return getattr(torch, self.timestep_dtype_name)
