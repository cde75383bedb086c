"""Calibration trajectories: the full model run along the sampler from random noise and
random labels (no data set), as docs/design.md's data flow fixes it.

What is kept, per step `s` of generation order and per image:
- `x[s]`: the sampler state entering step s (the model input before the CFG halves are
  stacked; `model_inputs` rebuilds the batch the model sees, null class included);
- `eps[s]`: the full model's guided epsilon at that step — the target every cache plan is
  trained against (with guidance the error that reaches the sample is the guided one).

Branch outputs and block inputs are *not* stored: they are recomputed from `x[s]` by one
no-grad forward when a learner needs them. Storing them costs `2 · depth · N · D` floats
per model row and step (`branch_bytes`): for DiT-XL/2 at 256×256 (256 tokens, D = 1152,
28 blocks) that is 66 MB per row-step, 211 GB for 32 images × 50 steps with guidance,
against 52 MB for the states and targets tcgraph keeps (`calibration_bytes`).
Recomputing costs one no-grad forward per cache round, the cheaper side by far.

What calibration can keep besides, because its own pass computes it anyway:
- `samples`: the full model's final samples (the calibration run *is* the full model's
  free-running run from that noise), the reference a learned planner's final choice compares
  its candidates with (`select.finish_learned`);
- `grams`: the output Grams of every branch (`tcgraph.calibrate.grams`), what forecast weights
  are fitted from, for image ranges given in advance (`calibrate(..., grams_at=cut)`: the
  training and the held-out images), so no second pass over the calibration images is needed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tcgraph.calibrate.grams import Grams, add_grams, stack_outputs
from tcgraph.calibrate.mixed import mixed_step
from tcgraph.errors import TcgraphError
from tcgraph.progress import SILENT, Phase
from tcgraph.models.official.dit import DiT
from tcgraph.models.families import ModelConfig
from tcgraph.sampling import DDIMSampler, SamplerSettings, sampler_for
from tcgraph.sampling.conditioning import Text, as_inputs, nbytes, take

FLOAT_BYTES = 4


@dataclass
class Trajectories:
    settings: SamplerSettings
    config: ModelConfig
    x: torch.Tensor  # (S, R, C, H, W) sampler state entering each step
    y: torch.Tensor | Text  # (R,) class ids, or the R images' text conditioning
    eps: torch.Tensor  # (S, R, C, H, W) full model's guided epsilon at each step
    samples: torch.Tensor | None = None  # (R, C, H, W) the full model's final samples, where kept
    # (first image, end) -> that image range's output Grams (`calibrate.grams`), where computed
    grams: dict[tuple[int, int], Grams] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return self.x.shape[0]

    @property
    def num_images(self) -> int:
        return self.x.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.x, self.eps)) + nbytes(self.y)

    def sampler(self) -> DDIMSampler:
        return sampler_for(self.settings, self.config)

    def model_inputs(self, step: int, rows: torch.Tensor | None = None):
        """(x, t, y) the model sees at `step` for images `rows` (all by default), CFG halves stacked."""
        rows = torch.arange(self.num_images) if rows is None else rows
        sampler = self.sampler()
        index = sampler.schedule.generation_order()[step]
        return sampler.model_inputs(self.x[step, rows], index, take(self.y, rows))

    def eps_of(self, model_out: torch.Tensor) -> torch.Tensor:
        """The guided epsilon of a model output (what `eps` holds for the full model)."""
        return self.sampler().eps_from_output(model_out)

    def split(self, held_out: int) -> tuple["Trajectories", "Trajectories"]:
        """(train, held-out): the last `held_out` images are held out."""
        if not 0 < held_out < self.num_images:
            raise TcgraphError(f"cannot hold out {held_out} of {self.num_images} calibration images")
        cut = self.num_images - held_out
        return self.part(0, cut), self.part(cut, self.num_images)

    def part(self, lo: int, hi: int) -> "Trajectories":
        """Images lo..hi-1, with their samples and the Grams of ranges inside it."""
        sl = slice(lo, hi)
        grams = {(a - lo, b - lo): g for (a, b), g in self.grams.items() if lo <= a and b <= hi}
        return Trajectories(self.settings, self.config, self.x[:, sl], take(self.y, sl), self.eps[:, sl],
                            None if self.samples is None else self.samples[sl], grams)

    def output_grams(self) -> Grams | None:
        """The output Grams of all these images, where calibration computed them for exactly this range."""
        return self.grams.get((0, self.num_images))


GRAM_CHUNK_BYTES = 256 * 2**20  # branch outputs one calibration chunk may keep for its Grams


def chunks(num_images: int, chunk: int, cut: int | None = None) -> list[tuple[int, int]]:
    """Calibration chunks (first image, end) of at most `chunk` images; none straddles `cut`."""
    bounds = [0, num_images] if cut is None or not 0 < cut < num_images else [0, cut, num_images]
    return [(lo, min(lo + chunk, hi)) for a, hi in zip(bounds, bounds[1:]) for lo in range(a, hi, chunk)]


def gram_chunk(cfg: ModelConfig, settings: SamplerSettings, chunk: int) -> int:
    """Images per chunk when Grams are kept: at most `chunk`, and their branch outputs over the
    whole run within `GRAM_CHUNK_BYTES` (one image at least)."""
    rows = 2 if settings.doubles_batch else 1
    per_image = (settings.num_steps * rows * len(cfg.branches) * cfg.depth * cfg.num_tokens * cfg.hidden_size
                 * FLOAT_BYTES)
    return max(1, min(chunk, GRAM_CHUNK_BYTES // max(per_image, 1)))


def calibration_chunks(cfg: ModelConfig, settings: SamplerSettings, num_images: int, *, chunk: int = 32,
                       grams_at: int | None = None) -> list[tuple[int, int]]:
    """The chunks `calibrate` runs (its phase ticks once per step of each)."""
    if grams_at is None:
        return chunks(num_images, chunk)
    return chunks(num_images, gram_chunk(cfg, settings, chunk), grams_at)


@torch.no_grad()
def calibrate(model: DiT, settings: SamplerSettings, num_images: int = 64, *, seed: int = 0, chunk: int = 32,
              phase: Phase = SILENT, text: Text | None = None, grams_at: int | None = None) -> Trajectories:
    """Run the full model along the sampler from random noise and labels; `phase` ticks once per
    step of each chunk of `chunk` images. A text-conditioned model is conditioned on `text`
    instead (its prompts cycled to `num_images`): calibration prompts, which only the user has.

    The final samples are kept (`Trajectories.samples`). With `grams_at`, the output Grams of
    images [0, grams_at) and [grams_at, num_images) are computed in the same pass
    (`Trajectories.grams`; e.g. `grams_at = num_images - held_out` for a planner's split), in
    chunks small enough to keep their branch outputs (`gram_chunk`)."""
    cfg = model.config
    if num_images < 2:
        raise TcgraphError(f"calibration needs at least 2 images, got {num_images}")
    if settings.resolution != cfg.input_size:
        raise TcgraphError(f"resolution {settings.resolution} does not match the model's input size {cfg.input_size}")
    if grams_at is not None and not 0 < grams_at <= num_images:
        raise TcgraphError(f"Grams split at image {grams_at}, outside 1..{num_images}")
    g = torch.Generator().manual_seed(seed)
    if getattr(cfg, "text_conditioned", False):
        if text is None:
            raise TcgraphError("calibrating a text-conditioned model needs prompt embeddings (calibration_text=, "
                               "`--calibration-embeddings FILE`): their prompts decide which branches change")
        text.check(settings.text_length, cfg.caption_channels, getattr(cfg, "pooled_channels", 0))
        y = text.repeat_to(num_images)
    else:
        y = torch.randint(0, cfg.num_classes, (num_images,), generator=g)
    noise = torch.randn(num_images, cfg.in_channels, settings.resolution, settings.resolution, generator=g)
    sampler = sampler_for(settings, cfg)
    S = sampler.num_steps
    xs = torch.empty(S, *noise.shape)
    eps = torch.empty(S, *noise.shape)
    samples = torch.empty_like(noise)
    model = model.eval()
    parts = {} if grams_at is None else {r: {} for r in ((0, grams_at), (grams_at, num_images)) if r[0] < r[1]}
    for lo, hi in calibration_chunks(cfg, settings, num_images, chunk=chunk, grams_at=grams_at):
        sl = slice(lo, hi)
        outs: list[dict[str, torch.Tensor]] = []

        def step_fn(step, x, t, yy, sl=sl, outs=outs):
            if grams_at is None:
                out = model(x, t, *as_inputs(yy))
            else:  # the same forward, through the adapter's block loop, which hands out the branch outputs
                out, used = mixed_step(model, x, t, yy, {}, {})
                outs.append(used)
            xs[step, sl] = x[: x.shape[0] // 2] if sampler.use_cfg else x
            eps[step, sl] = sampler.eps_from_output(out)
            return out

        samples[sl] = sampler.sample(step_fn, noise[sl], take(y, sl),
                                     generator=torch.Generator().manual_seed(seed + 1 + lo), phase=phase)
        if outs:
            part = next(r for r in parts if r[0] <= lo and hi <= r[1])
            add_grams(parts[part], stack_outputs(outs))
    return Trajectories(settings, cfg, xs, y, eps, samples, parts)


def calibration_bytes(cfg: ModelConfig, settings: SamplerSettings, num_images: int) -> int:
    """Memory of the trajectories tcgraph keeps: states and guided targets per image-step."""
    per = cfg.in_channels * settings.resolution**2 * FLOAT_BYTES
    return settings.num_steps * num_images * 2 * per + num_images * 8


def branch_bytes(cfg: ModelConfig, settings: SamplerSettings, num_images: int) -> int:
    """Memory that storing every pre-gate branch output would take (model rows incl. CFG halves)."""
    rows = num_images * (2 if settings.doubles_batch else 1)
    return settings.num_steps * rows * 2 * cfg.depth * cfg.num_tokens * cfg.hidden_size * FLOAT_BYTES
