"""The sampling run a plan (and its static graphs) is made for."""
from __future__ import annotations

from dataclasses import dataclass

from tcgraph.errors import TcgraphError


@dataclass(frozen=True)
class SamplerSettings:
    """Sampler, step count, guidance, batch and resolution: constants of a plan's graphs."""

    sampler: str = "ddim"
    num_steps: int = 50
    cfg_scale: float = 2.0
    eta: float = 0.0
    batch: int = 8  # images per sampling run; the graphs see 2x with guidance
    resolution: int = 16  # model input side (latent side for latent models)

    def __post_init__(self) -> None:
        if self.sampler != "ddim":
            raise TcgraphError(f"unknown sampler {self.sampler!r}; only 'ddim' is supported")
        if self.num_steps < 1 or self.batch < 1 or self.resolution < 1:
            raise TcgraphError(f"steps, batch and resolution must be positive, got {self}")

    @property
    def model_batch(self) -> int:
        return 2 * self.batch if self.cfg_scale > 1.0 else self.batch
