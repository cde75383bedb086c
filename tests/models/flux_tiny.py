"""Tiny random FLUX models for the tests (tests/models/test_diffusers_flux.py, test_every_adapter.py):
two double blocks and two single blocks, width 32 (2 heads of 16), 16 image tokens (an 8 x 8 latent
of 4 channels), text width 12, pooled width 10; with and without the guidance embedding."""
from __future__ import annotations

import torch

from tcgraph.models.diffusers.flux_config import FluxConfig, flux_kwargs

STD = 0.05  # as the other diffusers testers (larger weights put ONNX and fx 1e-4 apart on a cache)


def tiny_config(guidance_embeds: bool = True, **overrides) -> FluxConfig:
    return FluxConfig(**{**dict(input_size=8, in_channels=4, hidden_size=32, depth=4, num_heads=2, single_depth=2,
                                caption_channels=12, pooled_channels=10, guidance_embeds=guidance_embeds,
                                axes_dims_rope=(4, 6, 6)), **overrides})


def tiny_diffusers(config: FluxConfig, seed: int = 0):
    """diffusers' FluxTransformer2DModel of `config`, every parameter drawn anew (std 0.05)."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**flux_kwargs(config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * STD)
    return model.eval()


def tiny_flux(guidance_embeds: bool = True, seed: int = 0):
    """The wrapper (`DiffusersFlux`) of a tiny random FLUX model."""
    from tcgraph.models.diffusers.flux import wrap

    config = tiny_config(guidance_embeds)
    return wrap(tiny_diffusers(config, seed), config)
