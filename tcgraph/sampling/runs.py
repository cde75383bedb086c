"""Sampling runs: the sampler for a plan's settings, seeded noise, and images in static batches."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import torch

from tcgraph.errors import TcgraphError
from tcgraph.progress import QUIET, Progress
from tcgraph.sampling.conditioning import Text, take
from tcgraph.sampling.diffusion import DDIMSampler, StepFn
from tcgraph.sampling.schedulers import DiffusersSampler
from tcgraph.sampling.settings import SamplerSettings

if TYPE_CHECKING:
    from tcgraph.models.families import ModelConfig

# What calibration, evaluation and sampling runs use of a sampler is the same for both.
Sampler = DDIMSampler | DiffusersSampler


def sampler_for(settings: SamplerSettings, cfg: ModelConfig) -> Sampler:
    """The sampler of `settings` for a model with `cfg`'s channels and null class.

    With a diffusers scheduler config (`settings.scheduler`), a `DiffusersSampler` runs that
    scheduler (diffusers imported now). Otherwise tcgraph's DDIM, which clips x0 as
    `settings.clip_x0` says, or by default where the model is pixel-space."""
    if settings.scheduler is not None:
        return DiffusersSampler(settings.scheduler, settings.num_steps, cfg_scale=settings.cfg_scale,
                                in_channels=cfg.in_channels, null_class=cfg.num_classes,
                                num_tokens=getattr(cfg, "num_tokens", None), guidance=settings.guidance,
                                sigmas=_pipeline_sigmas(cfg, settings))
    clip = settings.clip_x0 if settings.clip_x0 is not None else is_pixel_space(cfg)
    return DDIMSampler(settings.num_steps, cfg_scale=settings.cfg_scale, eta=settings.eta,
                       in_channels=cfg.in_channels, null_class=cfg.num_classes, clip_denoised=clip,
                       guidance=settings.guidance)


def _pipeline_sigmas(cfg: ModelConfig, settings: SamplerSettings) -> list[float] | None:
    """The sigmas a model's own pipeline sets a flow-matching scheduler with, where they are not the
    scheduler's default (FluxPipeline: 1 down to 1/S); None: the scheduler's own."""
    sigmas = getattr(cfg, "pipeline_sigmas", None)
    if sigmas is None or settings.scheduler.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
        return None
    return sigmas(settings.num_steps)


def is_pixel_space(cfg: ModelConfig) -> bool:
    """Whether a DiT denoises pixels (values in [-1, 1]) rather than latents.

    Every official DiT checkpoint denoises the latents of Stable Diffusion's VAE, which are
    not bounded; tcgraph's demo model denoises pixels. A config is pixel-space when it is a
    registered pixel-space config (`models.dit.PIXEL_SPACE`: the demo's, and the text demo's
    `TEXT_DEMO`); any other (an
    official checkpoint, a random test model) is taken as latent. `SamplerSettings.clip_x0`
    overrides the default either way.
    """
    from tcgraph.models.official.dit import CONFIGS, PIXEL_SPACE, TEXT_DEMO

    return cfg == TEXT_DEMO or any(cfg == CONFIGS[name] for name in PIXEL_SPACE)


def make_noise(n: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """Initial noise for n images, reproducible from a seed on every machine (CPU generator);
    the i-th image's noise does not depend on how the images are batched later."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=g)


def run_batches(step_fn: StepFn, reset: Callable[[], None], sampler: Sampler, labels: list[int] | Text,
                noise: torch.Tensor, batch: int, seed: int, progress: Progress = QUIET,
                device: str | torch.device = "cpu") -> torch.Tensor:
    """Sample `labels` (class ids, or a `Text` of one prompt per image) in runs of exactly `batch`
    images (the last run padded, padding dropped).

    `reset()` is called before each run (a dispatcher forgets its caches). The sampler runs
    on `device` (where the step function returns its output): each run's noise and labels
    go there once, and only the finished samples come back to the host.
    """
    runs = math.ceil(len(labels) / batch)
    out = []
    with progress.phase("sample", runs * sampler.num_steps) as phase:
        for r in range(runs):
            idx = list(range(r * batch, min((r + 1) * batch, len(labels))))
            pad = batch - len(idx)
            y = take(labels, idx + [idx[0]] * pad)
            x = torch.cat([noise[idx], noise[idx[:1]].expand(pad, *noise.shape[1:])])
            reset()
            g = torch.Generator().manual_seed(seed + 1 + r)
            res = sampler.sample(step_fn, x.to(device), y.to(device), generator=g, phase=phase)
            out.append(res[: len(idx)].cpu())
    samples = torch.cat(out)
    check_finite_samples(samples)
    return samples


def check_finite_samples(samples: torch.Tensor) -> None:
    """A sample of NaN or inf is never a success: refuse the run (nothing is written) with what to check."""
    bad = ~torch.isfinite(samples).flatten(1).all(dim=1)
    if bad.any():
        raise TcgraphError(
            f"{int(bad.sum())} of {len(samples)} samples hold NaN or infinite values, so nothing was written; the "
            "model's weights, the scheduler's settings or the conditioning are not finite or out of range: "
            "check them (a `full` plan of the same model shows whether caching is the cause)"
        )
