"""Run a diffusers pipeline with a tcgraph artifact in place of its transformer.

    pipe = DiTPipeline.from_pretrained("local/dit-pipeline")      # VAE, scheduler, ... as usual
    art = tcgraph.transform("local/dit-pipeline", "fora:2", steps=25, guidance=4.0, batch=2)
    with tcgraph.diffusers.use(pipe, art):
        images = pipe(class_labels=[207, 360], num_inference_steps=25, guidance_scale=4.0).images

`use` swaps `pipe.transformer` for an `ArtifactTransformer`: a module that answers the
pipeline's transformer calls by running the artifact's variants along its schedule. Each
call's timestep says which step of the plan it is, so the caches carried from step to step
are the artifact's. Everything else (latents, scheduler, guidance arithmetic, VAE) is the
pipeline's own. Leaving the `with` block (or `restore()`) puts the original back. The pipeline's
`save_pretrained` (and the stand-in's) saves the original transformer meanwhile: a pipeline saved
inside the block loads back with `from_pretrained` as it was, and its config is left untouched.

The artifact fixes what its graphs and plan were made for, and a call that does not fit is
one clear error: the step count and scheduler (the timesteps must be the plan's, in order),
the batch (`--batch`, twice that with guidance), the resolution, and guidance on or off. The
guidance *scale* never reaches the transformer, so it cannot be checked here; a plan made
for another scale still runs, with the quality its calibration gave for its own.

DiTPipeline labels the unconditional half with class 1000, ImageNet's null class; for a
model with fewer classes, that id is read as the model's own null class.

`FluxPipeline` passes packed latents [B, N, 4C], sigma (t / 1000), the T5 sequence, the pooled
CLIP embedding, the guidance scale (FLUX.1-dev) and the position ids: the stand-in unpacks the
latents for the graphs (which read images) and packs their output. The artifact's graphs fix
the resolution, the text length and the position ids (the pipeline's own for that resolution
and length), and a FLUX.1-dev plan its guidance scale; its sampler runs FluxPipeline's sigmas.
A pipeline built from local parts without text encoders or VAE runs with `prompt_embeds`,
`pooled_prompt_embeds` and `output_type="latent"`.

PixArt pipelines (`PixArtAlphaPipeline`, `PixArtSigmaPipeline`) pass the text embeddings and
their mask; the artifact's graphs read them at its `text_length` (call the pipeline with
`max_sequence_length` equal to it, or precomputed embeddings of that length). They batch the
negative prompts first, DiTPipeline its conditional half first; the graphs compute every row
alike, so either order runs.

`StableDiffusion3Pipeline` passes the latents, the timestep (sigma × 1000), the text sequence and
the pooled text embeddings, with no mask; a call with skip-layer guidance or attention keyword
arguments is refused (`tcgraph.models.diffusers.sd3_pipeline`). A pipeline built from local parts
without text encoders or VAE runs with `prompt_embeds`, `negative_prompt_embeds`,
`pooled_prompt_embeds`, `negative_pooled_prompt_embeds` and `output_type="latent"`.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from tcgraph.errors import UsageError

PIPELINE_NULL_CLASS = 1000  # what DiTPipeline passes for the unconditional half


class ArtifactTransformer(nn.Module):
    """A stand-in for a pipeline's DiTTransformer2DModel that runs a tcgraph artifact."""

    def __init__(self, artifact, runner, original=None):
        super().__init__()
        object.__setattr__(self, "original", original)  # not a submodule: its weights are not the artifact's
        from tcgraph.runtime.dispatch import ScheduleDispatcher
        from tcgraph.sampling import sampler_for

        self.artifact, self.runner = artifact, runner
        cfg, settings = artifact.model_config, artifact.plan.settings
        self.model_config, self.settings = cfg, settings
        self.dispatch = ScheduleDispatcher.for_plan(runner, artifact.plan)
        sampler = sampler_for(settings, cfg)
        order = sampler.schedule.generation_order()
        self.timesteps = [float(sampler.schedule.timesteps[i]) for i in order]  # step s -> its timestep
        self.config = SimpleNamespace(sample_size=cfg.input_size, in_channels=cfg.in_channels,
                                      out_channels=cfg.out_channels, patch_size=cfg.patch_size)
        if getattr(cfg, "pooled_channels", 0):  # StableDiffusion3Pipeline without T5 pads with zeros of this width
            self.config.joint_attention_dim = cfg.caption_channels
        self.flux = cfg.family.name == "flux"
        self.calls = self.timesteps  # the timestep each step's call passes
        if self.flux:  # FluxPipeline reads packed channels and the guidance embedding; passes t / 1000
            self.config, self.calls = _flux().stand_in(cfg, self.timesteps)
        self._next = 0  # the step the next call must be

    def save_pretrained(self, *args, **kwargs):
        """Saves the pipeline's own transformer that this stand-in replaced (an artifact is no diffusers model)."""
        if self.original is None or not hasattr(self.original, "save_pretrained"):
            raise UsageError("the tcgraph artifact in place of the pipeline's transformer cannot be saved as a "
                             "diffusers model; save the transformer itself (restore() the pipeline first)")
        return self.original.save_pretrained(*args, **kwargs)

    def cache_context(self, name: str):
        """What FluxPipeline wraps each call in (diffusers' cache hooks): nothing to do here."""
        import contextlib

        return contextlib.nullcontext()

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # where the pipeline's latents live; the runner moves them to its device

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states=None, timestep=None, class_labels=None,
                encoder_attention_mask=None, added_cond_kwargs=None, return_dict: bool = True, **unused):
        step = self._step_of(timestep)
        self._check_micro_conditions(added_cond_kwargs)
        if self.flux:
            x, t, y = _flux().call_inputs(self.settings, self.model_config, hidden_states,
                                          lambda: self._text(encoder_hidden_states), unused, self.timesteps[step])
        elif getattr(self.model_config, "pooled_channels", 0):  # SD3: pooled text embeddings, no mask
            x = self._latents(hidden_states, "prompts")
            text, pooled = self._text(encoder_hidden_states), _sd3().pooled_input(self.settings, self.model_config, unused)
            t, y = self._timesteps(timestep, x.shape[0]), (text, pooled)
        elif self.model_config.text_conditioned:
            x, t, y = self._text_inputs(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask)
        else:
            x, t, y = self._inputs(hidden_states, timestep, class_labels, step)
        if step == 0:
            self.dispatch.reset()
        out = self.dispatch(step, x, t, y)
        self._next = step + 1 if step + 1 < len(self.timesteps) else 0
        out = (_flux().output(out, self.model_config) if self.flux else out).to(hidden_states.device)
        return SimpleNamespace(sample=out) if return_dict else (out,)

    def _step_of(self, timestep) -> int:
        if timestep is None:
            raise UsageError("the artifact's transformer needs the step's timestep; the pipeline passed none")
        value = float(torch.as_tensor(timestep).reshape(-1)[0])
        expected = self.calls[self._next]
        if value == expected:
            return self._next
        if value == self.calls[0]:  # a new run after an interrupted one
            return 0
        if self._next > 0 and value == self.calls[self._next - 1]:
            raise UsageError(f"the pipeline called the transformer a second time at step {self._next - 1} (timestep "
                             f"{value:g}): the artifact runs one pass per step (FluxPipeline does two with a negative "
                             "prompt and true_cfg_scale > 1): call the pipeline without them")
        s = self.settings
        which = (f"the diffusers scheduler {s.scheduler['_class_name']}" if s.scheduler else "tcgraph's DDIM")
        raise UsageError(
            f"the pipeline's timestep {value:g} is not step {self._next} of the artifact's plan (timestep "
            f"{expected:g}): the artifact was made for {s.num_steps} steps of {which}, timesteps "
            f"{_short(self.calls)}; call the pipeline with num_inference_steps={s.num_steps} and the scheduler "
            "the artifact was made with, or transform the pipeline again for these settings")

    def _check_micro_conditions(self, added_cond_kwargs) -> None:
        """PixArt-alpha 1024's resolution and aspect ratio are graph constants: the pipeline must pass those."""
        size = self.model_config.micro_size
        if not size:
            return
        given = added_cond_kwargs or {}
        resolution, ratio = given.get("resolution"), given.get("aspect_ratio")
        ok = (resolution is not None and ratio is not None
              and bool((torch.as_tensor(resolution).float() == size).all())
              and bool((torch.as_tensor(ratio).float() == 1.0).all()))
        if not ok:
            raise UsageError(
                f"the artifact's graphs fix PixArt's micro-conditions to a {size}x{size} image (aspect ratio 1); the "
                f"pipeline passed resolution {None if resolution is None else torch.as_tensor(resolution).tolist()[:2]}"
                f" and aspect ratio {None if ratio is None else torch.as_tensor(ratio).reshape(-1).tolist()[:2]}: "
                f"call it with height={size}, width={size}")

    def _latents(self, hidden_states, per_call: str) -> torch.Tensor:
        s, cfg = self.settings, self.model_config
        x = hidden_states.detach().to("cpu", torch.float32)
        want = (s.model_batch, cfg.in_channels, s.resolution, s.resolution)
        if x.dim() == 4 and x.shape[0] == want[0] and tuple(x.shape[2:]) != want[2:]:
            raise UsageError(
                f"the pipeline gave the transformer a {x.shape[2]}x{x.shape[3]} latent, the artifact's graphs take "
                f"{s.resolution}x{s.resolution} (a constant of the graphs): call the pipeline with height and width "
                f"{8 * s.resolution} (with a VAE that downsamples 8x), or transform again at that resolution")
        if tuple(x.shape) != want:
            guided = " (guidance doubles it)" if s.model_batch > s.batch else ""
            raise UsageError(
                f"the pipeline gave the transformer latents of shape {list(x.shape)}, the artifact's graphs take "
                f"{list(want)}: batch {s.batch}{guided}, {cfg.in_channels} channels, resolution {s.resolution}; "
                f"call the pipeline with {s.batch} {per_call} per call (and guidance "
                f"{'on' if s.model_batch > s.batch else 'off'}), or transform again with --batch for yours")
        return x

    def _timesteps(self, timestep, batch: int) -> torch.Tensor:
        t = torch.as_tensor(timestep).reshape(-1).to("cpu")
        return (t.expand(batch) if t.numel() == 1 else t).to(self.settings.timestep_dtype)

    def _text(self, encoder_hidden_states) -> torch.Tensor:
        s, cfg = self.settings, self.model_config
        if encoder_hidden_states is None:
            raise UsageError("the artifact is text-conditioned; the pipeline passed no encoder_hidden_states")
        text = encoder_hidden_states.detach().to("cpu", torch.float32)
        want = (s.model_batch, s.text_length, cfg.caption_channels)
        if tuple(text.shape) != want:
            raise UsageError(
                f"the pipeline gave text embeddings of shape {list(text.shape)}, the artifact's graphs take "
                f"{list(want)} (text length {s.text_length} is a plan setting): call the pipeline with "
                f"max_sequence_length={s.text_length}, or transform again with --text-length {text.shape[1]}")
        return text

    def _text_inputs(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask):
        x = self._latents(hidden_states, "prompts")
        text = self._text(encoder_hidden_states)
        want = text.shape
        mask = (torch.ones(want[:2]) if encoder_attention_mask is None
                else torch.as_tensor(encoder_attention_mask).detach().to("cpu", torch.float32).reshape(want[:2]))
        return x, self._timesteps(timestep, x.shape[0]), (text, mask)

    def _inputs(self, hidden_states, timestep, class_labels, step):
        s, cfg = self.settings, self.model_config
        if class_labels is None:
            raise UsageError("the artifact is class-conditional; the pipeline passed no class_labels")
        x = self._latents(hidden_states, "class labels")
        y = torch.as_tensor(class_labels).reshape(-1).to("cpu", torch.long).clone()
        null = cfg.num_classes
        y[y == PIPELINE_NULL_CLASS] = null
        guided_call = s.model_batch > s.batch
        uncond = y[s.batch:] if guided_call else y[:0]
        if guided_call and not bool((uncond == null).all()):
            raise UsageError("the artifact was made with guidance, but the second half of the pipeline's batch is "
                             "not the null class: call the pipeline with guidance_scale > 1, or transform with "
                             "--guidance 1")
        if not guided_call and bool((y == null).any()):
            raise UsageError("the artifact was made without guidance (--guidance 1), but the pipeline batched "
                             "unconditional rows: call it with guidance_scale=1, or transform with guidance")
        bad = y[(y < 0) | (y > null)]
        if bad.numel():
            raise UsageError(f"class labels {bad[:5].tolist()} are out of range for the model's {null} classes")
        return x, self._timesteps(timestep, x.shape[0]), y


class Swap:
    """What `use` returns: the pipeline runs the artifact until `restore()` (or the `with` ends)."""

    def __init__(self, pipe, transformer: ArtifactTransformer, original):
        self.pipe, self.transformer, self.original = pipe, transformer, original
        own = getattr(pipe, "save_pretrained", None)
        self._save = self._saving(own) if callable(own) else None
        if self._save is not None:  # an instance attribute: the pipeline's class is left alone
            object.__setattr__(pipe, "save_pretrained", self._save)

    def _saving(self, own):
        def save_pretrained(*args, **kwargs):
            """The pipeline's save_pretrained, with its own transformer in place while it writes (a
            stand-in is no diffusers model: diffusers would skip it and mark the component None)."""
            current = self.pipe.transformer
            _set_transformer(self.pipe, self.original)
            try:
                return own(*args, **kwargs)
            finally:
                _set_transformer(self.pipe, current)
        return save_pretrained

    def restore(self) -> None:
        if self._save is not None and self.pipe.__dict__.get("save_pretrained") is self._save:
            del self.pipe.__dict__["save_pretrained"]
        if self.pipe.transformer is self.transformer:
            _set_transformer(self.pipe, self.original)
            self.transformer.runner.deactivate()

    def __enter__(self):
        return self.pipe

    def __exit__(self, *exc) -> None:
        self.restore()


def use(pipe, artifact: str | os.PathLike, backend: str = "ort", **runner_options) -> Swap:
    """Put the tcgraph artifact at `artifact` in place of `pipe.transformer` (see the module doc).

    The artifact must be of the pipeline's model: its config must equal what the pipeline's
    transformer config says (sizes, classes). Returns a `Swap`; use it in a `with` block or
    call `restore()`."""
    from tcgraph import api
    from tcgraph.export.artifact import load_artifact

    if not hasattr(pipe, "transformer") or isinstance(pipe, (str, os.PathLike)):
        raise UsageError(f"tcgraph.diffusers.use(pipe, artifact) takes a diffusers pipeline object as `pipe` (a "
                         f"{PIPELINES}, loaded with from_pretrained), got {_what(pipe)}")
    if not isinstance(artifact, (str, os.PathLike)):
        raise UsageError(f"tcgraph.diffusers.use(pipe, artifact) takes the path of a tcgraph artifact folder as "
                         f"`artifact` (a str or os.PathLike, what tcgraph.transform returns), got {_what(artifact)}")
    if not isinstance(backend, str):
        raise UsageError(f"backend must be a backend name (a str such as 'ort'), got {_what(backend)}")
    original = pipe.transformer
    if original is None:
        raise UsageError(f"{type(pipe).__name__} has no transformer to replace; tcgraph.diffusers.use takes a "
                         f"pipeline with a `transformer` component: a {PIPELINES}")
    if isinstance(original, ArtifactTransformer):
        raise UsageError("this pipeline already runs a tcgraph artifact; restore() it first")
    art = load_artifact(Path(artifact))
    _check_same_model(pipe, original, art.model_config, artifact)
    runner = api.make_runner(backend, art, **runner_options)
    runner.activate()
    try:
        transformer = ArtifactTransformer(art, runner, original)
    except BaseException:
        runner.deactivate()
        raise
    _set_transformer(pipe, transformer)
    return Swap(pipe, transformer, original)


def _check_same_model(pipe, original, config, where) -> None:
    from tcgraph.models.diffusers.config import (CLASS_NAME, PIXART_CLASS_NAME, check_pipeline_transformer,
                                                 config_from_diffusers, pixart_config_from_diffusers)

    raw = getattr(original, "config", None)
    if raw is None:
        return
    pipeline, theirs = type(pipe).__name__, dict(raw).get("_class_name", type(original).__name__)
    if config.family.name == "flux" or theirs == "FluxTransformer2DModel":
        return _flux().check_same_model(pipeline, theirs, dict(raw), config, where)
    if config.family.name == "sd3" or theirs == "SD3Transformer2DModel":
        return _sd3().check_same_model(pipeline, theirs, dict(raw), config, where)
    if config.text_conditioned:
        fits = (PIXART_CLASS_NAME, f"text-conditioned (a {PIXART_CLASS_NAME}: its graphs read text embeddings)",
                "a PixArtAlphaPipeline or PixArtSigmaPipeline")
    else:
        fits = (CLASS_NAME, "class-conditional (a DiT: its graphs read class labels)", "a DiTPipeline")
    if theirs != fits[0]:
        kind = {CLASS_NAME: "a class-conditional DiTTransformer2DModel",
                PIXART_CLASS_NAME: "a text-conditioned PixArtTransformer2DModel"}.get(theirs, f"a {theirs}")
        raise UsageError(f"the artifact {where} is {fits[1]}, but {pipeline}'s transformer is {kind}: use the "
                         f"artifact with {fits[2]}, or transform this pipeline's own model (tcgraph transform "
                         "--model <its pipeline folder>)")
    read = pixart_config_from_diffusers if config.text_conditioned else config_from_diffusers
    check_pipeline_transformer(config, dict(raw), read, ("input_size", "patch_size", "in_channels", "hidden_size",
                               "depth", "num_heads", "num_classes", "learn_sigma", "caption_channels"), pipeline, where)


def _sd3():
    """StableDiffusion3Pipeline's conventions (`tcgraph.models.diffusers.sd3_pipeline`, for an SD3 artifact only)."""
    from tcgraph.models.diffusers import sd3_pipeline

    return sd3_pipeline


def _flux():
    """FluxPipeline's conventions (`tcgraph.models.diffusers.flux_pipeline`, imported for a FLUX artifact only)."""
    from tcgraph.models.diffusers import flux_pipeline

    return flux_pipeline


PIPELINES = "DiTPipeline, PixArtAlphaPipeline, PixArtSigmaPipeline, StableDiffusion3Pipeline or FluxPipeline"


def _what(value) -> str:
    return "None" if value is None else f"{type(value).__name__} {str(value)[:60]!r}"


def _set_transformer(pipe, module) -> None:
    # DiffusionPipeline.__setattr__ records a registered component's class in the pipeline's config;
    # the stand-in is no diffusers class, so set it without touching the config.
    object.__setattr__(pipe, "transformer", module)


def _short(values: list[float]) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:4])
    return f"[{shown}{', …' if len(values) > 4 else ''}]"
